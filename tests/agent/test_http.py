"""The httpx edge against a provider faked by handler functions (httpx.MockTransport)."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs

import httpx
import pytest

from compozy_agent import http, oidc
from compozy_agent.http import ProviderClient
from compozy_client import __version__

pytestmark = pytest.mark.anyio

ISSUER = "https://auth.example.test"
META = oidc.ProviderMetadata(
    issuer=ISSUER,
    token_endpoint=f"{ISSUER}/token",
    authorization_endpoint=f"{ISSUER}/authorize",
    device_authorization_endpoint=f"{ISSUER}/device",
    revocation_endpoint=f"{ISSUER}/revoke",
    userinfo_endpoint=f"{ISSUER}/me",
)
ACCESS = "at-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
REFRESH = "rt-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
T0 = 1_800_000_000.0
OIDC_URL = f"{ISSUER}/.well-known/openid-configuration"
RFC8414_URL = "https://auth.example.test/.well-known/oauth-authorization-server"

Handler = Callable[[httpx.Request], httpx.Response]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeProvider:
    """Records requests and answers each with the handler the test installed."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Handler = lambda request: httpx.Response(404)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def form(self, index: int = -1) -> dict[str, list[str]]:
        return parse_qs(self.requests[index].content.decode())


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(fake: FakeProvider, clock: Clock) -> AsyncIterator[ProviderClient]:
    async with ProviderClient(now=clock, transport=httpx.MockTransport(fake)) as provider:
        yield provider


def metadata_document(issuer: str = ISSUER) -> dict[str, object]:
    return {"issuer": issuer, "token_endpoint": f"{issuer}/token"}


def token_answer(**fields: object) -> httpx.Response:
    return httpx.Response(200, json={"access_token": ACCESS, "token_type": "bearer", **fields})


# ---------------------------------------------------------------------- sending


async def test_the_client_is_configured_as_documented(client: ProviderClient) -> None:
    inner = client._client
    assert inner.timeout.connect == 5.0 and inner.timeout.read == 10.0
    assert client.call_deadline == http.CALL_DEADLINE == 10.0
    assert inner.follow_redirects is False
    assert inner.headers["user-agent"] == f"compozy-agent/{__version__}"


async def test_send_encodes_the_form_in_order_with_repeats(
    client: ProviderClient, fake: FakeProvider, clock: Clock
) -> None:
    fake.handler = lambda request: httpx.Response(
        200, headers={"X-Thing": "1", "Content-Type": "application/json"}, content=b"{}"
    )
    clock.now = T0 + 5
    response = await client.send(oidc.refresh_request(
        META, client_id="cli", refresh_token=REFRESH, resources=["https://a", "https://b"]))
    sent = fake.requests[0]
    assert sent.method == "POST" and str(sent.url) == META.token_endpoint
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    assert sent.headers["accept"] == "application/json"
    assert sent.content == (b"grant_type=refresh_token&refresh_token=" + REFRESH.encode()
                            + b"&client_id=cli&resource=https%3A%2F%2Fa&resource=https%3A%2F%2Fb")
    assert response.status == 200 and response.body == b"{}"
    assert response.headers["x-thing"] == "1" and response.received_at == T0 + 5
    assert REFRESH not in repr(response)


async def test_a_redirect_is_not_followed(client: ProviderClient, fake: FakeProvider) -> None:
    fake.handler = lambda request: httpx.Response(
        302, headers={"Location": f"https://elsewhere.test/?code={ACCESS}"})
    with pytest.raises(oidc.MalformedResponse, match="redirect") as caught:
        await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert len(fake.requests) == 1 and ACCESS not in str(caught.value)


