"""The browser login's checks and limits, in-process against fake providers.

Mix-up (RFC 9207 ``iss``), the OIDC ``nonce`` and userinfo's ``sub``; one
pending login per profile, a global cap, and a login that ends with the
connection that started it. Each test plays the attacker or the fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.logins import MAX_LOGINS, Login
from compozy_agent.manager import SessionManager
from compozy_agent.store import MemorySecrets, SessionStore
from compozy_client import protocol as p
from support.clock import FakeClock
from support.fake_provider import TOKEN, Behaviour, FakeProvider

pytestmark = pytest.mark.anyio
CLIENT_ID = "compozy-cli"


@asynccontextmanager
async def manager_for(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SessionManager]:
    provider = ProviderClient(now=clock.now, timeout=5.0)
    manager = SessionManager(SessionStore(str(tmp_path), MemorySecrets()), provider,
                             clock=clock)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            yield manager
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeProvider]:
    async with FakeProvider(now=clock.now) as provider:
        yield provider


@pytest.fixture
async def manager(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SessionManager]:
    async with manager_for(tmp_path, clock) as running:
        yield running


def start_request(issuer: str, profile: str = "default") -> p.LoginStart:
    return p.LoginStart(id=1, profile=profile, flow="browser", issuer=issuer,
                        client_id=CLIENT_ID, scope=["openid", "email", "offline_access"])


async def browse(url: str) -> httpx.Response:
    """The person's browser: follow every redirect, to the loopback callback and its page."""
    async with httpx.AsyncClient(follow_redirects=True, timeout=10.0) as browser:
        return await browser.get(url)


async def wait_for(manager: SessionManager, login_id: str) -> p.LoginWaitResult:
    with anyio.fail_after(10):
        return await manager.login_wait(p.LoginWait(id=2, login_id=login_id, timeout=10))


def port_of(started: p.LoginStartResult) -> int:
    assert started.authorization_url is not None
    redirect = parse_qs(urlsplit(started.authorization_url).query)["redirect_uri"][0]
    port = urlsplit(redirect).port
    assert port is not None
    return port


async def listening(port: int) -> bool:
    """Whether a listener answers on ``port``. A whole request, not a bare connect: a
    connection still unaccepted when its server closes would leak (CPython 3.11 asyncio)."""
    async with httpx.AsyncClient() as client:
        try:
            await client.get(f"http://127.0.0.1:{port}/")
        except httpx.ConnectError:
            return False
    return True


async def released(login: Login) -> None:
    with anyio.fail_after(10):
        await login.released.wait()


# ---------------------------------------------------------------- mix-up, nonce, sub


async def test_a_mix_up_attacker_gets_no_code_and_no_verifier(
    manager: SessionManager, fake: FakeProvider, clock: FakeClock
) -> None:
    """RFC 9207: a malicious issuer configured for one profile sends the browser on to the
    honest provider with the same request; the honest provider's response (its code, its
    ``iss``) comes back to the login the agent started with the attacker. Refused: the
    code and the PKCE verifier go to nobody's token endpoint."""
    async with FakeProvider(now=clock.now) as attacker:
        attacker.relay_authorization_to = fake.url("/auth")
        started = await manager.login_start(start_request(attacker.issuer, "evil"))
        page = await browse(started.authorization_url or "")
        assert len(fake.requests_to("/auth")) == 1  # the person did log in at the honest one
        assert page.status_code == 400 and "another issuer" in page.text
        with pytest.raises(OpError) as caught:
            await wait_for(manager, started.login_id)
        assert caught.value.code == "login_failed"
        assert "another issuer" in caught.value.message
        assert "no code was exchanged" in caught.value.message
        assert attacker.requests_to(TOKEN) == [] and fake.requests_to(TOKEN) == []
    assert await manager.sessions(None) == []


@pytest.mark.parametrize(
    ("overrides", "advertised"),
    [({"iss": "https://another.example.test"}, True),
     ({"iss": "https://another.example.test"}, False),
     ({"iss": None}, True)],
    ids=["another-iss", "another-iss-not-advertised", "no-iss-though-advertised"],
)
async def test_a_callback_with_a_wrong_or_missing_iss_is_refused(
    manager: SessionManager, fake: FakeProvider, overrides: dict[str, str | None],
    advertised: bool
) -> None:
    fake.callback_overrides = overrides
    fake.advertises_iss = advertised
    started = await manager.login_start(start_request(fake.issuer))
    await browse(started.authorization_url or "")
    with pytest.raises(OpError, match="another issuer"):
        await wait_for(manager, started.login_id)
    assert fake.requests_to(TOKEN) == []


async def test_the_login_sends_a_nonce_and_checks_it_in_the_id_token(
    manager: SessionManager, fake: FakeProvider
) -> None:
    started = await manager.login_start(start_request(fake.issuer))
    query = parse_qs(urlsplit(started.authorization_url or "").query)
    assert len(query["nonce"][0]) >= 43  # 32 random octets (OIDC Core 15.5.2)
    await browse(started.authorization_url or "")
    done = await wait_for(manager, started.login_id)
    assert done.session is not None and done.session.account == "alice@example.test"

    for nonce in ("another-logins-nonce", None):
        fake.then(Behaviour.ok(id_token=fake.id_token(CLIENT_ID, nonce)))
        started = await manager.login_start(start_request(fake.issuer, "second"))
        await browse(started.authorization_url or "")
        with pytest.raises(OpError, match="nonce does not match"):
            await wait_for(manager, started.login_id)
    assert [s.profile for s in await manager.sessions(None)] == ["default"]


