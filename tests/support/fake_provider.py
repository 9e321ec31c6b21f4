"""A fault-injecting fake OAuth provider (aiohttp), for what a real one won't do on demand.

Each endpoint answers each request with the next behaviour scripted for it
(:meth:`FakeProvider.then` for the token endpoint, :meth:`FakeProvider.on` for
any endpoint), or a normal answer when nothing is scripted:

============  ================================================================
``ok``        a normal answer (token JSON with a chosen ``expires_in`` shape,
              rotation on or off, chosen token values)
``form``      the token answer form-encoded (``application/x-www-form-urlencoded``)
``status``    that status with a short text body (``Retry-After`` if given)
``error``     an OAuth error body (``{"error": ..}``, status 400 unless given)
``malformed`` status 200, ``application/json``, a body that is not JSON
``hang``      never answer (for timeouts)
``reset``     close the connection abruptly, answering nothing
``hold``      wait until :meth:`FakeProvider.release`, then answer as ``ok``
============  ================================================================

Any behaviour may also set a ``Date`` header (clock-skew tests), a ``delay``
before answering, or a raw ``body``. Every request is recorded (method, path,
query, form fields, headers) before it is answered. The fake is used beside the
real provider (tests/provider), never instead of it.

It also plays a malicious or broken provider where a test asks it to:
:attr:`FakeProvider.callback_overrides` changes the authorization response
(another issuer's ``iss``, an ``error_description`` with control characters),
:attr:`FakeProvider.relay_authorization_to` sends the browser on to another
provider's authorization endpoint with the same query (the mix-up attacker of
RFC 9207), :attr:`FakeProvider.userinfo_claims` answers userinfo about someone
else, :attr:`FakeProvider.advertises_iss` drops
``authorization_response_iss_parameter_supported`` from the metadata, and
:attr:`FakeProvider.omitted_metadata` leaves any field out of it (sparse discovery).

Three ways in: ``async with FakeProvider() as fake`` in async code; the
``fake_provider`` fixture in anyio tests (asyncio backend: aiohttp is
asyncio-only); ``with run_fake_provider_in_thread() as (base_url, fake)`` in sync
tests, e.g. to drive an agent subprocess against it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlencode

import pytest
from aiohttp import web

DISCOVERY = "/.well-known/openid-configuration"
AUTHORIZATION = "/auth"
TOKEN = "/token"
DEVICE_AUTHORIZATION = "/device/auth"
REVOCATION = "/revoke"
USERINFO = "/me"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

Kind = Literal["ok", "form", "status", "error", "malformed", "hang", "reset", "hold"]


@dataclass
class Behaviour:
    """How the fake answers one request. Positional use: ``Behaviour("status", status=503)``."""

    kind: Kind = "ok"
    status: int = 200
    #: A number, a string such as ``"3600"``, or None to leave ``expires_in`` out.
    expires_in: Any = 3600
    #: Issue a new refresh token (``fake-rt-N``) with the answer.
    rotate: bool = True
    retry_after: str | None = None
    error: str = "invalid_grant"
    error_description: str | None = None
    #: A ``Date`` header value (RFC 9110 IMF-fixdate), for clock-skew tests.
    date: str | None = None
    access_token: str | None = None  # default ``fake-at-N``
    refresh_token: str | None = None  # default ``fake-rt-N`` when rotating
    id_token: str | None = None  # default: one for login grants (see FakeProvider)
    scope: str | None = None
    token_type: str = "bearer"
    #: More fields for a JSON or form answer.
    extra: dict[str, Any] = field(default_factory=dict)
    #: A raw body answered as is, with ``status`` and ``content_type``.
    body: str | bytes | None = None
    content_type: str = "application/json"
    #: Seconds to wait before answering.
    delay: float = 0.0

    # Named constructors, for tests that read better with them.
    @classmethod
    def ok(cls, **fields: Any) -> Behaviour:
        return cls("ok", **fields)

    @classmethod
    def form(cls, **fields: Any) -> Behaviour:
        return cls("form", **fields)

    @classmethod
    def failing(cls, status: int = 500, retry_after: str | None = None) -> Behaviour:
        return cls("status", status=status, retry_after=retry_after)

    @classmethod
    def oauth_error(cls, error: str = "invalid_grant", status: int = 400) -> Behaviour:
        return cls("error", status=status, error=error)

    @classmethod
    def malformed(cls) -> Behaviour:
        return cls("malformed")

    @classmethod
    def hang(cls) -> Behaviour:
        return cls("hang")

    @classmethod
    def reset(cls) -> Behaviour:
        return cls("reset")

    @classmethod
    def hold(cls, **fields: Any) -> Behaviour:
        return cls("hold", **fields)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]


def fake_jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped string carrying ``claims``, with a signature nobody can check.

    Enough for a client that reads claims from an ID token it got straight from
    the token endpoint (OIDC Core 3.1.3.7 allows skipping the signature check then).
    """

    def part(value: dict[str, Any]) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT', 'kid': 'fake'})}.{part(claims)}.ZmFrZQ"


