"""The real test OpenID provider (node oidc-provider), and a person who uses its pages.

``OidcTestProvider`` installs the pinned package (``npm ci``) on first use,
starts ``tests/provider/server.js`` on 127.0.0.1 and reads its event lines, so
tests can count token-endpoint calls. ``approve_device``/``deny_device`` and
``complete_browser_login``/``deny_browser_login`` act as the person at the
browser, over plain HTTP, following the provider's own forms.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from support.real_parts import require_tools

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "provider"
CLIENT_ID = "compozy-cli"
API_RESOURCE = "https://api.compozy.dev"
START_TIMEOUT = 60.0


def _require(tool: str, package: str) -> str:
    return require_tools((tool,), package, "for the test OpenID provider")[0]


def ensure_installed() -> None:
    """`npm ci` in tests/provider when node_modules is missing or older than the lock file."""
    _require("node", "nodejs")
    npm = _require("npm", "npm")
    lock = PROVIDER_DIR / "package-lock.json"
    marker = PROVIDER_DIR / "node_modules" / ".package-lock.json"
    with open(PROVIDER_DIR / ".install.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # parallel test sessions install once
        if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
            return
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PROVIDER_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci in {PROVIDER_DIR} failed:\n{result.stderr[-2000:]}")


@dataclass
class OidcTestProvider:
    """A running provider; ``events`` holds its stdout lines as dicts."""

    proc: subprocess.Popen[bytes]
    issuer: str
    client_id: str = CLIENT_ID
    api: str = API_RESOURCE
    events: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(
        cls,
        access_token_ttl: int = 3600,
        refresh_token_ttl: int = 1209600,
        device_code_ttl: int = 600,
        port: int = 0,
    ) -> OidcTestProvider:
        ensure_installed()
        proc = subprocess.Popen(
            [
                "node",
                "server.js",
                "--port",
                str(port),
                "--access-token-ttl",
                str(access_token_ttl),
                "--refresh-token-ttl",
                str(refresh_token_ttl),
                "--device-code-ttl",
                str(device_code_ttl),
            ],
            cwd=PROVIDER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or b"{}")
        if ready.get("event") != "ready":
            proc.kill()
            proc.wait()
            pytest.fail(
                "the test OpenID provider did not start (run `node server.js` in "
                f"{PROVIDER_DIR} to see why)"
            )
        provider = cls(
            proc=proc, issuer=ready["issuer"], port=int(ready["issuer"].rsplit(":", 1)[1])
        )
        threading.Thread(target=provider._read_events, daemon=True).start()
        return provider

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self._arrived:
                self.events.append(json.loads(line))
                self._arrived.notify_all()

    def wait_for(self, event: str, count: int, timeout: float = 30.0, **match: Any) -> bool:
        """Block until the provider has logged ``count`` such events (woken per event)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.count(event, **match) >= count, timeout)

    def count(self, event: str = "token", **match: Any) -> int:
        """How many events of this kind (and matching fields) the provider logged so far."""
        return sum(
            1
            for e in list(self.events)
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcTestProvider]:
    """One provider for the test session (access tokens live an hour)."""
    provider = OidcTestProvider.start()
    yield provider
    provider.stop()


@pytest.fixture
def oidc_provider_factory() -> Iterator[Any]:
    """Start providers with custom lifetimes: ``oidc_provider_factory(access_token_ttl=5)``."""
    started: list[OidcTestProvider] = []

    def start(**kwargs: int) -> OidcTestProvider:
        provider = OidcTestProvider.start(**kwargs)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


# --------------------------------------------------------------------------
# The person at the browser.


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.buttons: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower(), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif tag == "button":
            # Buttons may sit outside their form (form="..." attribute).
            self.buttons.append(a)


class PersonAtBrowser:
    """Follows the provider's pages the way a person clicking through them would."""

    def __init__(self, login: str = "alice", approve: bool = True) -> None:
        self.login = login
        self.approve = approve
        self.client = httpx.Client(follow_redirects=False, timeout=30.0)
        self.pages: list[str] = []

    def close(self) -> None:
        self.client.close()

    def walk(self, url: str, stop_prefix: str | None = None) -> str:
        """Start at ``url``; return the URL that leaves the provider (or the last page's URL)."""
        response = self.client.get(url)
        aborted = False
        for _ in range(30):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if stop_prefix and location.startswith(stop_prefix):
                    return location
                response = self.client.get(location)
                continue
            self.pages.append(response.text)
            if aborted:  # the person clicked abort and reads what the provider says
                return str(response.url)
            parser = _FormParser()
            parser.feed(response.text)
            form = parser.forms[0] if parser.forms else None
            if form is None:
                return str(response.url)
            if not self.approve and "/interaction/" in str(response.url):
                aborted = True
                response = self.client.get(str(response.url).rstrip("/") + "/abort")
                continue
            data = dict(form.fields)
            if "login" in data or "password" in data:
                data["login"], data["password"] = self.login, "test"
            if not self.approve and any(b.get("name") == "abort" for b in parser.buttons):
                aborted = True
                data.pop("confirm", None)
                data["abort"] = "yes"
            action = urljoin(str(response.url), form.action or str(response.url))
            if form.method == "post":
                response = self.client.post(action, data=data)
            else:
                response = self.client.get(action, params=data)
        raise AssertionError("the provider's pages did not end within 30 steps")


def approve_device(verification_uri_complete: str, login: str = "alice") -> str:
    """Enter the code, log in and consent, as the person would; returns the final page's text."""
    person = PersonAtBrowser(login)
    try:
        person.walk(verification_uri_complete)
        return person.pages[-1]
    finally:
        person.close()


def deny_device(verification_uri_complete: str) -> str:
    person = PersonAtBrowser(approve=False)
    try:
        person.walk(verification_uri_complete)
        return person.pages[-1]
    finally:
        person.close()


def _redirect_uri(authorization_url: str) -> str:
    return parse_qs(urlsplit(authorization_url).query)["redirect_uri"][0]


def complete_browser_login(authorization_url: str, login: str = "alice") -> str:
    """Log in and consent; returns the loopback callback URL (code and state) unvisited."""
    person = PersonAtBrowser(login)
    try:
        return person.walk(authorization_url, stop_prefix=_redirect_uri(authorization_url))
    finally:
        person.close()


def deny_browser_login(authorization_url: str) -> str:
    person = PersonAtBrowser(approve=False)
    try:
        return person.walk(authorization_url, stop_prefix=_redirect_uri(authorization_url))
    finally:
        person.close()
