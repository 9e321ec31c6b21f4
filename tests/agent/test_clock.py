"""The real clock's capped sleeps, and the test clock the other tests rely on."""

from __future__ import annotations

import time

import anyio
import pytest

from compozy_agent.clock import MAX_SLEEP, Clock, SystemClock
from support.clock import T0, FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(10):
        await anyio.lowlevel.checkpoint()


def test_both_clocks_are_clocks() -> None:
    clocks: list[Clock] = [SystemClock(), FakeClock()]
    assert abs(clocks[0].now() - time.time()) < 5
    assert clocks[1].now() == T0


def test_fake_clock_moves_only_forward_when_told() -> None:
    clock = FakeClock()
    clock.advance(1.5)
    assert clock.now() == T0 + 1.5 and clock.monotonic == 1.5
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    clock.jump(-10)  # the wall clock can be stepped back; time did not pass
    assert clock.now() == T0 - 8.5 and clock.monotonic == 1.5


async def test_fake_sleeper_wakes_when_time_passes_its_deadline() -> None:
    clock = FakeClock()
    woke_at: list[float] = []

    async def sleeper() -> None:
        await clock.sleep_until(T0 + 100)
        woke_at.append(clock.now())

    async with anyio.create_task_group() as group:
        group.start_soon(sleeper)
        await clock.wait_for_sleepers(1)
        clock.advance(59)
        await settle()
        clock.advance(40)  # 99 s: past a slice end (60 s), not the deadline
        await settle()
        assert woke_at == [] and clock.sleepers == 1
        clock.advance(1)
        await settle()
        assert woke_at == [T0 + 100]
        assert clock.sleepers == 0


async def test_fake_sleep_past_deadline_returns_at_once() -> None:
    clock = FakeClock()
    with anyio.fail_after(1):
        await clock.sleep_until(T0 - 1)
        await clock.sleep_until(T0)
    assert clock.sleepers == 0


async def test_after_a_suspend_the_sleeper_wakes_within_one_slice() -> None:
    """The wall clock jumps past the deadline; the sleeper notices when its slice ends."""
    clock = FakeClock()
    woke = anyio.Event()

    async def sleeper() -> None:
        await clock.sleep_until(T0 + 3600)
        woke.set()

    async with anyio.create_task_group() as group:
        group.start_soon(sleeper)
        await clock.wait_for_sleepers(1)
        clock.jump(7200)  # suspended for two hours: monotonic time stood still
        await settle()
        assert not woke.is_set()
        clock.advance(MAX_SLEEP)  # resumed, and the current slice runs out
        with anyio.fail_after(1):
            await woke.wait()


async def test_a_cancelled_fake_sleeper_is_forgotten() -> None:
    clock = FakeClock()
    async with anyio.create_task_group() as group:
        group.start_soon(clock.sleep_until, T0 + 100)
        await clock.wait_for_sleepers(1)
        group.cancel_scope.cancel()
    assert clock.sleepers == 0
    clock.advance(200)  # nothing left to wake, nothing breaks


async def test_system_clock_sleeps_until_the_wall_clock_deadline() -> None:
    clock = SystemClock()
    with anyio.fail_after(5):
        await clock.sleep_until(clock.now() - 10)  # past: returns at once
        deadline = clock.now() + 0.05
        await clock.sleep_until(deadline)
    assert clock.now() >= deadline


async def test_system_clock_rechecks_the_wall_clock_every_slice() -> None:
    class SteppedWallClock(SystemClock):
        """A real sleeper whose wall clock we can step, as a resume does."""

        wall = T0

        def now(self) -> float:
            return self.wall

    clock = SteppedWallClock(max_sleep=0.01)
    woke = anyio.Event()

    async def sleeper() -> None:
        await clock.sleep_until(T0 + 3600)
        woke.set()

    async with anyio.create_task_group() as group:
        group.start_soon(sleeper)
        await anyio.sleep(0.05)
        assert not woke.is_set()
        clock.wall += 7200
        with anyio.fail_after(1):
            await woke.wait()


def test_system_clock_needs_a_positive_slice() -> None:
    with pytest.raises(ValueError, match="positive"):
        SystemClock(max_sleep=0)
