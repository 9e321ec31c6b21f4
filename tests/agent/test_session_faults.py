"""The session driver against a fault-injecting provider: it keeps working, loses nothing.

The driver runs in-process on a test clock; the provider is the aiohttp fake.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import RECENT, AccessToken, Secret, SessionLifecycle, State
from compozy_agent.manager import SessionManager
from compozy_agent.peer import Peer
from compozy_agent.sessions import Session
from compozy_agent.store import MemorySecrets, SessionStore, StoredSession
from compozy_client import protocol as p
from support.budget import EARLY_RETRY_SPACING, EARLY_RETRY_WINDOW, EXPIRY_MARGIN
from support.clock import T0, FakeClock
from support.driver import settle, while_advancing
from support.fake_provider import Behaviour, FakeProvider

pytestmark = pytest.mark.anyio
PEER = Peer(uid=0, gid=0, pid=None)


class FailingSecrets(MemorySecrets):
    """A keyring that refuses writes until told otherwise."""

    failing = True

    def put(self, key: str, value: str) -> None:
        if self.failing:
            raise OSError("keyring is locked")
        super().put(key, value)


@asynccontextmanager
async def running_manager(
    fake: FakeProvider, tmp_path: object, secrets: MemorySecrets | None = None,
    read_timeout: float = 0.5,
) -> AsyncIterator[tuple[SessionManager, FakeClock]]:
    """A manager on a fake clock with one session (refresh token ``rt-0``), scheduler running."""
    clock = FakeClock()
    store = SessionStore(str(tmp_path), secrets if secrets is not None else MemorySecrets())
    provider = ProviderClient(now=clock.now, timeout=read_timeout)
    manager = SessionManager(store, provider, clock=clock)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            await adopt(manager, fake, clock, lifetime=3600)
            yield manager, clock
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


@pytest.fixture
async def driver(
    fake_provider: FakeProvider, tmp_path: object
) -> AsyncIterator[tuple[SessionManager, FakeClock]]:
    async with running_manager(fake_provider, tmp_path) as pair:
        yield pair


async def adopt(
    manager: SessionManager, fake: FakeProvider, clock: FakeClock, lifetime: float
) -> Session:
    now = clock.now()
    meta = StoredSession(token_id="s1", profile="default", kind="oidc", issuer=fake.issuer,
                         client_id="cli", created_at=now)
    await manager.store.put_secret("s1", "refresh_token", "rt-0")
    lifecycle = SessionLifecycle(
        now, refresh_token="rt-0",
        access_token=AccessToken(Secret("login-at"), issued_at=now, expires_at=now + lifetime))
    session = Session(meta, lifecycle)
    await manager.logins.adopt(session)
    return session


def token_request(**fields: object) -> p.Token:
    return p.Token(id=1, **fields)  # type: ignore[arg-type]


async def test_transient_failure_keeps_serving_the_valid_token(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    fake_provider.then(Behaviour("status", status=503))
    clock.jump(3100)  # inside the refresh window (75-85 % of 3600 s), still valid
    result = await manager.token(token_request(), PEER)
    assert result.access_token == "login-at"  # answered at once; the refresh runs behind
    await settle(manager)
    assert len(fake_provider.refresh_requests()) == 1
    info = (await manager.sessions(None))[0]
    assert info.last_refresh_outcome is not None and "503" in info.last_refresh_outcome
    assert any("refreshing failed" in w for w in manager.warnings())


@pytest.mark.parametrize(
    "fault",
    [
        Behaviour("status", status=500),
        Behaviour("status", status=502),
        Behaviour("reset"),
        Behaviour("hang"),
        Behaviour("malformed"),
    ],
    ids=["500", "502", "reset", "timeout", "malformed"],
)
async def test_failure_without_a_valid_token_is_a_clear_refresh_failed(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider, fault: Behaviour
) -> None:
    manager, clock = driver
    # Failing for longer than a caller keeps the agent trying (lifecycle rule 8b).
    fake_provider.then(*[fault] * 20)
    clock.jump(4000)  # expired
    with pytest.raises(OpError) as caught:
        await while_advancing(clock, manager.token(token_request(), PEER))
    assert caught.value.code == "refresh_failed"
    assert "rt-0" not in caught.value.message
    # One attempt, then at most one a second ahead of the backoff, for the caller's window.
    attempts = len(fake_provider.refresh_requests())
    assert 2 <= attempts <= EARLY_RETRY_WINDOW / EARLY_RETRY_SPACING + 1
    # Nothing was lost: once the provider answers again, it works.
    fake_provider.scripts.clear()
    clock.jump(120)
    result = await manager.token(token_request(), PEER)
    assert result.access_token.startswith("fake-at-")
    assert fake_provider.refresh_requests()[-1]["refresh_token"] == "rt-0"


@pytest.mark.parametrize("fault", [Behaviour("status", status=503), Behaviour("reset")],
                         ids=["503", "reset"])
async def test_one_fault_costs_a_caller_without_a_valid_token_a_retry_not_a_failure(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider, fault: Behaviour
) -> None:
    """Issue 16, item 4: no valid token is left, the refresh fails once, the backoff says
    "later": the waiting caller gets an attempt ahead of it, a second later, and a token."""
    manager, clock = driver
    fake_provider.then(fault)
    clock.jump(4000)  # expired
    asked_at = clock.now()
    result = await while_advancing(clock, manager.token(token_request(), PEER))
    assert result.access_token == "fake-at-1"
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-0", "rt-0"]
    assert clock.now() - asked_at <= EARLY_RETRY_SPACING + 0.5  # spaced, and no more


async def test_429_retry_after_is_honoured(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    fake_provider.then(Behaviour("status", status=429, retry_after="90"))
    clock.jump(4000)
    with pytest.raises(OpError):
        await manager.token(token_request(), PEER)
    clock.jump(60)
    with pytest.raises(OpError) as caught:  # still inside Retry-After: no new request
        await manager.token(token_request(), PEER)
    assert caught.value.code == "refresh_failed"
    assert len(fake_provider.refresh_requests()) == 1
    clock.jump(31)
    assert (await manager.token(token_request(), PEER)).access_token == "fake-at-1"


@pytest.mark.parametrize(
    ("behaviour", "lifetime"),
    [
        (Behaviour(expires_in="120"), 120),
        (Behaviour(expires_in=None), 300),
        (Behaviour("form", expires_in=60), 60),
        (Behaviour(expires_in=90.5), 90.5),
    ],
    ids=["string", "missing", "form-encoded", "float"],
)
async def test_odd_but_valid_token_responses(
    driver: tuple[SessionManager, FakeClock],
    fake_provider: FakeProvider,
    behaviour: Behaviour,
    lifetime: float,
) -> None:
    manager, clock = driver
    fake_provider.then(behaviour)
    clock.jump(4000)
    result = await manager.token(token_request(), PEER)
    assert result.access_token == "fake-at-1"
    assert result.expires_at == pytest.approx(clock.now() + lifetime - EXPIRY_MARGIN, abs=0.01)


async def test_invalid_grant_requires_login_and_deletes_the_refresh_token(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    fake_provider.then(Behaviour("error", error="invalid_grant"))
    clock.jump(4000)
    with pytest.raises(OpError) as caught:
        await manager.token(token_request(), PEER)
    assert caught.value.code == "login_required"
    assert caught.value.details["command"] == "compozy login"
    assert await manager.store.get_secret("s1", "refresh_token") is None
    assert (await manager.sessions(None))[0].state == State.LOGIN_REQUIRED.value
    with pytest.raises(OpError):
        await manager.token(token_request(), PEER)
    assert len(fake_provider.refresh_requests()) == 1  # no retries against a dead grant


async def test_rotated_refresh_token_is_persisted_and_used(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    clock.jump(4000)
    await manager.token(token_request(), PEER)
    await settle(manager)  # the token is answered first; the write follows at once
    assert await manager.store.get_secret("s1", "refresh_token") == "fake-rt-1"
    clock.jump(4000)
    await manager.token(token_request(), PEER)
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-0", "fake-rt-1"]


async def test_keyring_failing_during_rotation_loses_nothing(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    secrets = FailingSecrets()
    secrets.failing = False
    async with running_manager(fake_provider, tmp_path, secrets) as (manager, clock):
        secrets.failing = True
        clock.jump(4000)
        assert (await manager.token(token_request(), PEER)).access_token == "fake-at-1"
        await settle(manager)
        assert any("could not be saved" in w for w in manager.warnings())
        assert await manager.store.get_secret("s1", "refresh_token") == "rt-0"
        # The rotated token lives on in memory: the next refresh spends it, not the old one.
        clock.jump(4000)
        assert (await manager.token(token_request(), PEER)).access_token == "fake-at-2"
        await settle(manager)
        assert fake_provider.refresh_requests()[-1]["refresh_token"] == "fake-rt-1"
        # Once the keyring works again, the scheduler's retried write saves the newest token.
        secrets.failing = False
        clock.advance(61)  # past the longest persist backoff after two failures
        session = manager.by_id["s1"]
        assert session.lifecycle is not None
        with anyio.fail_after(10):
            while session.lifecycle.status(clock.now()).unsaved_refresh_token:
                await session.changed.wait()
        assert await manager.store.get_secret("s1", "refresh_token") == "fake-rt-2"
        assert not any("could not be saved" in w for w in manager.warnings())


async def test_provider_clock_skew_is_measured(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    ahead = email.utils.formatdate(T0 + 4000 + 300, usegmt=True)
    fake_provider.then(Behaviour(date=ahead))
    clock.jump(4000)
    await manager.token(token_request(), PEER)
    skew = manager.clock_skew()
    assert skew is not None and 299 <= skew <= 301


async def test_invalid_grant_after_a_rotation_is_a_clear_login_required(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    """A provider that rotated, then (reuse detection after a lost answer, or revocation)
    rejects the newest token: login required, said clearly; the saved token was the newest."""
    manager, clock = driver
    clock.jump(4000)
    assert (await manager.token(token_request(), PEER)).access_token == "fake-at-1"
    await settle(manager)
    assert await manager.store.get_secret("s1", "refresh_token") == "fake-rt-1"
    # The next answer is lost on the way (the provider may have rotated again), then the
    # provider rejects the token we hold.
    fake_provider.then(Behaviour("reset"), Behaviour("error", error="invalid_grant"))
    clock.jump(4000)
    # The caller has no valid token: after the reset it keeps the agent trying (rule 8b),
    # and the very next attempt hears that the session is gone.
    with pytest.raises(OpError) as second:
        await while_advancing(clock, manager.token(token_request(), PEER))
    assert second.value.code == "login_required"
    assert "no longer accepts this session" in second.value.message
    assert second.value.details["command"] == "compozy login"
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == [
        "rt-0", "fake-rt-1", "fake-rt-1"]
    status = (await manager.sessions(None))[0]
    assert status.state == "login_required"
    assert status.last_refresh_outcome == "rejected: invalid_grant"


# ---------------------------------------------------------------------------
# Narrower tokens stay within the grant; forced refreshes are spaced (issue 10, items 7, 8)

API = "https://api.compozy.dev"


async def adopt_with_grant(manager: SessionManager, clock: FakeClock) -> Session:
    """A session whose login was granted openid, offline_access and compozy:read for ``API``."""
    now = clock.now()
    meta = StoredSession(token_id="g1", profile="granted", kind="oidc",
                         issuer=manager.by_id["s1"].meta.issuer, client_id="cli",
                         scopes=["openid", "offline_access", "compozy:read"], resources=[API],
                         created_at=now)
    await manager.store.put_secret("g1", "refresh_token", "rt-g")
    lifecycle = SessionLifecycle(
        now, refresh_token="rt-g",
        access_token=AccessToken(Secret("login-at-g"), issued_at=now, expires_at=now + 3600))
    session = Session(meta, lifecycle)
    await manager.logins.adopt(session)
    return session


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"audience": API + "/"},
         f"audience {API}/ was not granted to this session; granted: {API}"),
        ({"audience": API, "scope": ["compozy:deploy"]},
         "scope compozy:deploy was not granted to this session; "
         "granted: compozy:read offline_access openid"),
    ],
    ids=["audience", "scope"],
)
async def test_a_narrower_token_beyond_the_grant_never_reaches_the_provider(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider,
    fields: dict[str, object], message: str,
) -> None:
    manager, clock = driver
    await adopt_with_grant(manager, clock)
    for force_new in (False, True):
        with pytest.raises(OpError) as caught:
            await manager.token(token_request(profile="granted", force_new=force_new, **fields),
                                PEER)
        assert (caught.value.code, caught.value.message) == ("bad_request", message)
    assert fake_provider.refresh_requests() == []
    # Within the grant, the same session gets its narrower token.
    narrower = await manager.token(
        token_request(profile="granted", audience=API, scope=["compozy:read"]), PEER)
    assert narrower.access_token == "fake-at-1"
    assert [(r["refresh_token"], r.get("resource"), r.get("scope"))
            for r in fake_provider.refresh_requests()] == [("rt-g", API, "compozy:read")]


@pytest.mark.parametrize("error", ["invalid_scope", "invalid_target"])
async def test_a_provider_refusing_a_granted_narrower_token_does_not_end_the_session(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider, error: str
) -> None:
    """RFC 6749 section 5.2: invalid_scope and invalid_target speak of the request, not of
    the refresh token (that is invalid_grant). A provider that narrowed the grant since the
    login refuses a slot the agent thought granted: that slot fails, the session lives on,
    and the next refresh spends the same refresh token (this provider did not rotate it)."""
    manager, clock = driver
    session = await adopt_with_grant(manager, clock)
    fake_provider.then(Behaviour("error", error=error, rotate=False))
    with pytest.raises(OpError) as caught:
        await manager.token(token_request(profile="granted", audience=API), PEER)
    assert caught.value.code == "provider_error" and error in caught.value.message
    await settle(manager)
    assert session.lifecycle is not None
    assert session.lifecycle.refresh_token == Secret("rt-g")
    assert await manager.store.get_secret("g1", "refresh_token") == "rt-g"
    info = next(s for s in await manager.sessions("granted"))
    assert info.state == State.FRESH.value
    clock.jump(4000)  # the default token expired: the session refreshes as before
    result = await manager.token(token_request(profile="granted"), PEER)
    assert result.access_token.startswith("fake-at-")
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-g", "rt-g"]


async def test_a_burst_of_force_new_requests_makes_one_refresh_then_one_per_recent(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    clock.advance(60)  # the login's token is a minute old
    answers: list[str] = []

    async def force() -> None:
        answers.append((await manager.token(token_request(force_new=True), PEER)).access_token)

    async with anyio.create_task_group() as group:  # 100 at once...
        for _ in range(100):
            group.start_soon(force)
    for _ in range(100):  # ...then 100 more, one after another, 10 ms apart
        clock.advance(0.01)
        await force()
    assert len(answers) == 200 and set(answers) == {"fake-at-1"}
    assert len(fake_provider.refresh_requests()) == 1
    await settle(manager)
    assert await manager.store.get_secret("s1", "refresh_token") == "fake-rt-1"  # one write
    # `compozy auth refresh` is a forced refresh too.
    refreshed = await manager.refresh(p.Refresh(id=2))
    assert len(fake_provider.refresh_requests()) == 1
    session = manager.by_id["s1"]
    assert session.lifecycle is not None
    assert refreshed.expires_at == session.lifecycle.access_tokens()[0].expires_at
    # Until RECENT seconds after the forced token was issued, forces get that token...
    clock.advance(RECENT - 1.5)  # 1 s (100 x 10 ms) already passed
    await force()
    assert answers[-1] == "fake-at-1" and len(fake_provider.refresh_requests()) == 1
    # ...and after that, a force makes a new one.
    clock.advance(1.0)
    await force()
    assert answers[-1] == "fake-at-2"
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-0", "fake-rt-1"]


async def test_a_token_rejected_in_a_loop_is_replaced_once_per_recent(
    driver: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    """A client that gets 401s and reports each token rejected (the forwarding socket's only
    other way to force a refresh) makes one refresh per RECENT seconds, not one per call."""
    manager, clock = driver
    clock.advance(60)  # the login's token is a minute old
    token = (await manager.token(token_request(), PEER)).access_token
    token = (await manager.token(token_request(rejected_token=token), PEER)).access_token
    assert token == "fake-at-1"
    for _ in range(50):
        clock.advance(0.05)
        with pytest.raises(OpError) as caught:
            await manager.token(token_request(rejected_token=token), PEER)
        assert caught.value.code == "refresh_failed" and "ask again in" in caught.value.message
        assert token not in caught.value.message
        assert (await manager.token(token_request(), PEER)).access_token == token  # kept
    assert len(fake_provider.refresh_requests()) == 1
    clock.advance(RECENT)
    replaced = await manager.token(token_request(rejected_token=token), PEER)
    assert replaced.access_token == "fake-at-2"
    assert len(fake_provider.refresh_requests()) == 2


async def test_a_caller_that_waits_less_is_answered_before_it_gives_up(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    """Issue 16, item 3: a caller that says it waits 2 s hears from the agent within
    that, naming the provider and what the agent does, while the refresh goes on."""
    fake_provider.then(Behaviour("hold"))
    async with running_manager(fake_provider, tmp_path, read_timeout=5.0) as (manager, clock):
        clock.jump(4000)  # expired
        started = anyio.current_time()
        try:
            with pytest.raises(OpError) as caught:
                await manager.token(token_request(timeout=2.0), PEER)
            waited = anyio.current_time() - started
        finally:
            fake_provider.release()
        assert caught.value.code == "refresh_failed"
        assert 0.9 <= waited < 2.0  # ANSWER_MARGIN (1 s) before the caller's own 2 s
        host = fake_provider.issuer.split("://")[1]
        assert caught.value.message.startswith(
            f"the provider at {host} did not answer within")
        assert "keeps trying" in caught.value.message
        await settle(manager)
        assert (await manager.token(token_request(), PEER)).access_token == "fake-at-1"


def test_messages_name_the_provider_by_host_and_port_only() -> None:
    from compozy_agent.http import host_of

    assert host_of("https://user:pw-secret@auth.example:8443/t?k=v") == "auth.example:8443"
    assert host_of("http://[::1]:9/") == "[::1]:9"
    assert host_of("") == host_of("not a url") == "the provider"