class FakeProvider:
    """The scripting handle and the aiohttp app. Start it with ``async with``."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.base_url = ""
        #: The clock for ``iat``/``exp`` in ID tokens; tests on a fake clock pass theirs.
        self.now = now
        self.scripts: dict[str, deque[Behaviour]] = {}
        self.requests: list[RecordedRequest] = []
        #: The person the fake's logins are for (ID token and userinfo claims).
        self.claims: dict[str, Any] = {
            "sub": "alice",
            "email": "alice@example.test",
            "email_verified": True,
            "name": "Alice Example",
        }
        #: Put an ID token in answers to authorization_code and device_code grants.
        self.issue_id_tokens = True
        self.device_interval: int | None = 1
        self.device_expires_in = 600
        self.user_code = "WDJB-MJHT"
        #: Send ``verification_uri_complete`` (RFC 8628 section 3.3.1: OPTIONAL).
        self.device_uri_complete = True
        #: Requests now waiting in a ``hold`` behaviour.
        self.holding = 0
        #: Parameters of the authorization response to change (a value of None removes it).
        self.callback_overrides: dict[str, str | None] = {}
        #: Where a mix-up attacker sends the browser on to, query and all.
        self.relay_authorization_to: str | None = None
        #: What userinfo answers, when not :attr:`claims`.
        self.userinfo_claims: dict[str, Any] | None = None
        #: Say in the metadata that authorization responses carry ``iss`` (RFC 9207).
        self.advertises_iss = True
        #: Refresh as django-oauth-toolkit does (see :meth:`_chain_refresh`): a narrower
        #: refresh narrows the chain for good, every refresh rotates and revokes the access
        #: token of the spent refresh token, and userinfo accepts live access tokens only.
        self.narrows_chains = False
        #: What a chain that started before this fake knew it holds (the login's grant).
        self.granted_scopes = frozenset({"openid", "profile", "email", "offline_access"})
        #: Per refresh token: the scopes of its chain, and the access token issued with it.
        self.chain_scopes: dict[str, frozenset[str]] = {}
        self.access_of_refresh: dict[str, str] = {}
        self.spent_refresh_tokens: set[str] = set()
        #: Access tokens userinfo accepts when :attr:`narrows_chains` is set.
        self.live_access_tokens: set[str] = set()
        #: Fields left out of the metadata document (a sparse provider's discovery).
        self.omitted_metadata: set[str] = set()
        self._tokens = itertools.count(1)  # numbers the ok token answers
        self._codes = itertools.count(1)
        self._nonces: dict[str, str | None] = {}
        self._recorded = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    @property
    def issuer(self) -> str:
        return self.base_url

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    # -- scripting -------------------------------------------------------------

    def then(self, *behaviours: Behaviour) -> FakeProvider:
        """Queue behaviours for the token endpoint, in order."""
        return self.on(TOKEN, *behaviours)

    def on(self, path: str, *behaviours: Behaviour) -> FakeProvider:
        """Queue behaviours for any endpoint (``DISCOVERY``, ``DEVICE_AUTHORIZATION``...)."""
        self.scripts.setdefault(path, deque()).extend(behaviours)
        return self

    def pending(self, path: str = TOKEN) -> int:
        """How many scripted behaviours for ``path`` have not been used yet."""
        return len(self.scripts.get(path, ()))

    def release(self) -> None:
        """Let every ``hold`` answer, now and later (callable from any thread)."""
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.set)

    # -- what was asked --------------------------------------------------------

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.path == path]

    def token_requests(self, grant_type: str | None = None) -> list[dict[str, str]]:
        """The form fields of each token request, of one grant type if given."""
        return [
            r.form
            for r in self.requests_to(TOKEN)
            if grant_type is None or r.form.get("grant_type") == grant_type
        ]

    def refresh_requests(self) -> list[dict[str, str]]:
        return self.token_requests("refresh_token")

    def revocations(self) -> list[dict[str, str]]:
        return [r.form for r in self.requests_to(REVOCATION)]

    def wait_for_requests(self, count: int, path: str = TOKEN, timeout: float = 10.0) -> bool:
        """Block until ``count`` requests to ``path`` arrived (threaded use); False on timeout."""
        with self._recorded:
            return self._recorded.wait_for(lambda: len(self.requests_to(path)) >= count, timeout)

    async def arrived(self, count: int, path: str = TOKEN, timeout: float = 10.0) -> None:
        """Wait in the event loop until ``count`` requests to ``path`` arrived."""
        deadline = time.monotonic() + timeout
        while len(self.requests_to(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} requests to {path} did not arrive in {timeout} s")
            await asyncio.sleep(0.005)

    # -- serving ---------------------------------------------------------------

    async def __aenter__(self) -> FakeProvider:
        app = web.Application()
        app.router.add_get(DISCOVERY, self._discovery)
        app.router.add_get(AUTHORIZATION, self._authorize)
        app.router.add_post(TOKEN, self._token)
        app.router.add_post(DEVICE_AUTHORIZATION, self._device)
        app.router.add_post(REVOCATION, self._revoke)
        app.router.add_route("*", USERINFO, self._userinfo)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _record(self, request: web.Request) -> RecordedRequest:
        form = await request.post() if request.method == "POST" else {}
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            form={k: str(v) for k, v in form.items()},
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        with self._recorded:
            self.requests.append(recorded)
            self._recorded.notify_all()
        return recorded

    async def _answer(
        self, request: web.Request, ok: Callable[[Behaviour], web.StreamResponse]
    ) -> web.StreamResponse:
        """Apply the next behaviour scripted for this path; ``ok`` builds a normal answer."""
        script = self.scripts.get(request.path)
        behaviour = script.popleft() if script else Behaviour()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        headers = {"Cache-Control": "no-store"}
        if behaviour.date:
            headers["Date"] = behaviour.date
        if behaviour.body is not None:
            return web.Response(
                body=behaviour.body.encode() if isinstance(behaviour.body, str) else behaviour.body,
                status=behaviour.status,
                content_type=behaviour.content_type,
                headers=headers,
            )
        match behaviour.kind:
            case "hang":
                await asyncio.sleep(3600)
                raise AssertionError("a hung request was answered")
            case "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            case "hold":
                assert self._released is not None
                self.holding += 1
                try:
                    await self._released.wait()
                finally:
                    self.holding -= 1
            case "status":
                if behaviour.retry_after is not None:
                    headers["Retry-After"] = behaviour.retry_after
                return web.Response(
                    status=behaviour.status, text="upstream trouble", headers=headers
                )
            case "error":
                body: dict[str, Any] = {"error": behaviour.error}
                if behaviour.error_description is not None:
                    body["error_description"] = behaviour.error_description
                if behaviour.retry_after is not None:
                    headers["Retry-After"] = behaviour.retry_after
                status = 400 if behaviour.status == 200 else behaviour.status
                return web.json_response(body, status=status, headers=headers)
            case "malformed":
                return web.Response(
                    text='{"access_token": "trunc', content_type="application/json", headers=headers
                )
        response = ok(behaviour)
        response.headers.update(headers)
        return response

    # -- endpoints -------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return await self._answer(request, lambda _: web.json_response(self.metadata()))

    def metadata(self) -> dict[str, Any]:
        document = {
            "issuer": self.base_url,
            "authorization_endpoint": self.url(AUTHORIZATION),
            "token_endpoint": self.url(TOKEN),
            "device_authorization_endpoint": self.url(DEVICE_AUTHORIZATION),
            "revocation_endpoint": self.url(REVOCATION),
            "userinfo_endpoint": self.url(USERINFO),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "authorization_response_iss_parameter_supported": self.advertises_iss,
        }
        return {k: v for k, v in document.items() if k not in self.omitted_metadata}

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        """A person who always allows: redirect to ``redirect_uri`` with a code at once."""
        recorded = await self._record(request)

        def ok(_: Behaviour) -> web.StreamResponse:
            if self.relay_authorization_to is not None:
                location = f"{self.relay_authorization_to}?{request.query_string}"
                return web.Response(status=302, headers={"Location": location})
            query = recorded.query
            code = f"fake-code-{next(self._codes)}"
            self._nonces[code] = query.get("nonce")
            params: dict[str, str | None] = {"code": code, "iss": self.base_url}
            if "state" in query:
                params["state"] = query["state"]
            params.update(self.callback_overrides)
            sent = {key: value for key, value in params.items() if value is not None}
            location = f"{query['redirect_uri']}?{urlencode(sent)}"
            return web.Response(status=302, headers={"Location": location})

        return await self._answer(request, ok)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        return await self._answer(request, lambda b: self._token_answer(b, recorded.form))

    def _chain_refresh(self, form: dict[str, str]) -> web.StreamResponse:
        """A refresh as django-oauth-toolkit answers it (``narrows_chains``).

        The new refresh token's chain holds the scopes asked for (RFC 6749 section 6),
        for good: a later refresh asking for a dropped scope fails ``invalid_scope``,
        one asking for none gets the narrowed set. The spent refresh token and the
        access token issued with it are revoked.
        """
        number = next(self._tokens)
        spent = form.get("refresh_token", "")
        if spent in self.spent_refresh_tokens:
            return web.json_response({"error": "invalid_grant"}, status=400)
        chain = self.chain_scopes.get(spent, self.granted_scopes)
        asked = frozenset(form.get("scope", "").split())
        if not asked <= chain:
            return web.json_response({"error": "invalid_scope"}, status=400)
        scope = asked or chain
        self.spent_refresh_tokens.add(spent)
        self.live_access_tokens.discard(self.access_of_refresh.pop(spent, ""))
        access_token, refresh_token = f"fake-at-{number}", f"fake-rt-{number}"
        self.chain_scopes[refresh_token] = scope
        self.access_of_refresh[refresh_token] = access_token
        self.live_access_tokens.add(access_token)
        return web.json_response({"access_token": access_token, "token_type": "Bearer",
                                  "expires_in": 3600, "refresh_token": refresh_token,
                                  "scope": " ".join(sorted(scope))})

    def _token_answer(self, behaviour: Behaviour, form: dict[str, str]) -> web.StreamResponse:
        if self.narrows_chains and form.get("grant_type") == "refresh_token" \
                and behaviour == Behaviour():
            return self._chain_refresh(form)
        number = next(self._tokens)
        body: dict[str, Any] = {
            "access_token": behaviour.access_token or f"fake-at-{number}",
            "token_type": behaviour.token_type,
        }
        if behaviour.expires_in is not None:
            body["expires_in"] = behaviour.expires_in
        if behaviour.refresh_token is not None:
            body["refresh_token"] = behaviour.refresh_token
        elif behaviour.rotate:
            body["refresh_token"] = f"fake-rt-{number}"
        if behaviour.scope is not None:
            body["scope"] = behaviour.scope
        login_grant = form.get("grant_type") in ("authorization_code", DEVICE_CODE_GRANT)
        if behaviour.id_token is not None:
            body["id_token"] = behaviour.id_token
        elif login_grant and self.issue_id_tokens:
            body["id_token"] = self.id_token(
                form.get("client_id", ""), self._nonces.pop(form.get("code", ""), None)
            )
        body.update(behaviour.extra)
        if behaviour.kind == "form":
            return web.Response(
                text=urlencode(body), content_type="application/x-www-form-urlencoded"
            )
        return web.json_response(body, status=behaviour.status)

    def id_token(self, audience: str, nonce: str | None = None) -> str:
        """An ID token for :attr:`claims`, issued now by :attr:`now`."""
        issued = int(self.now())
        claims = {
            **self.claims,
            "iss": self.base_url,
            "aud": audience,
            "iat": issued,
            "exp": issued + 3600,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        return fake_jwt(claims)

    async def _device(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)

        def ok(_: Behaviour) -> web.StreamResponse:
            body: dict[str, Any] = {
                "device_code": f"fake-dc-{next(self._codes)}",
                "user_code": self.user_code,
                "verification_uri": self.url("/device"),
                "expires_in": self.device_expires_in,
            }
            if self.device_uri_complete:
                body["verification_uri_complete"] = self.url(
                    f"/device?user_code={self.user_code}")
            if self.device_interval is not None:
                body["interval"] = self.device_interval
            return web.json_response(body)

        return await self._answer(request, ok)

    async def _revoke(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return await self._answer(request, lambda _: web.Response())  # RFC 7009 2.2: 200

    async def _userinfo(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if self.narrows_chains:
            bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if bearer not in self.live_access_tokens:
                return web.json_response({"error": "invalid_token"}, status=401)
        claims = self.claims if self.userinfo_claims is None else self.userinfo_claims
        return await self._answer(request, lambda _: web.json_response(claims))


@pytest.fixture
async def fake_provider() -> AsyncIterator[FakeProvider]:
    """A fake provider on 127.0.0.1 in the test's event loop (anyio tests, asyncio backend)."""
    async with FakeProvider() as fake:
        yield fake


@contextlib.contextmanager
def run_fake_provider_in_thread(
    start_timeout: float = 10.0,
) -> Iterator[tuple[str, FakeProvider]]:
    """Serve a fake provider from its own event loop in a thread, for sync tests.

    Yields ``(base_url, fake)``; script and inspect ``fake`` from the test's thread
    (use :meth:`FakeProvider.wait_for_requests` to wait for requests).
    """
    fake = FakeProvider()
    started = threading.Event()
    failures: list[BaseException] = []
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        stop.append(asyncio.Event())
        async with fake:
            started.set()
            await stop[0].wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # handed to the test's thread below
            failures.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=run, name="fake-provider", daemon=True)
    thread.start()
    if not started.wait(start_timeout) or failures or fake._loop is None:
        raise RuntimeError("the fake provider did not start") from (
            failures[0] if failures else None
        )
    loop = fake._loop
    try:
        yield fake.base_url, fake
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(start_timeout)
        if failures:
            raise failures[0]
