"""The test providers do what the agent's tests rely on.

The real one (node oidc-provider): discovery, the device flow and the browser
flow completed by the person helpers, refresh-token rotation and reuse
detection, revocation, introspection, resource-restricted tokens, and the
event log that counts calls. The fake one: each scripted fault, over plain httpx.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest

from support.fake_provider import (
    DEVICE_AUTHORIZATION,
    DISCOVERY,
    REVOCATION,
    TOKEN,
    Behaviour,
    FakeProvider,
    run_fake_provider_in_thread,
)
from support.provider import (
    DEVICE_CODE_GRANT,
    OidcTestProvider,
    ProviderFactory,
    approve_device,
    complete_browser_login,
    deny_browser_login,
    deny_device,
)

LOGIN_SCOPE = "openid profile email offline_access compozy:read compozy:write"


def claims_of(jwt: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (the tests only read what the provider put in)."""
    payload = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# The real provider.


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcTestProvider]:
    """This module's own provider: its refused refreshes stay out of the session provider's
    counts, which other modules read."""
    with OidcTestProvider.start() as started:
        yield started


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


def device_login(
    provider: OidcTestProvider, http: httpx.Client, scope: str = LOGIN_SCOPE
) -> dict[str, Any]:
    """A device flow approved by the person; the token response."""
    started = http.post(
        provider.device_authorization_endpoint,
        data={"client_id": provider.client_id, "scope": scope, "resource": provider.api},
    )
    assert started.status_code == 200, started.text
    device = started.json()
    approve_device(device["verification_uri_complete"])
    tokens = http.post(
        provider.token_endpoint,
        data={
            "client_id": provider.client_id,
            "grant_type": DEVICE_CODE_GRANT,
            "device_code": device["device_code"],
        },
    )
    assert tokens.status_code == 200, tokens.text
    answer: dict[str, Any] = tokens.json()
    return answer


def refresh(
    provider: OidcTestProvider, http: httpx.Client, refresh_token: str, **extra: str
) -> httpx.Response:
    return http.post(
        provider.token_endpoint,
        data={
            "client_id": provider.client_id,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            **extra,
        },
    )


def authorization_url(
    provider: OidcTestProvider, redirect_uri: str, challenge: str, state: str, **extra: str
) -> str:
    params = {
        "client_id": provider.client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": LOGIN_SCOPE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
        "resource": provider.api,
        **extra,
    }
    return f"{provider.authorization_endpoint}?{urlencode(params)}"


@pytest.mark.real_provider
def test_discovery_names_every_endpoint_the_agent_uses(
    oidc_provider: OidcTestProvider, http: httpx.Client
) -> None:
    metadata = http.get(f"{oidc_provider.issuer}/.well-known/openid-configuration").json()
    assert metadata["issuer"] == oidc_provider.issuer
    assert metadata["token_endpoint"] == oidc_provider.token_endpoint
    assert metadata["device_authorization_endpoint"] == oidc_provider.device_authorization_endpoint
    assert metadata["revocation_endpoint"] == oidc_provider.revocation_endpoint
    assert metadata["introspection_endpoint"] == oidc_provider.introspection_endpoint
    assert metadata["authorization_endpoint"] == oidc_provider.authorization_endpoint
    assert metadata["userinfo_endpoint"].startswith(oidc_provider.issuer)
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert set(oidc_provider.scopes) <= set(metadata["scopes_supported"])
    assert DEVICE_CODE_GRANT in metadata["grant_types_supported"]


