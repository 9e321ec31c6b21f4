"""The session driver against a fault-injecting provider: it keeps working, loses nothing.

The driver runs in-process on a test clock; the provider is the aiohttp fake.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator

import pytest

from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import AccessToken, SessionLifecycle, State
from compozy_agent.peer import Peer
from compozy_agent.sessions import Session, SessionManager
from compozy_agent.store import MemorySecrets, SessionStore, StoredSession
from compozy_client import protocol as p
from support.fake_provider import Behaviour, FakeProvider

pytestmark = pytest.mark.anyio
PEER = Peer(uid=0, gid=0, pid=None)
T0 = 1_800_000_000.0


class SteppedClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FailingSecrets(MemorySecrets):
    """A keyring that refuses writes until told otherwise."""

    failing = True

    def put(self, key: str, value: str) -> None:
        if self.failing:
            raise OSError("keyring is locked")
        super().put(key, value)


@pytest.fixture
async def driver(
    fake_provider: FakeProvider, tmp_path: object
) -> AsyncIterator[tuple[SessionManager, SteppedClock]]:
    clock = SteppedClock()
    store = SessionStore(str(tmp_path), MemorySecrets())
    provider = ProviderClient(now=clock, timeout=0.5)
    manager = SessionManager(store, provider, now=clock)
    await adopt(manager, fake_provider, clock, lifetime=3600)
    yield manager, clock
    await provider.aclose()


async def adopt(
    manager: SessionManager, fake: FakeProvider, clock: SteppedClock, lifetime: float
) -> Session:
    meta = StoredSession(
        token_id="s1",
        profile="default",
        kind="oidc",
        issuer=fake.issuer,
        client_id="cli",
        created_at=clock.now,
    )
    lifecycle = SessionLifecycle(has_refresh_token=True)
    lifecycle.install(
        clock.now, AccessToken("login-at", issued_at=clock.now, expires_at=clock.now + lifetime)
    )
    session = Session(meta, lifecycle, refresh_token="rt-0")
    await manager._adopt(session)
    return session


def token_request(**fields: object) -> p.Token:
    return p.Token(id=1, **fields)  # type: ignore[arg-type]


async def test_transient_failure_keeps_serving_the_valid_token(
    driver: tuple[SessionManager, SteppedClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    fake_provider.then(Behaviour("status", status=503))
    clock.now += 3000  # inside the refresh window, still valid
    result = await manager.token(token_request(min_valid=1200), PEER)
    assert result.access_token == "login-at"
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
    driver: tuple[SessionManager, SteppedClock], fake_provider: FakeProvider, fault: Behaviour
) -> None:
    manager, clock = driver
    fake_provider.then(fault)
    clock.now += 4000  # expired
    with pytest.raises(OpError) as caught:
        await manager.token(token_request(), PEER)
    assert caught.value.code == "refresh_failed"
    assert "rt-0" not in caught.value.message
    # Nothing was lost: once the provider answers again (after the backoff), it works.
    clock.now += 120
    result = await manager.token(token_request(), PEER)
    assert result.access_token.startswith("fake-at-")
    assert fake_provider.refresh_requests()[-1]["refresh_token"] == "rt-0"


async def test_429_retry_after_is_honoured(
    driver: tuple[SessionManager, SteppedClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    fake_provider.then(Behaviour("status", status=429, retry_after="90"))
    clock.now += 4000
    with pytest.raises(OpError):
        await manager.token(token_request(), PEER)
    clock.now += 60
    with pytest.raises(OpError) as caught:  # still inside Retry-After: no new request
        await manager.token(token_request(), PEER)
    assert caught.value.code == "refresh_failed"
    assert len(fake_provider.refresh_requests()) == 1
    clock.now += 31
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
    driver: tuple[SessionManager, SteppedClock],
    fake_provider: FakeProvider,
    behaviour: Behaviour,
    lifetime: float,
) -> None:
    manager, clock = driver
    fake_provider.then(behaviour)
    clock.now += 4000
    result = await manager.token(token_request(), PEER)
    assert result.access_token == "fake-at-1"
    assert result.expires_at == pytest.approx(clock.now + lifetime)


async def test_invalid_grant_requires_login_and_deletes_the_refresh_token(
    driver: tuple[SessionManager, SteppedClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    fake_provider.then(Behaviour("error", error="invalid_grant"))
    clock.now += 4000
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
    driver: tuple[SessionManager, SteppedClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    clock.now += 4000
    await manager.token(token_request(), PEER)
    assert await manager.store.get_secret("s1", "refresh_token") == "fake-rt-1"
    clock.now += 4000
    await manager.token(token_request(), PEER)
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-0", "fake-rt-1"]


async def test_keyring_failing_during_rotation_loses_nothing(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    clock = SteppedClock()
    secrets = FailingSecrets()
    secrets.failing = False
    provider = ProviderClient(now=clock, timeout=0.5)
    manager = SessionManager(SessionStore(str(tmp_path), secrets), provider, now=clock)
    await adopt(manager, fake_provider, clock, lifetime=3600)
    secrets.failing = True
    try:
        clock.now += 4000
        assert (await manager.token(token_request(), PEER)).access_token == "fake-at-1"
        assert any("could not be saved" in w for w in manager.warnings())
        # The rotated token lives on in memory: the next refresh spends it, not the old one.
        clock.now += 4000
        assert (await manager.token(token_request(), PEER)).access_token == "fake-at-2"
        assert fake_provider.refresh_requests()[-1]["refresh_token"] == "fake-rt-1"
        # Once the keyring works again, the retried write saves the newest token.
        secrets.failing = False
        session = manager.by_id["s1"]
        clock.now += 31
        assert session.lifecycle is not None and session.lifecycle.persist_retry_due(clock.now)
        await manager._persist_rotated(session)
        assert await manager.store.get_secret("s1", "refresh_token") == "fake-rt-2"
        assert not any("could not be saved" in w for w in manager.warnings())
    finally:
        await provider.aclose()


async def test_provider_clock_skew_is_measured(
    driver: tuple[SessionManager, SteppedClock], fake_provider: FakeProvider
) -> None:
    manager, clock = driver
    ahead = email.utils.formatdate(T0 + 4000 + 300, usegmt=True)
    fake_provider.then(Behaviour(date=ahead))
    clock.now += 4000
    await manager.token(token_request(), PEER)
    skew = manager.clock_skew()
    assert skew is not None and 299 <= skew <= 301
