"""The real test OpenID provider (node oidc-provider), and a person who uses its pages.

``OidcTestProvider`` installs the pinned package (``npm ci``) on first use,
starts ``tests/provider/server.js`` on 127.0.0.1 and reads its event lines, so
tests can count calls to the token, revocation and device endpoints. The
``oidc_provider`` fixture is one provider per test session; the
``oidc_provider_factory`` fixture starts providers with other lifetimes.

``approve_device``/``deny_device`` and ``complete_browser_login``/
``deny_browser_login`` act as the person at the browser, over plain HTTP,
following the provider's own forms. The provider's pages (server.js) end with
``<meta name="outcome" content="approved|denied|error">``, which is how these
helpers know that what they meant to do happened.

Tests using the provider carry the ``real_provider`` marker; tests that ask for
the fixtures get it added at collection, so ``-m "not real_provider"`` works.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from support.provider_process import ProviderProcess
from support.real_parts import require_tools

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "provider"
CLIENT_ID = "compozy-cli"
#: The public client whose access tokens must be DPoP-bound (RFC 9449 section 5.2).
DPOP_CLIENT_ID = "compozy-cli-dpop"
#: The API resource (RFC 8707) whose access tokens are JWTs with this ``aud``.
API_RESOURCE = "https://api.compozy.dev"
SCOPES = (
    "openid",
    "profile",
    "email",
    "offline_access",
    "compozy:read",
    "compozy:write",
    "compozy:deploy",
)
#: Every account's password on the provider's login page.
PASSWORD = "test"
START_TIMEOUT = 60.0
INSTALL_TIMEOUT = 600.0
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
PROVIDER_FIXTURES = frozenset({"oidc_provider", "oidc_provider_factory"})


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((PROVIDER_DIR / name).read_bytes())
    return digest.hexdigest()


def ensure_installed() -> tuple[str, str]:
    """`npm ci` in tests/provider unless node_modules holds an install of this very lock file.

    A stamp in node_modules records the digest of package.json and package-lock.json
    after an install succeeded: a changed lock file, a missing or half-finished
    node_modules all reinstall, and nothing else does (file times lie after a checkout).
    Returns the paths of node and npm. Missing tools fail under CI=true, else skip.
    """
    node, npm = require_tools(("node", "npm"), "nodejs npm", "for the test OpenID provider")
    stamp = PROVIDER_DIR / "node_modules" / ".compozy-installed"
    package = PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json"
    with open(PROVIDER_DIR / ".install.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # parallel test sessions install once, in turn
        wanted = _lock_digest()
        if package.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
            return node, npm
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=PROVIDER_DIR,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm ci in {PROVIDER_DIR} took more than {INSTALL_TIMEOUT:.0f} s")
        if result.returncode != 0:
            pytest.fail(f"npm ci in {PROVIDER_DIR} failed:\n{result.stderr[-2000:]}")
        stamp.write_text(wanted + "\n")
    return node, npm


class OidcTestProvider(ProviderProcess):
    """A running test provider. Start it with :meth:`start`; stop it with :meth:`stop`.

    Its stdout lines (one JSON object each, never a token value) are read in a
    background thread; :meth:`events`, :meth:`count` and :meth:`count_token_calls`
    first ask the provider how many lines it has written and wait until all of
    them are read, so a count taken after a call returned includes that call.
    """

    client_id: str = CLIENT_ID
    api: str = API_RESOURCE
    scopes: tuple[str, ...] = SCOPES
    password: str = PASSWORD

    description = "the test OpenID provider"

    def __init__(self, proc: subprocess.Popen[bytes], ready_timeout: float) -> None:
        ready = self._start_reading(proc, ready_timeout)
        self.issuer: str = ready["issuer"]
        #: Where the provider itself listens (the issuer may be a proxy in front of it).
        self.direct: str = ready.get("url", self.issuer)
        self.api = ready.get("api", API_RESOURCE)
        self.port: int = urlsplit(self.direct).port or 0

    @classmethod
    def start(
        cls,
        access_token_ttl: int = 3600,
        refresh_token_ttl: int = 1209600,
        device_code_ttl: int = 600,
        port: int = 0,
        device_interval: int = 1,
        start_timeout: float = START_TIMEOUT,
        issuer: str | None = None,
        dpop_require_nonce: bool = False,
        dpop_algs: tuple[str, ...] | None = None,
    ) -> OidcTestProvider:
        """Install if needed and start a provider; ``port=0`` takes any free port.

        ``device_interval`` is the polling interval (seconds) the device
        authorization response names (RFC 8628 section 3.2). ``issuer`` is the
        issuer to advertise when clients reach the provider through a proxy
        (tests/support/fault_proxy.py); :attr:`direct` is then its own address.
        ``dpop_require_nonce`` makes the token endpoint demand a DPoP nonce (RFC 9449
        section 8); ``dpop_algs`` limits the DPoP algorithms it accepts and lists.
        """
        node, _ = ensure_installed()
        proc = subprocess.Popen(
            [
                node,
                "server.js",
                "--port",
                str(port),
                "--access-token-ttl",
                str(access_token_ttl),
                "--refresh-token-ttl",
                str(refresh_token_ttl),
                "--device-code-ttl",
                str(device_code_ttl),
                "--device-interval",
                str(device_interval),
                "--exit-with-stdin",  # the pipe closes when this process dies: no orphans
                *(["--issuer", issuer] if issuer else []),
                *(["--dpop-require-nonce"] if dpop_require_nonce else []),
                *(["--dpop-algs", ",".join(dpop_algs)] if dpop_algs else []),
            ],
            cwd=PROVIDER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return cls(proc, start_timeout)

    @property
    def seq_url(self) -> str:
        return f"{self.direct}/__test__/seq"

    # -- convenience -----------------------------------------------------------

    @property
    def token_endpoint(self) -> str:
        return self.url("/token")

    @property
    def device_authorization_endpoint(self) -> str:
        return self.url("/device/auth")

    @property
    def revocation_endpoint(self) -> str:
        return self.url("/token/revocation")

    @property
    def introspection_endpoint(self) -> str:
        return self.url("/token/introspection")

    @property
    def authorization_endpoint(self) -> str:
        return self.url("/auth")


# --------------------------------------------------------------------------
# Fixtures.


class ProviderFactory(Protocol):
    def __call__(
        self,
        *,
        access_token_ttl: int = ...,
        refresh_token_ttl: int = ...,
        device_code_ttl: int = ...,
        port: int = ...,
        device_interval: int = ...,
        issuer: str | None = ...,
    ) -> OidcTestProvider: ...


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcTestProvider]:
    """One provider for the test session (access tokens live an hour)."""
    with OidcTestProvider.start() as provider:
        yield provider


@pytest.fixture
def oidc_provider_factory() -> Iterator[ProviderFactory]:
    """Start providers of one's own: ``oidc_provider_factory(access_token_ttl=5)``.

    Every provider started is stopped when the test ends.
    """
    started: list[OidcTestProvider] = []

    def start(**kwargs: Any) -> OidcTestProvider:
        provider = OidcTestProvider.start(**kwargs)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the real provider is a ``real_provider`` test, marked or not."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & PROVIDER_FIXTURES and item.get_closest_marker("real_provider") is None:
            item.add_marker(pytest.mark.real_provider)


# --------------------------------------------------------------------------
# The person at the browser.


class Form:
    """A form on a page: where it goes, its fields and its submit buttons."""

    def __init__(self, form_id: str, action: str, method: str) -> None:
        self.id = form_id
        self.action = action
        self.method = method
        self.fields: dict[str, str] = {}
        self.visible: set[str] = set()  # fields a person types into
        self.buttons: list[tuple[str, str]] = []  # (name, value) of submit buttons

    def button(self, name: str) -> tuple[str, str] | None:
        return next((b for b in self.buttons if b[0] == name), None)


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.links: list[str] = []
        self.outcome: str | None = None
        self.text: list[str] = []
        self._open: Form | None = None
        self._loose_buttons: list[tuple[str, str, str]] = []  # (form id, name, value)
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "meta" and a.get("name") == "outcome":
            self.outcome = a.get("content")
        elif tag == "form":
            self._open = Form(a.get("id", ""), a.get("action", ""), a.get("method", "get").lower())
            self.forms.append(self._open)
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "input" and a.get("name"):
            form = self._form_for(a)
            if form is None:
                return
            kind = a.get("type", "text").lower()
            if kind == "submit":
                form.buttons.append((a["name"], a.get("value", "")))
            elif kind not in ("checkbox", "radio") or "checked" in a:
                form.fields[a["name"]] = a.get("value", "")
                if kind not in ("hidden", "checkbox", "radio"):
                    form.visible.add(a["name"])
        elif tag == "button" and a.get("type", "submit").lower() == "submit":
            # A button may sit outside its form and name it with form="...".
            if "form" in a:
                self._loose_buttons.append((a["form"], a.get("name", ""), a.get("value", "")))
            elif self._open is not None:
                self._open.buttons.append((a.get("name", ""), a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "form":
            self._open = None

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.text.append(data.strip())

    def _form_for(self, attrs: dict[str, str]) -> Form | None:
        if "form" in attrs:
            return next((f for f in self.forms if f.id == attrs["form"]), None)
        return self._open

    def close(self) -> None:
        super().close()
        for form_id, name, value in self._loose_buttons:
            for form in self.forms:
                if form.id == form_id:
                    form.buttons.append((name, value))


class Page:
    def __init__(self, url: str, status: int, html: str) -> None:
        parser = _PageParser()
        parser.feed(html)
        parser.close()
        self.url = url
        self.status = status
        self.forms = parser.forms
        self.links = parser.links
        self.outcome = parser.outcome
        self.text = " ".join(parser.text)


class PersonAtBrowser:
    """Follows the provider's pages the way a person clicking through them would.

    It signs in as ``login`` with the provider's password, types ``user_code``
    where a code is asked for, and then either allows (``approve=True``) or
    presses Deny/Cancel at the first chance.
    """

    MAX_STEPS = 30

    def __init__(
        self, login: str = "alice", approve: bool = True, user_code: str | None = None
    ) -> None:
        self.login = login
        self.approve = approve
        self.user_code = user_code
        self.client = httpx.Client(follow_redirects=False, timeout=30.0)
        self.pages: list[Page] = []

    def __enter__(self) -> PersonAtBrowser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()

    def close(self) -> None:
        self.client.close()

    def walk(self, url: str, leave: Callable[[str], bool] | None = None) -> str:
        """Start at ``url``. Return the first redirect target for which ``leave`` is
        true (not visited), else the URL of the first page with nothing left to do."""
        response = self.client.get(url)
        for _ in range(self.MAX_STEPS):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if leave is not None and leave(location):
                    return location
                response = self.client.get(location)
                continue
            page = Page(str(response.url), response.status_code, response.text)
            self.pages.append(page)
            step = self._next_step(page)
            if step is None:
                return page.url
            response = step()
        raise AssertionError(f"the provider's pages did not end within {self.MAX_STEPS} steps")

    @property
    def last_page(self) -> Page:
        if not self.pages:
            raise AssertionError("no page was shown")
        return self.pages[-1]

    def _next_step(self, page: Page) -> Callable[[], httpx.Response] | None:
        if page.outcome is not None or not page.forms:
            if not self.approve and page.outcome is None:
                abort = next((link for link in page.links if link.endswith("/abort")), None)
                if abort is not None:
                    return lambda: self.client.get(urljoin(page.url, abort))
            return None
        form = page.forms[0]
        data = dict(form.fields)
        button: tuple[str, str] | None = None
        if "password" in form.visible:
            data["login"], data["password"] = self.login, PASSWORD
        elif "user_code" in form.visible:
            if not self.user_code and not data.get("user_code"):
                raise AssertionError("the provider asks for a user code and none was given")
            data["user_code"] = data.get("user_code") or self.user_code or ""
        elif not self.approve and form.button("abort") is not None:
            button = form.button("abort")
        else:
            button = next((b for b in form.buttons if b[0] != "abort"), None)
        if button is not None and button[0]:
            data[button[0]] = button[1]
        action = urljoin(page.url, form.action or page.url)
        if form.method == "post":
            return lambda: self.client.post(action, data=data)
        return lambda: self.client.get(action, params=data)


DeviceVerification = str | tuple[str, str]


def _device_start(verification: DeviceVerification) -> tuple[str, str | None]:
    if isinstance(verification, tuple):
        verification_uri, user_code = verification
        return verification_uri, user_code
    return verification, None


def approve_device(verification: DeviceVerification, login: str = "alice") -> str:
    """As the person: open ``verification_uri_complete`` (or ``(verification_uri,
    user_code)``), confirm the code, sign in as ``login`` and allow.

    Returns the final page's text; raises AssertionError when the provider did not
    say the device is connected.
    """
    url, user_code = _device_start(verification)
    with PersonAtBrowser(login, user_code=user_code) as person:
        person.walk(url)
        page = person.last_page
        if page.outcome != "approved":
            raise AssertionError(f"device approval did not succeed: {page.text[:300]}")
        return page.text


def deny_device(verification: DeviceVerification, login: str = "alice") -> str:
    """As the person: open the verification page and press Cancel on the code's
    confirmation. Returns the final page's text."""
    url, user_code = _device_start(verification)
    with PersonAtBrowser(login, approve=False, user_code=user_code) as person:
        person.walk(url)
        page = person.last_page
        if page.outcome != "denied":
            raise AssertionError(f"device denial did not end as denied: {page.text[:300]}")
        return page.text