@pytest.mark.real_provider
def test_device_flow_approved_by_the_person_yields_all_three_tokens(
    provider: OidcTestProvider, http: httpx.Client
) -> None:
    started = http.post(
        provider.device_authorization_endpoint,
        data={"client_id": provider.client_id, "scope": LOGIN_SCOPE},
    ).json()
    assert started["interval"] == 1
    poll = {
        "client_id": provider.client_id,
        "grant_type": DEVICE_CODE_GRANT,
        "device_code": started["device_code"],
    }
    pending = http.post(provider.token_endpoint, data=poll)
    assert (pending.status_code, pending.json()["error"]) == (400, "authorization_pending")

    # The person types the code on the plain verification page this time.
    page = approve_device((started["verification_uri"], started["user_code"]))
    assert "Device connected" in page

    tokens = http.post(provider.token_endpoint, data=poll).json()
    assert {"access_token", "refresh_token", "id_token"} <= set(tokens)
    assert tokens["token_type"].lower() == "bearer" and tokens["expires_in"] > 3000
    identity = claims_of(tokens["id_token"])
    assert identity["iss"] == provider.issuer
    assert identity["aud"] == provider.client_id
    assert (identity["sub"], identity["email"], identity["name"]) == (
        "alice",
        "alice@example.test",
        "Alice Example",
    )
    # The opaque access token is good at userinfo and active at introspection.
    me = http.get(
        f"{provider.issuer}/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert me.json()["email"] == "alice@example.test"
    introspected = http.post(
        provider.introspection_endpoint,
        data={"client_id": provider.client_id, "token": tokens["access_token"]},
    ).json()
    assert introspected["active"] is True and introspected["sub"] == "alice"


@pytest.mark.real_provider
def test_device_flow_denied_by_the_person(provider: OidcTestProvider, http: httpx.Client) -> None:
    started = http.post(
        provider.device_authorization_endpoint,
        data={"client_id": provider.client_id, "scope": LOGIN_SCOPE},
    ).json()
    deny_device(started["verification_uri_complete"])
    answer = http.post(
        provider.token_endpoint,
        data={
            "client_id": provider.client_id,
            "grant_type": DEVICE_CODE_GRANT,
            "device_code": started["device_code"],
        },
    )
    assert (answer.status_code, answer.json()["error"]) == (400, "access_denied")


@pytest.mark.real_provider
def test_refresh_rotates_and_a_spent_token_is_refused_and_revokes_the_grant(
    provider: OidcTestProvider, http: httpx.Client
) -> None:
    first = device_login(provider, http)["refresh_token"]
    rotated = refresh(provider, http, first)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["refresh_token"]
    assert second != first

    reused = refresh(provider, http, first)
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    # Reuse detection (RFC 9700 4.14.2): spending a rotated token ends the whole grant,
    # so an agent that refreshes twice at once loses the session.
    after_reuse = refresh(provider, http, second)
    assert after_reuse.json()["error"] == "invalid_grant"


@pytest.mark.real_provider
def test_a_revoked_refresh_token_is_refused(provider: OidcTestProvider, http: httpx.Client) -> None:
    refresh_token = device_login(provider, http)["refresh_token"]
    revocations = provider.count("revocation", status=200)
    revoked = http.post(
        provider.revocation_endpoint,
        data={
            "client_id": provider.client_id,
            "token": refresh_token,
            "token_type_hint": "refresh_token",
        },
    )
    assert revoked.status_code == 200
    assert provider.count("revocation", status=200) == revocations + 1
    refused = refresh(provider, http, refresh_token)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")


@pytest.mark.real_provider
def test_refresh_for_the_api_resource_gives_an_audience_restricted_jwt(
    provider: OidcTestProvider, http: httpx.Client
) -> None:
    refresh_token = device_login(provider, http)["refresh_token"]
    narrowed = refresh(provider, http, refresh_token, resource=provider.api, scope="compozy:read")
    assert narrowed.status_code == 200, narrowed.text
    access = claims_of(narrowed.json()["access_token"])
    assert access["aud"] == provider.api
    assert access["scope"] == "compozy:read"
    assert access["client_id"] == provider.client_id and access["sub"] == "alice"
    assert access["exp"] - access["iat"] == 3600

    unknown = refresh(
        provider, http, narrowed.json()["refresh_token"], resource="https://elsewhere.test"
    )
    assert unknown.json()["error"] == "invalid_target"


@pytest.mark.real_provider
def test_browser_login_with_pkce_on_any_loopback_port(
    provider: OidcTestProvider, http: httpx.Client
) -> None:
    for _ in range(2):  # two logins, two different ports, one registered redirect URI
        redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        # prompt=login without consent: offline_access still yields a refresh token.
        url = authorization_url(provider, redirect_uri, challenge, state, prompt="login")
        callback = complete_browser_login(url)
        assert callback.startswith(f"{redirect_uri}?")
        answer = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
        assert answer["state"] == state and answer["iss"] == provider.issuer

        exchange = {
            "client_id": provider.client_id,
            "grant_type": "authorization_code",
            "code": answer["code"],
            "redirect_uri": redirect_uri,
        }
        wrong = http.post(provider.token_endpoint, data={**exchange, "code_verifier": "x" * 43})
        assert wrong.json()["error"] == "invalid_grant"
        # A failed PKCE check spends the code: log in once more for the real exchange.
        callback = complete_browser_login(url)
        answer = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
        tokens = http.post(
            provider.token_endpoint,
            data={**exchange, "code": answer["code"], "code_verifier": verifier},
        )
        assert tokens.status_code == 200, tokens.text
        assert {"access_token", "refresh_token", "id_token"} <= set(tokens.json())
        assert "offline_access" in tokens.json()["scope"].split()


@pytest.mark.real_provider
def test_browser_login_without_pkce_or_with_a_foreign_redirect_is_refused(
    provider: OidcTestProvider, http: httpx.Client
) -> None:
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    _, challenge = pkce_pair()
    plain = authorization_url(provider, redirect_uri, challenge, "s")
    without_pkce = plain.replace(f"&code_challenge={challenge}", "").replace(
        "&code_challenge_method=S256", ""
    )
    refused = http.get(without_pkce)
    assert refused.status_code == 303
    assert "error=invalid_request" in refused.headers["location"]
    assert refused.headers["location"].startswith(redirect_uri)

    foreign = authorization_url(provider, "http://127.0.0.1:8080/elsewhere", challenge, "s")
    page = http.get(foreign)  # never redirected to an unregistered URI: an error page instead
    assert page.status_code == 400 and "redirect_uri" in page.text


@pytest.mark.real_provider
def test_browser_login_denied_at_consent(provider: OidcTestProvider) -> None:
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    _, challenge = pkce_pair()
    callback = deny_browser_login(authorization_url(provider, redirect_uri, challenge, "st"))
    answer = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
    assert callback.startswith(redirect_uri)
    assert answer["error"] == "access_denied" and answer["state"] == "st"


@pytest.mark.real_provider
def test_the_event_log_counts_calls_and_holds_no_token(
    provider: OidcTestProvider, http: httpx.Client
) -> None:
    before_refreshes = provider.count_token_calls("refresh_token")
    before_all = provider.count_token_calls()
    before_devices = provider.count("device_authorization")
    tokens = device_login(provider, http)
    current = tokens["refresh_token"]
    seen = [tokens["access_token"], current, tokens["id_token"]]
    for _ in range(3):
        answer = refresh(provider, http, current).json()
        current = answer["refresh_token"]
        seen += [answer["access_token"], current]
    refresh(provider, http, "not-a-refresh-token")

    # Counted at once: the count waits for the provider's lines up to now.
    assert provider.count_token_calls("refresh_token") == before_refreshes + 4
    assert provider.count_token_calls("refresh_token", status=200) >= 3
    assert provider.count_token_calls() == before_all + 5
    assert provider.count("device_authorization") == before_devices + 1
    failed = provider.events("token", status=400, error="invalid_grant")
    assert failed and failed[-1]["client_id"] == provider.client_id
    log = json.dumps(provider.events())
    assert not any(token in log for token in seen)


@pytest.mark.real_provider
def test_a_provider_of_ones_own_with_short_lived_access_tokens(
    oidc_provider_factory: ProviderFactory, http: httpx.Client
) -> None:
    provider = oidc_provider_factory(access_token_ttl=2, refresh_token_ttl=60)
    tokens = device_login(provider, http)
    assert tokens["expires_in"] == 2
    assert provider.count_token_calls() == 1
    again = refresh(provider, http, tokens["refresh_token"], resource=provider.api)
    access = claims_of(again.json()["access_token"])
    assert access["exp"] - access["iat"] == 2


# --------------------------------------------------------------------------
# The fake provider.


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as http_client:
        yield http_client


async def post_token(client: httpx.AsyncClient, fake: FakeProvider, **form: str) -> httpx.Response:
    return await client.post(
        fake.url(TOKEN), data={"grant_type": "refresh_token", "refresh_token": "rt-0", **form}
    )


@pytest.mark.anyio
async def test_fake_answers_and_rotates_by_default_and_records_requests(
    fake_provider: FakeProvider, client: httpx.AsyncClient
) -> None:
    metadata = (await client.get(fake_provider.url(DISCOVERY))).json()
    assert metadata["issuer"] == fake_provider.issuer
    assert metadata["token_endpoint"] == fake_provider.url(TOKEN)
    first = (await post_token(client, fake_provider)).json()
    second = (await post_token(client, fake_provider, refresh_token=first["refresh_token"])).json()
    assert (first["access_token"], first["refresh_token"], first["expires_in"]) == (
        "fake-at-1",
        "fake-rt-1",
        3600,
    )
    assert second["refresh_token"] == "fake-rt-2"
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-0", "fake-rt-1"]
    recorded = fake_provider.requests_to(TOKEN)[0]
    assert (recorded.method, recorded.path) == ("POST", TOKEN)
    assert recorded.headers["content-type"] == "application/x-www-form-urlencoded"


@pytest.mark.anyio
async def test_fake_scripted_success_shapes(
    fake_provider: FakeProvider, client: httpx.AsyncClient
) -> None:
    fake_provider.then(
        Behaviour(expires_in="3600"),
        Behaviour(expires_in=None, rotate=False),
        Behaviour("form", expires_in=60),
        Behaviour.ok(access_token="chosen", refresh_token="chosen-rt", scope="compozy:read"),
    )
    as_string = (await post_token(client, fake_provider)).json()
    assert as_string["expires_in"] == "3600"
    bare = (await post_token(client, fake_provider)).json()
    assert "expires_in" not in bare and "refresh_token" not in bare
    form = await post_token(client, fake_provider)
    assert form.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert parse_qs(form.text)["expires_in"] == ["60"]
    chosen = (await post_token(client, fake_provider)).json()
    assert (chosen["access_token"], chosen["refresh_token"], chosen["scope"]) == (
        "chosen",
        "chosen-rt",
        "compozy:read",
    )
    assert fake_provider.pending() == 0


@pytest.mark.anyio
async def test_fake_scripted_failures(
    fake_provider: FakeProvider, client: httpx.AsyncClient
) -> None:
    skewed = email.utils.formatdate(2_000_000_000, usegmt=True)
    fake_provider.then(
        Behaviour("status", status=503),
        Behaviour.failing(429, retry_after="90"),
        Behaviour("error", error="invalid_grant"),
        Behaviour.oauth_error("temporarily_unavailable", status=503),
        Behaviour("malformed"),
        Behaviour(date=skewed),
    )
    assert (await post_token(client, fake_provider)).status_code == 503
    limited = await post_token(client, fake_provider)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "90")
    grant = await post_token(client, fake_provider)
    assert (grant.status_code, grant.json()) == (400, {"error": "invalid_grant"})
    busy = await post_token(client, fake_provider)
    assert (busy.status_code, busy.json()["error"]) == (503, "temporarily_unavailable")
    broken = await post_token(client, fake_provider)
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        broken.json()
    dated = await post_token(client, fake_provider)
    assert dated.headers["date"] == skewed and dated.json()["access_token"] == "fake-at-1"


