"""The second real test provider: django-oauth-toolkit (DOT), and a person who uses its pages.

DOT is a Python authorization server from PyPI, a codebase unrelated to node
oidc-provider; tests/provider_django/ is a stock Django project configured only
through DOT's documented settings (tests/provider_django/README.md lists them).
``scripts/test`` installs the pinned packages (tests/provider_django/requirements.txt)
into the virtualenv; when they are missing, a test that needs the provider fails
under CI=true and skips elsewhere, naming the requirements file.

``DotProvider.start`` runs ``serve.py`` on 127.0.0.1 (a fresh database, RSA
key and users on every start) and reads its event lines, like the node fixture
(tests/support/provider.py). The fixtures are ``dot_provider`` (one per test
session) and ``dot_provider_factory`` (providers with other lifetimes).

The person: :func:`complete_browser_login` signs in on Django's login page and
presses Authorize on DOT's consent page; :func:`approve_device` and
:func:`deny_device` type the user code on DOT's device page and press Accept or
Deny. All over plain HTTP, following the pages' own forms.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from support.provider_process import ProviderProcess

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "provider_django"
REQUIREMENTS = PROVIDER_DIR / "requirements.txt"
#: The authorization-code client (a DOT application holds one grant type).
CLIENT_ID = "compozy-cli"
#: The device-flow client, a second application.
DEVICE_CLIENT_ID = "compozy-device"
SCOPES = ("openid", "profile", "email", "offline_access",
          "compozy:read", "compozy:write", "compozy:deploy")
PASSWORD = "test"
START_TIMEOUT = 90.0
DOT_FIXTURES = frozenset({"dot_provider", "dot_provider_factory"})


def pinned_versions() -> dict[str, str]:
    """``{distribution: version}`` from the requirements file."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def ensure_installed() -> None:
    """Fail under CI=true, else skip, unless the pinned packages are installed in this
    interpreter (``scripts/test`` installs them)."""
    wrong = []
    for name, version in pinned_versions().items():
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name} (missing)")
            continue
        if found != version:
            wrong.append(f"{name} {found} (pinned {version})")
    if wrong:
        message = (
            f"the django-oauth-toolkit test provider needs {', '.join(wrong)}: run scripts/test, "
            f"or `{sys.executable} -m pip install -r {REQUIREMENTS}`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


class DotProvider(ProviderProcess):
    """A running DOT provider. Start it with :meth:`start`; stop it with :meth:`stop`."""

    description = "the django-oauth-toolkit provider"

    client_id: str = CLIENT_ID
    device_client_id: str = DEVICE_CLIENT_ID
    scopes: tuple[str, ...] = SCOPES
    password: str = PASSWORD

    def __init__(self, proc: subprocess.Popen[bytes], state: tempfile.TemporaryDirectory[str],
                 ready_timeout: float) -> None:
        self._state = state
        ready = self._start_reading(proc, ready_timeout, stderr_lines=60)
        #: ``http://127.0.0.1:PORT/o``: DOT mounted under a path, as its docs lay out.
        self.issuer: str = ready["issuer"]
        #: The server's root (where RFC 8414's well-known document is).
        self.root: str = ready["url"]

    @classmethod
    def start(cls, access_token_ttl: int = 3600, refresh_token_ttl: int = 1209600,
              device_interval: int = 1, port: int = 0,
              start_timeout: float = START_TIMEOUT) -> DotProvider:
        """Check the install and start a provider; ``port=0`` takes any free port."""
        ensure_installed()
        state = tempfile.TemporaryDirectory(prefix="dot-provider-")
        proc = subprocess.Popen(
            [sys.executable, "serve.py", "--state-dir", state.name, "--port", str(port),
             "--access-token-ttl", str(access_token_ttl),
             "--refresh-token-ttl", str(refresh_token_ttl),
             "--device-interval", str(device_interval),
             "--exit-with-stdin"],  # the pipe closes when this process dies: no orphans
            cwd=PROVIDER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return cls(proc, state, start_timeout)

    @property
    def seq_url(self) -> str:
        return f"{self.root}/__test__/seq"

    # -- endpoints (DOT's URL names under /o/) ------------------------------

    @property
    def token_endpoint(self) -> str:
        return self.url("/token/")

    @property
    def device_authorization_endpoint(self) -> str:
        return self.url("/device-authorization/")

    @property
    def revocation_endpoint(self) -> str:
        return self.url("/revoke_token/")

    @property
    def userinfo_endpoint(self) -> str:
        return self.url("/userinfo/")

    @property
    def authorization_endpoint(self) -> str:
        return self.url("/authorize/")

    def userinfo_status(self, access_token: str) -> int:
        """The HTTP status of userinfo for this access token: 200 live, 401 dead."""
        return httpx.get(self.userinfo_endpoint, timeout=30.0,
                         headers={"Authorization": f"Bearer {access_token}"}).status_code

    def refresh_works(self, refresh_token: str, client_id: str = CLIENT_ID) -> bool:
        """Whether the provider still accepts this refresh token (a successful try
        rotates it, so use this only on a token one expects dead)."""
        response = httpx.post(self.token_endpoint, timeout=30.0, data={
            "grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": client_id})
        return response.status_code == 200

    def stop(self) -> None:
        """Stop the provider (SIGTERM, then SIGKILL after 10 s), reap it, remove its state."""
        super().stop()
        self._state.cleanup()


# --------------------------------------------------------------------------
# Fixtures.


class DotProviderFactory(Protocol):
    def __call__(self, *, access_token_ttl: int = ..., refresh_token_ttl: int = ...,
                 device_interval: int = ..., port: int = ...) -> DotProvider: ...


@pytest.fixture(scope="session")
def dot_provider() -> Iterator[DotProvider]:
    """One DOT provider for the test session (access tokens live an hour)."""
    with DotProvider.start() as provider:
        yield provider


@pytest.fixture
def dot_provider_factory() -> Iterator[DotProviderFactory]:
    """Start DOT providers of one's own; each is stopped when the test ends."""
    started: list[DotProvider] = []

    def start(**kwargs: Any) -> DotProvider:
        provider = DotProvider.start(**kwargs)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the DOT provider is a ``real_provider`` test, marked or not."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & DOT_FIXTURES and item.get_closest_marker("real_provider") is None:
            item.add_marker(pytest.mark.real_provider)


# --------------------------------------------------------------------------
# The person at the browser, on DOT's and Django's pages.


class _Forms(HTMLParser):
    """Every form on a page: action, method, fields and submit buttons."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[dict[str, Any]] = []
        self.title = ""
        self._in_title = False
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""),
                               "method": a.get("method", "get").lower(),
                               "fields": {}, "buttons": []})
        elif tag == "title":
            self._in_title = True
        elif not self.forms:
            return
        elif tag == "input" and a.get("type", "text").lower() == "submit":
            self.forms[-1]["buttons"].append((a.get("name", ""), a.get("value", "")))
        elif tag == "input" and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")
        elif tag == "button" and a.get("type", "submit").lower() == "submit":
            self.forms[-1]["buttons"].append((a.get("name", ""), a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if data.strip():
            self.text.append(data.strip())


def _parse(html: str) -> _Forms:
    parser = _Forms()
    parser.feed(html)
    parser.close()
    return parser


class DotPerson:
    """Signs in on Django's login page as ``login`` and answers DOT's pages.

    ``approve`` decides the consent page (Authorize or Cancel) and the device
    page (Accept or Deny). :attr:`pages` keeps each page's title and text.
    """

    MAX_STEPS = 20

    def __init__(self, login: str = "alice", approve: bool = True) -> None:
        self.login = login
        self.approve = approve
        self.client = httpx.Client(follow_redirects=False, timeout=30.0)
        self.pages: list[tuple[str, str]] = []

    def __enter__(self) -> DotPerson:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()

    def walk(self, response: httpx.Response, leave: Callable[[str], bool],
             user_code: str | None = None) -> str:
        """Follow redirects and forms from ``response``; return the first redirect
        ``leave`` accepts, else the URL of the page where nothing is left to do."""
        answered: set[str] = set()  # a form shown again was refused: stop there
        for _ in range(self.MAX_STEPS):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if leave(location):
                    return location
                response = self.client.get(location)
                continue
            page = _parse(response.text)
            self.pages.append((page.title.strip(), " ".join(page.text)))
            if response.status_code >= 400 or not page.forms:
                return str(response.url)
            form = page.forms[0]
            data = dict(form["fields"])
            kind = next((k for k in ("password", "user_code") if k in data), "buttons")
            if kind in answered and kind != "buttons":
                return str(response.url)
            answered.add(kind)
            if kind == "password":
                data["username"], data["password"] = self.login, PASSWORD
            elif kind == "user_code":
                if user_code is None:
                    raise AssertionError("DOT asks for a user code and none was given")
                data["user_code"] = user_code
            else:
                button = self._choose(form["buttons"])
                if button is None:
                    return str(response.url)
                if button[0]:
                    data[button[0]] = button[1]
            action = urljoin(str(response.url), form["action"] or str(response.url))
            response = (self.client.post(action, data=data) if form["method"] == "post"
                        else self.client.get(action, params=data))
        raise AssertionError(f"DOT's pages did not end within {self.MAX_STEPS} steps")

    def _choose(self, buttons: list[tuple[str, str]]) -> tuple[str, str] | None:
        wanted = {("allow", "Authorize"), ("action", "accept")} if self.approve else \
                 {("", "Cancel"), ("action", "deny")}
        return next((b for b in buttons if b in wanted), None)


def _leaves(authorization_url: str) -> Callable[[str], bool]:
    provider = urlsplit(authorization_url)
    redirect_uri = parse_qs(provider.query).get("redirect_uri", [""])[0]

    def leaves(location: str) -> bool:
        target = urlsplit(location)
        return (bool(redirect_uri) and location.startswith(redirect_uri.split("?")[0])) or \
            (target.scheme, target.netloc) != (provider.scheme, provider.netloc)

    return leaves


def complete_browser_login(authorization_url: str, login: str = "alice",
                           approve: bool = True) -> str:
    """As the person: open the authorization URL, sign in, press Authorize (or Cancel).

    Returns the redirect to the client's loopback callback, unfetched.
    """
    with DotPerson(login, approve) as person:
        final = person.walk(person.client.get(authorization_url), _leaves(authorization_url))
        if not _leaves(authorization_url)(final):
            title, text = person.pages[-1] if person.pages else ("", "")
            raise AssertionError(f"DOT did not redirect back: {title}: {text[:300]}")
        return final


def _device(verification_uri: str, user_code: str, login: str, approve: bool) -> str:
    with DotPerson(login, approve) as person:
        person.walk(person.client.get(verification_uri), lambda _: False, user_code=user_code)
        title, text = person.pages[-1] if person.pages else ("", "")
        return f"{title}: {text}"


def approve_device(verification_uri: str, user_code: str, login: str = "alice") -> str:
    """As the person: open ``verification_uri``, sign in, type ``user_code`` exactly as
    shown, press Accept. Returns the last page's title and text; raises AssertionError
    unless DOT says the device is authorized."""
    outcome = _device(verification_uri, user_code, login, approve=True)
    if not re.search(r"Device\s+Authorized", outcome):
        raise AssertionError(f"device approval did not succeed: {outcome[:300]}")
    return outcome


def deny_device(verification_uri: str, user_code: str, login: str = "alice") -> str:
    """As the person: type the code and press Deny. Returns the last page's text."""
    outcome = _device(verification_uri, user_code, login, approve=False)
    if not re.search(r"Device\s+Denied", outcome):
        raise AssertionError(f"device denial did not end as denied: {outcome[:300]}")
    return outcome
