"""The one place that reads time.

Everything else takes ``now`` (wall-clock epoch seconds) from a :class:`Clock`
handed to it; tests hand in ``tests/support/clock.py``'s FakeClock instead.

Token expiries are wall-clock values, and sleeps are capped: a monotonic
clock stops while the machine is suspended, so a single long sleep could end
an hour after its wall-clock deadline. Sleeping in slices of at most
:data:`MAX_SLEEP` seconds and rechecking the wall clock after each bounds that
lateness to one slice.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

import anyio
import anyio.lowlevel

__all__ = ["MAX_SLEEP", "Clock", "SystemClock"]

#: The longest single sleep; wall-clock deadlines are rechecked at least this often.
MAX_SLEEP: Final = 60.0


class Clock(Protocol):
    """Wall-clock time, and sleeping until a wall-clock deadline."""

    def now(self) -> float:
        """Seconds since the epoch, on the wall clock."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (always a checkpoint, even when already past)."""
        ...


class SystemClock:
    """The real clock: ``time.time()`` and anyio sleeps capped at ``max_sleep``."""

    def __init__(self, max_sleep: float = MAX_SLEEP) -> None:
        if max_sleep <= 0:
            raise ValueError("max_sleep must be positive")
        self.max_sleep = max_sleep

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        await anyio.lowlevel.checkpoint()
        # Slices on purpose (see the module docstring); nothing else could set an Event.
        while (remaining := deadline - self.now()) > 0:  # noqa: ASYNC110
            await anyio.sleep(min(remaining, self.max_sleep))