@pytest.mark.anyio
async def test_fake_hangs_and_resets(fake_provider: FakeProvider) -> None:
    fake_provider.then(Behaviour("hang"), Behaviour("reset"))
    async with httpx.AsyncClient(timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await post_token(impatient, fake_provider)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await post_token(impatient, fake_provider)
    assert len(fake_provider.refresh_requests()) == 2  # both recorded before the fault


@pytest.mark.anyio
async def test_fake_holds_answers_until_released(
    fake_provider: FakeProvider, client: httpx.AsyncClient
) -> None:
    fake_provider.then(Behaviour.hold(access_token="after-release"))
    answers: list[httpx.Response] = []

    async def ask() -> None:
        answers.append(await post_token(client, fake_provider))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ask)
        await fake_provider.arrived(1)
        assert fake_provider.holding == 1 and not answers
        fake_provider.release()
    assert answers[0].json()["access_token"] == "after-release"


@pytest.mark.anyio
async def test_fake_device_and_revocation_endpoints(
    fake_provider: FakeProvider, client: httpx.AsyncClient
) -> None:
    fake_provider.on(DEVICE_AUTHORIZATION, Behaviour("status", status=500))
    assert (await client.post(fake_provider.url(DEVICE_AUTHORIZATION))).status_code == 500
    device = (
        await client.post(fake_provider.url(DEVICE_AUTHORIZATION), data={"client_id": "cli"})
    ).json()
    assert device["verification_uri_complete"].endswith(f"user_code={device['user_code']}")
    fake_provider.then(Behaviour.oauth_error("authorization_pending"))
    poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]}
    pending = await client.post(fake_provider.url(TOKEN), data={**poll, "client_id": "cli"})
    assert pending.json()["error"] == "authorization_pending"
    done = (await client.post(fake_provider.url(TOKEN), data={**poll, "client_id": "cli"})).json()
    assert claims_of(done["id_token"])["aud"] == "cli"
    revoked = await client.post(
        fake_provider.url(REVOCATION), data={"token": "rt", "token_type_hint": "refresh_token"}
    )
    assert revoked.status_code == 200
    assert fake_provider.revocations() == [{"token": "rt", "token_type_hint": "refresh_token"}]


def test_fake_in_a_thread_serves_sync_tests() -> None:
    with run_fake_provider_in_thread() as (base_url, fake):
        fake.then(Behaviour("status", status=502), Behaviour("hang"))
        with httpx.Client(timeout=0.3) as sync_client:
            data = {"grant_type": "refresh_token", "refresh_token": "rt-0"}
            assert sync_client.post(f"{base_url}{TOKEN}", data=data).status_code == 502
            with pytest.raises(httpx.ReadTimeout):
                sync_client.post(f"{base_url}{TOKEN}", data=data)
            assert sync_client.post(f"{base_url}{TOKEN}", data=data).json()["access_token"] == (
                "fake-at-1"
            )
        assert fake.wait_for_requests(3, timeout=1.0)
        assert len(fake.refresh_requests()) == 3
