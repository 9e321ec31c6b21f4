"""When each session next needs attention: one heap of wake-up times, and the sleeps between.

The scheduler holds items (the driver's sessions; anything hashed by identity)
with at most one wake-up time each, on the wall clock, and calls
``on_due(item, now)`` when an item's time has come. What an item is, what
waking it does, logins and revocation are none of its business: the driver
(``sessions.py``) says when to wake (:meth:`Scheduler.wake_at`) and what a
wake-up does (``on_due``).

One heap of (wake-up time, tie-breaker, item): each change costs O(log n),
and an agent whose sessions are all fresh sleeps until the earliest wake-up.
A changed or cancelled wake-up leaves its old entry behind, stale (lazy
deletion); stale entries are skipped when they come up and dropped when they
outnumber the live ones, so the heap stays O(items).

Sleeps go through the :class:`~compozy_agent.clock.Clock`, which sleeps in
slices of at most ``clock.MAX_SLEEP`` and rechecks the wall clock after each:
monotonic clocks stop while the machine is suspended, and a wake-up on the
wall clock must not end up an hour late.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

import anyio
import anyio.abc

from compozy_agent.clock import Clock

__all__ = ["IDLE_SLEEP", "Scheduler"]

#: The scheduler's sleep when nothing is scheduled.
IDLE_SLEEP: Final = 3600.0

ItemT = TypeVar("ItemT", bound=Hashable)


class Scheduler(Generic[ItemT]):
    """Wakes each item at its wake-up time; see the module docstring."""

    def __init__(self, clock: Clock, on_due: Callable[[ItemT, float], None]) -> None:
        self.clock = clock
        self._on_due = on_due
        #: The live wake-up time of each scheduled item; heap entries that disagree are stale.
        self._wake_at: dict[ItemT, float] = {}
        #: (wake-up time, tie-breaker, item), earliest first.
        self._heap: list[tuple[float, int, ItemT]] = []
        self._sequence = itertools.count()
        self._poke = anyio.Event()
        #: How often the scheduler has woken (for the idle-cost benchmark and tests).
        self.wakeups = 0

    def wake_at(self, item: ItemT, when: float | None) -> None:
        """Wake for ``item`` at ``when`` (wall clock) instead of any time set before;
        None: do not wake for it. O(log n); nothing happens when the time is unchanged."""
        if when == self._wake_at.get(item):
            return
        if when is None:
            del self._wake_at[item]  # its heap entry goes stale
            return
        self._wake_at[item] = when
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (when, next(self._sequence), item))
        if earliest is None or when < earliest:
            self.poke()  # the sleep in progress ends too late
        if len(self._heap) > 4 * len(self._wake_at) + 64:
            self._compact()

    def planned(self, item: ItemT) -> float | None:
        """When the scheduler will wake for ``item`` (None: it will not)."""
        return self._wake_at.get(item)

    def earliest(self) -> float | None:
        """The earliest time on the heap (perhaps a stale entry's), None when it is empty."""
        return self._heap[0][0] if self._heap else None

    def poke(self) -> None:
        """Make the scheduler look at the heap again now."""
        self._poke.set()

    def run_due(self, now: float) -> int:
        """Call ``on_due`` for every item whose wake-up time is ``now`` or earlier, earliest
        first; returns how many. The item's wake-up is cleared before its ``on_due`` runs,
        which may set the next one."""
        woken = 0
        while self._heap and self._heap[0][0] <= now:
            when, _, item = heapq.heappop(self._heap)
            if self._wake_at.get(item) != when:
                continue  # stale entry
            del self._wake_at[item]
            woken += 1
            self._on_due(item, now)
        return woken

    async def run(self) -> None:
        """Wake items when due, until cancelled; sleeps until the earliest wake-up."""
        while True:
            self.wakeups += 1
            now = self.clock.now()
            self.run_due(now)
            deadline = self._heap[0][0] if self._heap else now + IDLE_SLEEP
            poke = self._poke
            async with anyio.create_task_group() as sleep_group:

                async def sleep_then_stop(scope: anyio.CancelScope = sleep_group.cancel_scope,
                                          deadline: float = deadline) -> None:
                    await self.clock.sleep_until(deadline)
                    scope.cancel()

                sleep_group.start_soon(sleep_then_stop)
                await poke.wait()
                sleep_group.cancel_scope.cancel()
            if poke.is_set():
                self._poke = anyio.Event()

    def _compact(self) -> None:
        """Drop stale entries, so a long-lived agent's heap stays O(items)."""
        self._heap = [entry for entry in self._heap if self._wake_at.get(entry[2]) == entry[0]]
        heapq.heapify(self._heap)