async def test_userinfo_about_another_subject_is_not_used(
    manager: SessionManager, fake: FakeProvider
) -> None:
    """OIDC Core 5.3.2: the ID token names only a sub, so the agent asks userinfo for a
    name; an answer about someone else must not name the session."""
    fake.claims = {"sub": "alice"}
    fake.userinfo_claims = {"sub": "mallory", "email": "mallory@example.test"}
    started = await manager.login_start(start_request(fake.issuer))
    await browse(started.authorization_url or "")
    done = await wait_for(manager, started.login_id)
    assert done.session is not None
    assert (done.session.subject, done.session.account) == ("alice", "alice")
    assert len(fake.requests_to("/me")) == 1

    fake.userinfo_claims = {"sub": "alice", "email": "alice@example.test"}
    started = await manager.login_start(start_request(fake.issuer))
    await browse(started.authorization_url or "")
    done = await wait_for(manager, started.login_id)
    assert done.session is not None and done.session.account == "alice@example.test"


async def test_a_refresh_whose_id_token_names_another_subject_ends_the_session(
    manager: SessionManager, fake: FakeProvider, clock: FakeClock
) -> None:
    """OIDC Core 12.2: an ID token from a refresh MUST name the login's ``iss`` and
    ``sub`` (it needs no nonce). A refresh answered with someone else's ID token was
    taken, and their access token handed out under alice's name; now the session needs a
    new login and the token is never given out."""
    started = await manager.login_start(start_request(fake.issuer))
    await browse(started.authorization_url or "")
    done = await wait_for(manager, started.login_id)
    assert done.session is not None and done.session.subject == "alice"

    # A refresh ID token without a nonce, about alice: the usual case, refreshed fine.
    clock.advance(10)  # past the spacing of forced refreshes (the login's token counts)
    fake.then(Behaviour.ok(access_token="alices-token", id_token=fake.id_token(CLIENT_ID)))
    await manager.refresh(p.Refresh(id=3))
    assert len(fake.refresh_requests()) == 1
    assert (await manager.sessions(None))[0].state == "fresh"

    clock.advance(10)
    fake.claims = {**fake.claims, "sub": "mallory", "email": "mallory@example.test"}
    fake.then(Behaviour.ok(access_token="mallorys-token", id_token=fake.id_token(CLIENT_ID)))
    with pytest.raises(OpError) as caught:
        await manager.refresh(p.Refresh(id=4))
    assert caught.value.code == "login_required"
    assert "another subject" in caught.value.message
    [session] = await manager.sessions(None)
    assert (session.state, session.subject, session.account) == (
        "login_required", "alice", "alice@example.test")
    assert len(fake.refresh_requests()) == 2


# ---------------------------------------------------------------- limits


async def test_a_second_login_for_a_profile_replaces_the_first(
    manager: SessionManager, fake: FakeProvider
) -> None:
    first = await manager.login_start(start_request(fake.issuer))
    first_login = manager.logins[first.login_id]
    assert await listening(port_of(first))
    async with anyio.create_task_group() as group:
        outcome: list[OpError] = []

        async def wait_first() -> None:
            with pytest.raises(OpError) as caught:
                await wait_for(manager, first.login_id)
            outcome.append(caught.value)

        group.start_soon(wait_first)
        await anyio.wait_all_tasks_blocked()
        second = await manager.login_start(start_request(fake.issuer))
    assert "a newer login for profile 'default' replaced this one" in outcome[0].message
    await released(first_login)
    assert not await listening(port_of(first))
    assert list(manager.logins) == [second.login_id]
    await browse(second.authorization_url or "")
    assert (await wait_for(manager, second.login_id)).state == "done"


async def test_logins_are_capped_and_the_cap_says_so(
    manager: SessionManager, fake: FakeProvider
) -> None:
    for _ in range(50):  # one profile, asked for again and again: one login held
        await manager.login_start(start_request(fake.issuer))
    assert len(manager.logins) == 1
    for number in range(1, MAX_LOGINS):
        await manager.login_start(start_request(fake.issuer, f"p{number}"))
    assert len(manager.logins) == MAX_LOGINS
    with pytest.raises(OpError) as caught:
        await manager.login_start(start_request(fake.issuer, "one-too-many"))
    assert caught.value.code == "busy"
    assert f"{MAX_LOGINS} logins are already in progress" in caught.value.message
    assert len(manager.logins) == MAX_LOGINS
    # A finished login nobody collected makes room.
    some = next(iter(manager.logins.values()))
    started = await manager.login_start(start_request(fake.issuer, some.profile))
    await browse(started.authorization_url or "")
    with anyio.fail_after(10):
        await manager.logins[started.login_id].done.wait()
    assert (await manager.login_start(start_request(fake.issuer, "now-there-is-room"))).login_id


async def test_a_login_ends_with_the_connection_that_started_it(
    manager: SessionManager, fake: FakeProvider
) -> None:
    connection, other_connection = object(), object()
    mine = await manager.login_start(start_request(fake.issuer), connection)
    theirs = await manager.login_start(start_request(fake.issuer, "other"), other_connection)
    login = manager.logins[mine.login_id]
    assert await listening(port_of(mine))
    manager.connection_closed(connection)
    await released(login)
    assert not await listening(port_of(mine))
    assert login.error is not None and "connection that started it closed" in login.error.message
    assert list(manager.logins) == [theirs.login_id] and await listening(port_of(theirs))
    with pytest.raises(OpError) as caught:
        await wait_for(manager, mine.login_id)
    assert caught.value.code == "unknown_login"
