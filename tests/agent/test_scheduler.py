"""The driver's scheduler on a fake clock: refreshes come by themselves, on time, and an
idle agent does not wake. Below, scheduler.py alone on the fake clock."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from compozy_agent.clock import MAX_SLEEP
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import AccessToken, Secret, SessionLifecycle
from compozy_agent.manager import SessionManager
from compozy_agent.scheduler import Scheduler
from compozy_agent.sessions import REFRESHES_AT_ONCE, Session
from compozy_agent.store import MemorySecrets, SessionStore, StoredSession
from support.clock import T0, FakeClock
from support.driver import settle
from support.fake_provider import Behaviour, FakeProvider

pytestmark = pytest.mark.anyio
LIFETIME = 3600.0


@pytest.fixture
async def manager(
    fake_provider: FakeProvider, tmp_path: object
) -> AsyncIterator[tuple[SessionManager, FakeClock]]:
    clock = FakeClock()
    provider = ProviderClient(now=clock.now, timeout=2)
    manager = SessionManager(SessionStore(str(tmp_path), MemorySecrets()), provider, clock=clock)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            yield manager, clock
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


async def add_session(manager: SessionManager, fake: FakeProvider, clock: FakeClock,
                      number: int) -> Session:
    now = clock.now()
    token_id = f"s{number}"
    meta = StoredSession(token_id=token_id, profile=f"p{number}", kind="oidc",
                         issuer=fake.issuer, client_id="cli", created_at=now)
    await manager.store.put_secret(token_id, "refresh_token", f"rt-{number}")
    lifecycle = SessionLifecycle(now, refresh_token=f"rt-{number}", access_token=AccessToken(
        Secret(f"at-{number}"), issued_at=now, expires_at=now + LIFETIME))
    session = Session(meta, lifecycle)
    await manager.logins.adopt(session)
    return session


async def run_time(clock: FakeClock, seconds: float, step: float = 30.0) -> None:
    """Let ``seconds`` pass in steps, letting the agent run between them."""
    for _ in range(int(seconds // step)):
        clock.advance(step)
        await anyio.wait_all_tasks_blocked()


async def test_a_session_is_refreshed_by_itself_inside_its_window(
    manager: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    agent, clock = manager
    session = await add_session(agent, fake_provider, clock, 1)
    await run_time(clock, 0.70 * LIFETIME)  # before the 75-85 % window
    assert fake_provider.refresh_requests() == []
    await run_time(clock, 0.20 * LIFETIME)  # through the window (and its 60 s sleep cap)
    await settle(agent)
    assert [r["refresh_token"] for r in fake_provider.refresh_requests()] == ["rt-1"]
    assert session.lifecycle is not None
    status = session.lifecycle.status(clock.now())
    assert status.state.value == "fresh" and status.last_refresh_outcome is not None


async def test_many_idle_sessions_cost_no_wakeups_until_the_first_is_due(
    manager: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    agent, clock = manager
    for number in range(200):
        await add_session(agent, fake_provider, clock, number)
    await anyio.wait_all_tasks_blocked()
    woken = agent.scheduler.wakeups
    await run_time(clock, 0.70 * LIFETIME, step=60.0)
    # One wake-up per capped 60 s slice at most, whatever the number of sessions.
    assert agent.scheduler.wakeups - woken <= 0.70 * LIFETIME / 60 + 1
    assert fake_provider.refresh_requests() == []
    assert len(agent.scheduler._heap) <= 4 * len(agent.by_id) + 64  # stale entries are compacted


async def test_a_stepped_wall_clock_is_noticed_within_one_sleep_slice(
    manager: tuple[SessionManager, FakeClock], fake_provider: FakeProvider
) -> None:
    agent, clock = manager
    await add_session(agent, fake_provider, clock, 1)
    await anyio.wait_all_tasks_blocked()
    clock.jump(LIFETIME)  # the laptop slept through the refresh window and past expiry
    await anyio.wait_all_tasks_blocked()
    assert fake_provider.refresh_requests() == []  # asleep: the monotonic slice has not ended
    await run_time(clock, 60.0, step=60.0)
    await settle(agent)
    assert len(fake_provider.refresh_requests()) == 1


async def test_restoring_many_sessions_refreshes_a_bounded_number_at_once(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    """1,000 restored sessions must not open 1,000 requests at once: they would exhaust
    the connection pool (found by bench/idle_cost.py) and the store's call queue."""
    count = 3 * REFRESHES_AT_ONCE
    clock = FakeClock()
    store = SessionStore(str(tmp_path), MemorySecrets())
    metas = [StoredSession(token_id=f"s{n}", profile=f"p{n}", kind="oidc",
                           issuer=fake_provider.issuer, client_id="cli", created_at=clock.now())
             for n in range(count)]
    store.save(metas)
    for n in range(count):
        await store.put_secret(f"s{n}", "refresh_token", f"rt-{n}")
    fake_provider.then(*[Behaviour.hold() for _ in range(count)])
    provider = ProviderClient(now=clock.now, timeout=30)
    manager = SessionManager(store, provider, clock=clock)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            await fake_provider.arrived(REFRESHES_AT_ONCE)
            await anyio.wait_all_tasks_blocked()
            # The rest wait for a slot: none of them has sent anything.
            queued = manager.driver._refresh_slots.statistics().tasks_waiting
            assert queued == count - REFRESHES_AT_ONCE
            assert len(fake_provider.refresh_requests()) == REFRESHES_AT_ONCE
            fake_provider.release()
            await fake_provider.arrived(count)
            await settle(manager)
            states = {s.lifecycle.status(clock.now()).state.value
                      for s in manager.by_id.values() if s.lifecycle is not None}
            assert states == {"fresh"}
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()
    # Every rotated refresh token was saved, none failed on a full store queue.
    saved = {await store.get_secret(f"s{n}", "refresh_token") for n in range(count)}
    assert all(value is not None and value.startswith("fake-rt-") for value in saved)
    assert len(saved) == count


