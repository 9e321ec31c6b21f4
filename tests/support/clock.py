"""A clock for tests: time moves only when the test says so.

Like trio's MockClock, it never moves by itself and :meth:`FakeClock.advance`
only goes forward. Unlike it, it keeps two clocks, because that is what a
suspend does to a real machine: :meth:`~FakeClock.advance` moves both the wall
clock and the monotonic clock (time passes normally), :meth:`~FakeClock.jump`
moves only the wall clock (the machine slept, or the wall clock was stepped).

``sleep_until`` sleeps the way ``compozy_agent.clock.SystemClock`` does: in
monotonic slices of at most ``max_sleep`` seconds, rechecking the wall clock
after each. So after a jump past a sleeper's deadline the sleeper wakes only
when its current slice ends, exactly as on a real machine after resume.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

from compozy_agent.clock import MAX_SLEEP

#: A wall-clock start far from the epoch, so accidental zeroes show.
T0 = 1_800_000_000.0


class FakeClock:
    """Implements ``compozy_agent.clock.Clock`` on time moved by the test."""

    def __init__(self, start: float = T0, *, max_sleep: float = MAX_SLEEP) -> None:
        self._wall = start
        self._monotonic = 0.0
        self.max_sleep = max_sleep
        #: Sleepers' slices: (monotonic time the slice ends, event to set then).
        self._slices: list[tuple[float, anyio.Event]] = []
        self._sleepers_changed: anyio.Event | None = None

    def now(self) -> float:
        return self._wall

    @property
    def monotonic(self) -> float:
        return self._monotonic

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep in :meth:`sleep_until`."""
        return len(self._slices)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass (forward only), waking every sleeper whose slice ends."""
        if seconds < 0:
            raise ValueError("time only moves forward; use jump() to step the wall clock")
        self._wall += seconds
        self._monotonic += seconds
        self._wake()

    def jump(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` (a suspend, or an NTP step) without time passing.

        Sleepers notice at the end of their current slice, which ``advance``
        brings; a step back is allowed, as wall clocks do that.
        """
        self._wall += seconds

    async def sleep_until(self, deadline: float) -> None:
        await anyio.lowlevel.checkpoint()
        while (remaining := deadline - self._wall) > 0:
            entry = (self._monotonic + min(remaining, self.max_sleep), anyio.Event())
            self._slices.append(entry)
            self._notify_sleepers()
            try:
                await entry[1].wait()
            finally:
                if entry in self._slices:  # cancelled while asleep
                    self._slices.remove(entry)
                    self._notify_sleepers()

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Return once at least ``count`` tasks are asleep in :meth:`sleep_until`."""
        while len(self._slices) < count:
            self._sleepers_changed = anyio.Event()
            await self._sleepers_changed.wait()

    def _wake(self) -> None:
        due = [entry for entry in self._slices if entry[0] <= self._monotonic]
        for entry in due:
            self._slices.remove(entry)
            entry[1].set()
        if due:
            self._notify_sleepers()

    def _notify_sleepers(self) -> None:
        if self._sleepers_changed is not None:
            self._sleepers_changed.set()
            self._sleepers_changed = None
