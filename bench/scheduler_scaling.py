"""Benchmark 4b: the scheduler's cost per event as sessions grow (O(log n), not O(n)).

One event is what the agent does when a session's refresh comes due, minus
the network: pop the earliest wake-up from the heap, tick the session's
lifecycle (it starts a refresh), report the refresh as succeeded (a new
one-hour token), and put the session's next wake-up back on the heap, all
through the agent's own Scheduler and SessionLifecycle code.

Beside it, in the same run, the same events scheduled the naive way: a scan
of every session's next wake-up for the earliest (O(n)). Between 100 and
10,000 sessions an O(log n) scheduler's cost per event grows about 2x
(log 10,000 / log 100); a scan's grows 100x. Target: at most 3x.

    .venv/bin/python bench/scheduler_scaling.py [--events 20000] [--sizes 100 1000 10000]
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio

from _common import verdict
from compozy_agent.lifecycle import AccessToken, Secret, SessionLifecycle, StartRefresh
from compozy_agent.scheduler import Scheduler
from compozy_agent.sessions import Session
from compozy_agent.store import StoredSession

LIFETIME = 3600.0
TARGET = 3.0


class SteppedClock:
    """The scheduler's clock, set by the benchmark to each event's time."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0

    def now(self) -> float:
        return self.wall

    async def sleep_until(self, deadline: float) -> None:  # the benchmark never sleeps
        raise AssertionError("not used")


def populate(scheduler: Scheduler[Session], clock: SteppedClock, count: int) -> list[Session]:
    """``count`` sessions whose tokens expire spread over the next hour, scheduled."""
    sessions = []
    for number in range(count):
        issued = clock.wall - LIFETIME * number / count
        meta = StoredSession(token_id=f"s{number}", profile=f"p{number}", kind="oidc",
                             issuer="https://issuer.example", client_id="cli", created_at=issued)
        lifecycle = SessionLifecycle(issued, refresh_token=f"rt-{number}", access_token=AccessToken(
            Secret(f"at-{number}"), issued_at=issued, expires_at=issued + LIFETIME))
        session = Session(meta, lifecycle)
        sessions.append(session)
        scheduler.wake_at(session, lifecycle.next_wakeup(clock.wall))
    return sessions


def refresh(session: Session, now: float) -> None:
    """The lifecycle's side of one due refresh that succeeds."""
    assert session.lifecycle is not None
    actions = session.lifecycle.tick(now)
    start = next(action for action in actions if isinstance(action, StartRefresh))
    session.lifecycle.refresh_succeeded(now, start.refresh_id, "at", now + LIFETIME,
                                        issued_at=now, refresh_token=None, scope=None)


def new_scheduler(clock: SteppedClock) -> Scheduler[Session]:
    """The agent's scheduler; a due session is refreshed and its next wake-up put on the
    heap, as the agent's driver does (minus the network)."""

    def on_due(session: Session, now: float) -> None:
        refresh(session, now)
        assert session.lifecycle is not None
        scheduler.wake_at(session, session.lifecycle.next_wakeup(now))

    scheduler: Scheduler[Session] = Scheduler(clock, on_due)
    return scheduler


def heap_event(scheduler: Scheduler[Session], clock: SteppedClock) -> None:
    """What the agent's scheduler does for one due session (Scheduler.run_due)."""
    while True:
        earliest = scheduler.earliest()
        assert earliest is not None
        clock.wall = max(clock.wall, earliest)
        if scheduler.run_due(clock.wall):
            break  # else a stale entry: skipped, as the scheduler does


def scan_event(sessions: list[Session], clock: SteppedClock) -> None:
    """The same event, the earliest session found by looking at every one."""
    now = clock.wall
    due = min(sessions, key=lambda s: s.lifecycle.next_wakeup(now) or float("inf"))  # type: ignore[union-attr]
    assert due.lifecycle is not None
    wake_at = due.lifecycle.next_wakeup(now)
    assert wake_at is not None
    clock.wall = max(now, wake_at)
    refresh(due, clock.wall)


async def measure(count: int, events: int) -> tuple[float, float]:
    """Seconds per event: (the agent's heap, a linear scan)."""
    results = []
    for kind in ("heap", "scan"):
        clock = SteppedClock()
        scheduler = new_scheduler(clock)
        sessions = populate(scheduler, clock, count)
        # The scan is slow by design: fewer events, same per-event figure.
        todo = events if kind == "heap" else max(50, events * 100 // count)
        started = time.perf_counter()
        for _ in range(todo):
            if kind == "heap":
                heap_event(scheduler, clock)
            else:
                scan_event(sessions, clock)
        results.append((time.perf_counter() - started) / todo)
    return results[0], results[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    options = parser.parse_args()
    figures = {}
    for count in options.sizes:
        heap, scan = anyio.run(measure, count, options.events)
        figures[count] = (heap, scan)
        print(f"{count:>6} sessions: {heap * 1e6:6.2f} µs per event with the agent's heap, "
              f"{scan * 1e6:9.1f} µs with a scan of every session")
    smallest, largest = min(figures), max(figures)
    heap_growth = figures[largest][0] / figures[smallest][0]
    scan_growth = figures[largest][1] / figures[smallest][1]
    print(f"from {smallest} to {largest} sessions: the heap's cost per event grew "
          f"{heap_growth:.2f}x, a scan's {scan_growth:.1f}x")
    print(verdict(f"scheduling cost per event at {largest} vs {smallest} sessions: ",
                  heap_growth, TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