async def test_an_oversized_body_is_refused(client: ProviderClient, fake: FakeProvider) -> None:
    fake.handler = lambda request: httpx.Response(200, content=b" " * (http.MAX_BODY_BYTES + 1))
    with pytest.raises(oidc.MalformedResponse, match="larger than"):
        await client.send(oidc.HttpRequest(method="GET", url=f"{ISSUER}/big"))

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(2 + http.MAX_BODY_BYTES // 65536):
            yield b" " * 65536

    fake.handler = lambda request: httpx.Response(200, content=stream())
    with pytest.raises(oidc.MalformedResponse, match="larger than"):
        await client.send(oidc.HttpRequest(method="GET", url=f"{ISSUER}/big"))


# -------------------------------------------------------------------- discovery


def complete_document(issuer: str = ISSUER) -> dict[str, object]:
    """A document naming every endpoint the agent uses: nothing left to fill."""
    return {**{name: f"{issuer}/{name}" for name in oidc.ENDPOINT_FIELDS},
            **metadata_document(issuer)}


async def test_discovery_uses_openid_configuration_and_caches_it(
    client: ProviderClient, fake: FakeProvider, clock: Clock
) -> None:
    fake.handler = lambda request: httpx.Response(200, json=complete_document())
    first = await client.discover(ISSUER)
    assert first.token_endpoint == f"{ISSUER}/token"
    assert [str(r.url) for r in fake.requests] == [OIDC_URL]
    clock.now += http.DISCOVERY_TTL - 1
    assert await client.discover(ISSUER) is first
    assert len(fake.requests) == 1
    clock.now += 2  # the hour is over
    await client.discover(ISSUER)
    assert len(fake.requests) == 2
    client.forget_metadata(ISSUER)
    await client.discover(ISSUER)
    client.forget_metadata()
    await client.discover(ISSUER)
    assert len(fake.requests) == 4


@pytest.mark.parametrize(
    "oidc_answer",
    [
        httpx.Response(404),
        httpx.Response(200, text="<html>a single-page app answers every path</html>"),
    ],
)
async def test_discovery_falls_back_to_rfc8414_with_path_insertion(
    client: ProviderClient, fake: FakeProvider, oidc_answer: httpx.Response
) -> None:
    issuer = f"{ISSUER}/tenant1"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/.well-known/oauth-authorization-server/tenant1"):
            return httpx.Response(200, json=metadata_document(issuer))
        return oidc_answer

    fake.handler = handler
    metadata = await client.discover(issuer)
    assert metadata.issuer == issuer
    assert [str(r.url) for r in fake.requests] == [
        f"{issuer}/.well-known/openid-configuration",
        f"{ISSUER}/.well-known/oauth-authorization-server/tenant1",
    ]


async def test_discovery_merges_a_sparse_oidc_document_with_rfc8414(
    client: ProviderClient, fake: FakeProvider, clock: Clock
) -> None:
    # As django-oauth-toolkit publishes them: OIDC lacks revocation and device, RFC 8414
    # has revocation but no userinfo; neither has the device endpoint.
    issuer = f"{ISSUER}/o"
    openid = {"issuer": issuer, "token_endpoint": f"{issuer}/token/",
              "authorization_endpoint": f"{issuer}/authorize/",
              "userinfo_endpoint": f"{issuer}/userinfo/"}
    rfc8414 = {"issuer": issuer, "token_endpoint": f"{issuer}/other-token/",
               "revocation_endpoint": f"{issuer}/revoke_token/",
               "introspection_endpoint": f"{issuer}/introspect/",
               "authorization_response_iss_parameter_supported": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/o/.well-known/openid-configuration":
            return httpx.Response(200, json=openid)
        if request.url.path == "/.well-known/oauth-authorization-server/o":
            return httpx.Response(200, json=rfc8414)
        return httpx.Response(404)

    fake.handler = handler
    metadata = await client.discover(issuer)
    assert metadata.token_endpoint == f"{issuer}/token/"  # OIDC first
    assert metadata.userinfo_endpoint == f"{issuer}/userinfo/"  # only in OIDC
    assert metadata.revocation_endpoint == f"{issuer}/revoke_token/"  # filled by RFC 8414
    assert metadata.introspection_endpoint == f"{issuer}/introspect/"
    assert metadata.authorization_response_iss_parameter_supported
    assert metadata.device_authorization_endpoint is None  # in neither
    assert len(fake.requests) == 2
    assert await client.discover(issuer) is metadata  # the merge is what is cached
    assert len(fake.requests) == 2
    # A profile names what no document says; the override is not cached.
    device = f"{issuer}/device-authorization/"
    named = await client.discover(issuer, {"device_authorization_endpoint": device})
    assert named.device_authorization_endpoint == device
    assert named.revocation_endpoint == metadata.revocation_endpoint
    assert (await client.discover(issuer)).device_authorization_endpoint is None


@pytest.mark.parametrize("wrong", ["openid", "rfc8414"])
@pytest.mark.parametrize("answer", [
    {"issuer": "https://evil.test", "token_endpoint": "https://evil.test/t"},
    {"issuer": ISSUER, "token_endpoint": f"{ISSUER}/t",
     "revocation_endpoint": "http://auth.example.test/revoke"},
])
async def test_discovery_refuses_a_bad_document_in_either_place(
    client: ProviderClient, fake: FakeProvider, wrong: str, answer: dict[str, object]
) -> None:
    good = metadata_document()  # sparse: the second document is always read

    def handler(request: httpx.Request) -> httpx.Response:
        is_openid = request.url.path.endswith("openid-configuration")
        return httpx.Response(200, json=answer if is_openid == (wrong == "openid") else good)

    fake.handler = handler
    with pytest.raises(oidc.MalformedResponse, match=r"evil\.test|non-HTTPS"):
        await client.discover(ISSUER)
    fake.handler = lambda request: httpx.Response(200, json=good)
    assert (await client.discover(ISSUER)).issuer == ISSUER  # the refusal was not cached


async def test_discovery_uses_openid_alone_uncached_when_rfc8414_cannot_be_read(
    client: ProviderClient, fake: FakeProvider
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json=metadata_document())
        return httpx.Response(503)

    fake.handler = handler
    assert (await client.discover(ISSUER)).revocation_endpoint is None
    await client.discover(ISSUER)
    assert len(fake.requests) == 4  # asked again: a partial view is not kept for an hour


async def test_profile_endpoints_are_checked_like_discovered_ones(
    client: ProviderClient, fake: FakeProvider
) -> None:
    fake.handler = lambda request: httpx.Response(200, json=metadata_document())
    with pytest.raises(oidc.MalformedResponse,
                       match="profile's revocation_endpoint: refusing a non-HTTPS"):
        await client.discover(ISSUER, {"revocation_endpoint": "http://auth.example.test/r"})
    loopback = await client.discover(ISSUER, {"token_endpoint": "http://127.0.0.1:9/token"})
    assert loopback.token_endpoint == "http://127.0.0.1:9/token"


async def test_discovery_failures(client: ProviderClient, fake: FakeProvider) -> None:
    nothing = r"auth\.example\.test publishes no OpenID or OAuth metadata \(HTTP 404, 404\)"
    with pytest.raises(oidc.MalformedResponse, match=nothing):
        await client.discover(ISSUER)
    fake.handler = lambda request: httpx.Response(
        200, json={"issuer": "https://evil.test", "token_endpoint": "https://evil.test/t"})
    with pytest.raises(oidc.MalformedResponse, match=r"evil\.test"):
        await client.discover(ISSUER)
    fake.handler = lambda request: httpx.Response(503, headers={"Retry-After": "30"})
    with pytest.raises(oidc.TransientProviderError) as caught:
        await client.discover(ISSUER)
    assert caught.value.retry_after == 30.0
    requests_so_far = len(fake.requests)
    with pytest.raises(oidc.MalformedResponse, match="non-HTTPS"):
        await client.discover("http://auth.example.test")
    assert len(fake.requests) == requests_so_far  # refused before asking


async def test_failed_discovery_is_not_cached(client: ProviderClient, fake: FakeProvider) -> None:
    fake.handler = lambda request: httpx.Response(500)
    with pytest.raises(oidc.TransientProviderError):
        await client.discover(ISSUER)
    fake.handler = lambda request: httpx.Response(200, json=metadata_document())
    assert (await client.discover(ISSUER)).issuer == ISSUER


# --------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("exception", "reason"),
    [
        (httpx.ConnectError("[Errno -2] Name or service not known"), "does not resolve"),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
         "TLS certificate is not trusted"),
        (httpx.ConnectError("something new"), "cannot connect"),
        (httpx.ConnectTimeout("timed out"), "connecting timed out"),
        (httpx.ReadTimeout("timed out"), "read timeout"),
        (httpx.WriteTimeout("timed out"), "sending timed out"),
        (httpx.PoolTimeout("timed out"), "pool timeout"),
        (httpx.ReadError("[Errno 104] Connection reset by peer"), "reset"),
        (httpx.WriteError("[Errno 32] Broken pipe"), "reset while sending"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."),
         "broke the HTTP protocol"),
        (httpx.LocalProtocolError("Illegal header value"), "could not be sent"),
        (httpx.ProxyError("407"), "proxy"),
        (httpx.UnsupportedProtocol("gopher"), "unsupported URL scheme"),
    ],
)
async def test_transport_failures_become_provider_unreachable(
    client: ProviderClient, fake: FakeProvider, exception: Exception, reason: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    fake.handler = handler
    url = f"https://user:pw-secret@auth.example.test:8443/token?code={ACCESS}"
    request = oidc.HttpRequest(method="POST", url=url, form=[("refresh_token", REFRESH)])
    with pytest.raises(oidc.ProviderUnreachable) as caught:
        await client.send(request)
    error = caught.value
    assert reason in error.reason and error.host == "auth.example.test:8443"
    assert str(error).startswith("auth.example.test:8443: ")
    shown = f"{error} {error!r} {error.args}"
    for secret in (ACCESS, REFRESH, "pw-secret", "/token", "Errno"):
        assert secret not in shown
    assert error.__cause__ is None and error.__suppress_context__
    assert isinstance(error, oidc.OAuthFailure)


async def test_a_broken_content_encoding_is_malformed(
    client: ProviderClient, fake: FakeProvider
) -> None:
    fake.handler = lambda request: httpx.Response(
        200, headers={"Content-Encoding": "gzip"}, content=b"not gzip at all")
    with pytest.raises(oidc.MalformedResponse, match="content encoding"):
        await client.send(oidc.HttpRequest(method="GET", url=OIDC_URL))
    fake.handler = lambda request: httpx.Response(
        200, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        content=gzip.compress(json.dumps({"access_token": "zipped"}).encode()))
    response, _ = await client.token(oidc.HttpRequest(method="POST", url=META.token_endpoint))
    assert response.access_token == "zipped"


async def test_an_invalid_url_is_malformed(client: ProviderClient) -> None:
    with pytest.raises(oidc.MalformedResponse, match="invalid endpoint URL"):
        await client.send(oidc.HttpRequest(method="GET", url="https://a\x00b.test/"))


# ------------------------------------------------------------- 429, skew, tokens


async def test_429_with_retry_after_seconds_or_date(
    client: ProviderClient, fake: FakeProvider
) -> None:
    fake.handler = lambda request: httpx.Response(429, headers={"Retry-After": "12"})
    with pytest.raises(oidc.TransientProviderError) as caught:
        await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert (caught.value.status, caught.value.retry_after) == (429, 12.0)
    fake.handler = lambda request: httpx.Response(429, headers={
        "Retry-After": "Wed, 21 Oct 2015 07:28:40 GMT",
        "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
    })
    with pytest.raises(oidc.TransientProviderError) as dated:
        await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert dated.value.retry_after == 40.0
    assert REFRESH not in str(dated.value)


async def test_clock_skew_is_tracked_from_date_headers(
    client: ProviderClient, fake: FakeProvider, clock: Clock
) -> None:
    assert [client.last_clock_skew] == [None]  # (a list: mypy would narrow the attribute)
    clock.now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    fake.handler = lambda request: httpx.Response(
        200, json={"access_token": ACCESS}, headers={"Date": "Wed, 21 Oct 2015 07:30:00 GMT"})
    await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert client.last_clock_skew == 120.0
    fake.handler = lambda request: httpx.Response(200, json={"access_token": ACCESS})
    await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert client.last_clock_skew == 120.0  # no Date header: the last one stands
    fake.handler = lambda request: httpx.Response(
        500, headers={"Date": "Wed, 21 Oct 2015 07:27:50 GMT"})
    with pytest.raises(oidc.TransientProviderError):
        await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert client.last_clock_skew == -10.0  # error answers have a clock too


async def test_refresh_sends_narrowing_and_keeps_an_unrotated_refresh_token(
    client: ProviderClient, fake: FakeProvider, clock: Clock
) -> None:
    fake.handler = lambda request: token_answer(expires_in="300", scope="read")
    response = await client.refresh(META, client_id="cli", refresh_token=REFRESH,
                                    scopes=["read"], resources=["https://api"],
                                    audience="api://x")
    assert fake.form() == {"grant_type": ["refresh_token"], "refresh_token": [REFRESH],
                           "client_id": ["cli"], "scope": ["read"], "resource": ["https://api"],
                           "audience": ["api://x"]}
    assert response.refresh_token == REFRESH and response.scope == ["read"]
    assert response.received_at == T0 and response.expires_at == T0 + 300
    fake.handler = lambda request: token_answer(refresh_token="rt-new")
    assert (await client.refresh(META, client_id="cli", refresh_token=REFRESH)).refresh_token \
        == "rt-new"
    fake.handler = lambda request: httpx.Response(400, json={"error": "invalid_grant"})
    with pytest.raises(oidc.OAuthError) as caught:
        await client.refresh(META, client_id="cli", refresh_token=REFRESH)
    assert caught.value.error == "invalid_grant"


async def test_exchange_and_the_prebuilt_token_call(
    client: ProviderClient, fake: FakeProvider
) -> None:
    fake.handler = lambda request: token_answer(id_token="h.p.s", refresh_token=REFRESH)
    pkce = oidc.new_pkce()
    response = await client.exchange(META, client_id="cli", code="c0de",
                                     redirect_uri="http://127.0.0.1:1234/callback", pkce=pkce)
    assert fake.form()["code_verifier"] == [pkce.verifier] and fake.form()["code"] == ["c0de"]
    assert (response.id_token, response.refresh_token) == ("h.p.s", REFRESH)
    parsed, received_at = await client.token(oidc.code_exchange_request(
        META, client_id="cli", code="c0de", redirect_uri="r", pkce=pkce))
    assert parsed.access_token == ACCESS and received_at == T0


async def test_device_flow(client: ProviderClient, fake: FakeProvider) -> None:
    fake.handler = lambda request: httpx.Response(200, json={
        "device_code": "dc", "user_code": "ABCD-EFGH",
        "verification_uri": f"{ISSUER}/activate", "interval": 2, "expires_in": 900})
    device = await client.device_authorize(META, client_id="cli", scopes=["openid"],
                                           resources=["https://api"])
    assert fake.form() == {"client_id": ["cli"], "scope": ["openid"],
                           "resource": ["https://api"]}
    assert (device.user_code, device.interval, device.expires_in) == ("ABCD-EFGH", 2.0, 900.0)
    prebuilt = await client.device_authorize(oidc.device_authorization_request(
        META, client_id="cli", scopes=["openid"]))
    assert prebuilt == device

    answers = iter([
        httpx.Response(400, json={"error": "authorization_pending"}),
        httpx.Response(400, json={"error": "slow_down"}),
        httpx.Response(200, json={"access_token": ACCESS, "expires_in": 60}),
        httpx.Response(400, json={"error": "expired_token"}),
    ])
    fake.handler = lambda request: next(answers)
    results = [await client.poll_device(META, client_id="cli", device_code="dc")
               for _ in range(3)]
    assert results[:2] == [oidc.DevicePending(), oidc.DeviceSlowDown()]
    assert isinstance(results[2], oidc.TokenResponse) and results[2].access_token == ACCESS
    assert fake.form()["grant_type"] == [oidc.DEVICE_GRANT]
    with pytest.raises(oidc.OAuthError) as caught:
        await client.poll_device(META, client_id="cli", device_code="dc")
    assert caught.value.error == "expired_token"


async def test_revoke(client: ProviderClient, fake: FakeProvider) -> None:
    fake.handler = lambda request: httpx.Response(200)
    await client.revoke(META, client_id="cli", token=REFRESH, hint="refresh_token")
    assert str(fake.requests[-1].url) == META.revocation_endpoint
    assert fake.form() == {"token": [REFRESH], "token_type_hint": ["refresh_token"],
                           "client_id": ["cli"]}
    await client.revoke(oidc.revocation_request(META, client_id="cli", token=ACCESS))
    assert fake.form()["token"] == [ACCESS]
    fake.handler = lambda request: httpx.Response(400, json={"error": "unsupported_token_type"})
    with pytest.raises(oidc.OAuthError, match="unsupported_token_type"):
        await client.revoke(META, client_id="cli", token=ACCESS, hint="access_token")
    fake.handler = lambda request: httpx.Response(503, headers={"Retry-After": "5"})
    with pytest.raises(oidc.TransientProviderError):
        await client.revoke(META, client_id="cli", token=ACCESS)


async def test_userinfo(client: ProviderClient, fake: FakeProvider) -> None:
    fake.handler = lambda request: httpx.Response(200, json={"sub": "u1", "email": "a@b.test"})
    claims = await client.userinfo(META, ACCESS, subject="u1")
    sent = fake.requests[-1]
    assert sent.method == "GET" and sent.headers["authorization"] == f"Bearer {ACCESS}"
    assert sent.content == b"" and claims["email"] == "a@b.test"
    assert await client.userinfo(oidc.userinfo_request(META, ACCESS)) == claims
    with pytest.raises(oidc.MalformedResponse, match="another subject"):
        await client.userinfo(META, ACCESS, subject="u2")
    fake.handler = lambda request: httpx.Response(
        401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    with pytest.raises(oidc.OAuthError) as caught:
        await client.userinfo(META, ACCESS)
    assert caught.value.error == "invalid_token" and caught.value.status == 401


async def test_nothing_httpx_escapes_the_edge(client: ProviderClient, fake: FakeProvider) -> None:
    failures: list[Exception] = [
        httpx.ConnectError("x"), httpx.ReadTimeout("x"), httpx.RemoteProtocolError("x"),
        httpx.DecodingError("x"), httpx.TooManyRedirects("x"), httpx.TransportError("x"),
    ]
    for failure in failures:
        def handler(request: httpx.Request, failure: Exception = failure) -> httpx.Response:
            raise failure

        fake.handler = handler
        with pytest.raises(oidc.OAuthFailure) as caught:
            await client.discover(ISSUER)
        assert not isinstance(caught.value, httpx.HTTPError)


def test_the_public_api_is_exported() -> None:
    assert all(hasattr(http, name) for name in http.__all__)
    assert http.ProviderUnreachable is oidc.ProviderUnreachable