def _leaves(authorization_url: str) -> Callable[[str], bool]:
    """True for a redirect out of the provider (to the client's redirect_uri)."""
    provider = urlsplit(authorization_url)
    redirect_uri = parse_qs(provider.query).get("redirect_uri", [None])[0]

    def leaves(location: str) -> bool:
        if redirect_uri is not None and location.startswith(redirect_uri.split("?")[0]):
            return True
        target = urlsplit(location)
        return (target.scheme, target.netloc) != (provider.scheme, provider.netloc)

    return leaves


def _walk_to_callback(authorization_url: str, login: str, approve: bool) -> str:
    with PersonAtBrowser(login, approve=approve) as person:
        final = person.walk(authorization_url, leave=_leaves(authorization_url))
        if person.pages and final == person.pages[-1].url:
            page = person.pages[-1]
            raise AssertionError(
                f"the provider did not redirect back ({page.status}): {page.text[:300]}"
            )
        return final


def complete_browser_login(authorization_url: str, login: str = "alice") -> str:
    """As the person: follow the authorization URL, sign in and allow.

    Returns the redirect to the client's loopback callback (code, state, iss),
    without fetching it.
    """
    return _walk_to_callback(authorization_url, login, approve=True)


def deny_browser_login(authorization_url: str, login: str = "alice") -> str:
    """As the person: sign in, then press Deny on the consent page.

    Returns the callback redirect carrying ``error=access_denied``, unfetched.
    """
    return _walk_to_callback(authorization_url, login, approve=False)