class GatedSecrets(MemorySecrets):
    """A secret store whose writes wait for the test, as a slow keyring's do."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key: str, value: str) -> None:
        assert self.gate.wait(10), "the test never opened the gate"
        super().put(key, value)


async def test_many_rotations_queue_for_a_slow_store_instead_of_failing(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    """The store fails calls at once when 16 wait behind a stuck one (MAX_WAITING_CALLS);
    rotations of many sessions must queue in the agent, not fail there."""
    count = 3 * REFRESHES_AT_ONCE
    clock = FakeClock()
    secrets = GatedSecrets()
    store = SessionStore(str(tmp_path), secrets)
    store.save([StoredSession(token_id=f"s{n}", profile=f"p{n}", kind="oidc",
                              issuer=fake_provider.issuer, client_id="cli",
                              created_at=clock.now()) for n in range(count)])
    for n in range(count):
        await store.put_secret(f"s{n}", "refresh_token", f"rt-{n}")
    secrets.gate.clear()
    provider = ProviderClient(now=clock.now, timeout=30)
    manager = SessionManager(store, provider, clock=clock)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            await fake_provider.arrived(count)  # every refresh rotated; the writes wait
            await anyio.wait_all_tasks_blocked()
            secrets.gate.set()
            await settle(manager)
            warnings = [s.lifecycle.status(clock.now()).persist_warning
                        for s in manager.by_id.values() if s.lifecycle is not None]
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()
    assert warnings == [None] * count
    saved = [await store.get_secret(f"s{n}", "refresh_token") for n in range(count)]
    assert all(value is not None and value.startswith("fake-rt-") for value in saved), saved


# ---------------------------------------------------------------- the scheduler alone
# scheduler.py on the fake clock, with plain items: no sessions, provider or store.


class Item:
    """Something to wake; the scheduler knows items only by identity."""

    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[Scheduler[Item], FakeClock, list[tuple[str, float]]]]:
    clock = FakeClock()
    woken: list[tuple[str, float]] = []
    alone: Scheduler[Item] = Scheduler(clock, lambda item, now: woken.append((item.name, now)))
    async with anyio.create_task_group() as group:
        group.start_soon(alone.run)
        await clock.wait_for_sleepers(1)
        yield alone, clock, woken
        group.cancel_scope.cancel()


async def test_the_scheduler_wakes_an_item_at_its_time_and_not_before(
    scheduler: tuple[Scheduler[Item], FakeClock, list[tuple[str, float]]],
) -> None:
    alone, clock, woken = scheduler
    early, late = Item("early"), Item("late")
    alone.wake_at(late, T0 + 100)
    alone.wake_at(early, T0 + 30)
    await run_time(clock, 29, step=1)
    assert woken == []
    await run_time(clock, 1, step=1)
    assert woken == [("early", T0 + 30)] and alone.planned(early) is None
    await run_time(clock, 70, step=1)
    assert woken == [("early", T0 + 30), ("late", T0 + 100)]


async def test_an_earlier_wake_up_cuts_the_scheduler_s_sleep_short(
    scheduler: tuple[Scheduler[Item], FakeClock, list[tuple[str, float]]],
) -> None:
    alone, clock, woken = scheduler
    item = Item("item")
    alone.wake_at(item, T0 + 50)  # asleep until 50 s
    await run_time(clock, 10, step=10)
    alone.wake_at(item, T0 + 15)  # moved earlier: the old entry goes stale
    await run_time(clock, 5, step=5)
    assert woken == [("item", T0 + 15)]
    await run_time(clock, 60, step=5)  # the stale 50 s entry wakes nobody
    assert woken == [("item", T0 + 15)]


async def test_a_cancelled_wake_up_never_comes(
    scheduler: tuple[Scheduler[Item], FakeClock, list[tuple[str, float]]],
) -> None:
    alone, clock, woken = scheduler
    item = Item("item")
    alone.wake_at(item, T0 + 20)
    alone.wake_at(item, None)
    await run_time(clock, 120, step=10)
    assert woken == [] and alone.planned(item) is None


async def test_a_stepped_wall_clock_wakes_an_item_within_one_sleep_slice(
    scheduler: tuple[Scheduler[Item], FakeClock, list[tuple[str, float]]],
) -> None:
    alone, clock, woken = scheduler
    alone.wake_at(Item("item"), T0 + 3000)
    await anyio.wait_all_tasks_blocked()
    clock.jump(3600)  # suspended past the wake-up: the monotonic slice has not ended
    await anyio.wait_all_tasks_blocked()
    assert woken == []
    await run_time(clock, MAX_SLEEP, step=MAX_SLEEP)
    assert woken == [("item", T0 + 3600 + MAX_SLEEP)]


async def test_an_idle_scheduler_sleeps_through_and_drops_stale_entries(
    scheduler: tuple[Scheduler[Item], FakeClock, list[tuple[str, float]]],
) -> None:
    alone, clock, woken = scheduler
    item = Item("item")
    for second in range(1000):  # moved 1,000 times: 999 stale entries left behind
        alone.wake_at(item, T0 + 10_000 + second)
    assert len(alone._heap) <= 4 * 1 + 64
    woken_before = alone.wakeups
    await run_time(clock, 3600, step=MAX_SLEEP)
    # Its sleep slices end inside the clock; the scheduler itself woke at most once (for
    # the first wake_at, which came before an empty heap's idle sleep ended).
    assert alone.wakeups - woken_before <= 1
    assert woken == []
