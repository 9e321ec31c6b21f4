"""Helpers for tests that run the session driver in-process."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
import anyio.lowlevel

from compozy_agent.manager import SessionManager
from support.clock import FakeClock

T = TypeVar("T")


async def settle(manager: SessionManager, timeout: float = 10.0) -> None:
    """Wait until no session has a refresh or persist in flight (HTTP is real I/O)."""
    with anyio.fail_after(timeout):
        for session in list(manager.by_id.values()):
            assert session.lifecycle is not None
            while session.lifecycle.in_flight is not None:
                await session.changed.wait()


async def while_advancing(clock: FakeClock, call: Awaitable[T], *, step: float = 0.5,
                          sleepers: int = 2, timeout: float = 30.0) -> T:
    """Await ``call`` while letting ``step`` seconds of fake time pass whenever at least
    ``sleepers`` tasks sleep on ``clock`` (the scheduler is always one): for a caller the
    agent makes wait for an attempt ahead of its backoff (lifecycle rule 8b)."""
    outcome: list[T] = []
    failure: list[Exception] = []

    async def run(scope: anyio.CancelScope) -> None:
        try:
            outcome.append(await call)
        except Exception as exc:  # raised below, outside the task group
            failure.append(exc)
        finally:
            scope.cancel()

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as group:
            group.start_soon(run, group.cancel_scope)
            while True:
                await clock.wait_for_sleepers(sleepers)
                clock.advance(step)
                await anyio.lowlevel.checkpoint()
    if failure:
        raise failure[0]
    return outcome[0]
