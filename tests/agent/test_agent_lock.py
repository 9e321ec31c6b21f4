"""The agent lock on a fake clock: passphrases, and wrong ones answered ever slower."""

from __future__ import annotations

import anyio
import pytest

from compozy_agent.agent_lock import FIRST_DELAY, MAX_DELAY, AgentLock
from compozy_agent.backend import OpError
from support.clock import FakeClock

pytestmark = pytest.mark.anyio


async def test_lock_then_unlock_with_the_same_passphrase() -> None:
    lock = AgentLock(FakeClock())
    assert not lock.locked
    await lock.lock("correct horse")
    assert lock.locked
    assert "correct horse" not in repr(lock)
    await lock.unlock("correct horse")
    assert not lock.locked


async def test_locking_twice_and_unlocking_an_unlocked_agent_are_errors() -> None:
    lock = AgentLock(FakeClock())
    with pytest.raises(OpError) as caught:
        await lock.unlock("x")
    assert caught.value.code == "bad_request"
    await lock.lock("x")
    with pytest.raises(OpError) as caught:
        await lock.lock("y")
    assert caught.value.code == "locked"
    with pytest.raises(OpError) as caught:
        await AgentLock(FakeClock()).lock("")
    assert caught.value.code == "bad_request"


async def test_wrong_passphrases_double_the_wait_before_the_next_check() -> None:
    clock = FakeClock()
    lock = AgentLock(clock)
    await lock.lock("right")
    with pytest.raises(OpError) as caught:
        await lock.unlock("wrong")  # the first attempt is checked at once
    assert caught.value.code == "wrong_passphrase"
    assert "right" not in caught.value.message and "wrong" in caught.value.message
    assert lock.delay() == FIRST_DELAY

    outcome: list[str] = []

    async def attempt(passphrase: str) -> None:
        try:
            await lock.unlock(passphrase)
            outcome.append("unlocked")
        except OpError as exc:
            outcome.append(exc.code)

    async with anyio.create_task_group() as group:
        group.start_soon(attempt, "right")
        await clock.wait_for_sleepers()
        clock.advance(FIRST_DELAY / 2)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []  # still waiting: not even checked before the delay ends
        clock.advance(FIRST_DELAY / 2)
    assert outcome == ["unlocked"]
    assert lock.failures == 0 and not lock.locked


async def test_the_delay_grows_to_its_cap_and_holds_for_parallel_guessers() -> None:
    clock = FakeClock()
    lock = AgentLock(clock)
    await lock.lock("right")
    delays = []
    for _ in range(9):
        async with anyio.create_task_group() as group:
            group.start_soon(_expect_wrong, lock)
            if lock.delay():
                await clock.wait_for_sleepers()
                clock.advance(lock.delay())
        delays.append(lock.delay())
    assert delays == [0.5, 1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]

    # Two guessers at once: the second waits for the first's delay *and* its own.
    checked: list[float] = []

    async def guess() -> None:
        await _expect_wrong(lock)
        checked.append(clock.monotonic)

    start = clock.monotonic
    async with anyio.create_task_group() as group:
        group.start_soon(guess)
        group.start_soon(guess)
        for _ in range(2):
            await clock.wait_for_sleepers()
            clock.advance(MAX_DELAY)
    assert checked == [start + MAX_DELAY, start + 2 * MAX_DELAY]


async def _expect_wrong(lock: AgentLock) -> None:
    with pytest.raises(OpError):
        await lock.unlock("wrong")
