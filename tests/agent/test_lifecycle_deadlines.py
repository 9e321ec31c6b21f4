"""Issue 16 in the state machine: expiry from the request's start, and backoff that
respects expiry (lifecycle rules 2, 8 and 8b), on explicit times.

The numbers are the documented budget's (tests/support/budget.py);
tests/agent/test_deadline_budget.py checks them against the code.
"""

from __future__ import annotations

import random

import pytest

from compozy_agent.lifecycle import (
    AccessToken,
    Fail,
    Ready,
    Secret,
    SessionLifecycle,
    StartRefresh,
    WaitForRefresh,
)
from compozy_client.errors import ErrorCode
from support.budget import EARLY_RETRY_SPACING, EARLY_RETRY_WINDOW, EXPIRY_MARGIN

T0 = 1_800_000_000.0


def session(lifetime: float = 60.0, seed: int = 1) -> SessionLifecycle:
    """Logged in at T0 with a token of ``lifetime`` seconds (counted from T0)."""
    return SessionLifecycle(T0, refresh_token="rt-0", rng=random.Random(seed),
                            access_token=AccessToken(Secret("at-0"), T0, T0 + lifetime))


def start(decision: object) -> StartRefresh:
    assert isinstance(decision, StartRefresh), decision
    return decision


def refreshed(machine: SessionLifecycle, refresh: StartRefresh, *, sent_at: float,
              arrived_at: float, expires_in: float, value: str = "at-1") -> None:
    """The provider answered a refresh sent at ``sent_at``, at ``arrived_at``."""
    machine.refresh_succeeded(arrived_at, refresh.refresh_id, value, sent_at + expires_in,
                              issued_at=sent_at)


# ---------------------------------------------------------------------------
# Rule 2: a token's life counts from when its request was sent, less a margin.


def test_expiry_counts_from_the_send_time_with_the_margin() -> None:
    machine = session()
    sent_at = T0 + 100  # expired: the caller's request starts a refresh
    refresh = start(machine.request_token(sent_at))
    # The answer took 50 s of the new token's 60 s life.
    refreshed(machine, refresh, sent_at=sent_at, arrived_at=sent_at + 50, expires_in=60)
    ready = machine.request_token(sent_at + 50, asked_at=sent_at)
    assert isinstance(ready, Ready) and ready.token.value.reveal() == "at-1"
    assert ready.token.issued_at == sent_at
    assert ready.token.expires_at == sent_at + 60 - EXPIRY_MARGIN
    # Handed out up to the margin, never after: at sent + 58 a new refresh is needed.
    assert isinstance(machine.request_token(sent_at + 60 - EXPIRY_MARGIN - 0.1), Ready)
    assert not isinstance(machine.request_token(sent_at + 60 - EXPIRY_MARGIN), Ready)
    assert not isinstance(machine.request_token(sent_at + 59.5), Ready)


def test_a_token_that_arrives_after_its_margin_is_never_handed_out() -> None:
    """A 12 s token whose answer came 11 s after the request: the provider's whole-second
    ``exp`` may already be past. Nobody gets it; the caller is told the provider was slow;
    the next caller starts a new refresh (the agent's own waits RECENT s after the answer,
    so a provider slower than its tokens live is not asked in a loop)."""
    machine = session()
    sent_at = T0 + 100
    refresh = start(machine.request_token(sent_at))
    assert machine.refresh_succeeded(sent_at + 11, refresh.refresh_id, "at-late",
                                     sent_at + 12, issued_at=sent_at) == []
    decision = machine.request_token(sent_at + 11, asked_at=sent_at)
    assert isinstance(decision, Fail) and decision.code == ErrorCode.REFRESH_FAILED
    assert "took 11 s to answer" in decision.message
    assert isinstance(machine.request_token(sent_at + 11.5), StartRefresh)


@pytest.mark.parametrize(("lifetime", "margin"), [(3600, EXPIRY_MARGIN), (12, EXPIRY_MARGIN),
                                                  (2, 1.0), (0.5, 0.25)])
def test_the_margin_is_at_most_half_the_life(lifetime: float, margin: float) -> None:
    machine = session()
    refresh = start(machine.request_token(T0 + 100))
    refreshed(machine, refresh, sent_at=T0 + 100, arrived_at=T0 + 100, expires_in=lifetime)
    ready = machine.request_token(T0 + 100)
    assert isinstance(ready, Ready)
    assert ready.token.expires_at == pytest.approx(T0 + 100 + lifetime - margin)


# ---------------------------------------------------------------------------
# Rule 8: the backoff respects the token's expiry.


@pytest.mark.parametrize("seed", range(20))
def test_while_the_token_is_valid_every_retry_comes_before_it_expires(seed: int) -> None:
    """A 12 s token, refreshes failing: the agent keeps trying before the token runs out
    (a retry after it would leave callers nothing), at most once per second."""
    machine = session(lifetime=12, seed=seed)
    now = machine.next_wakeup(T0)
    assert now is not None
    attempts = []
    while True:
        refresh = start(machine.tick(now)[0])
        attempts.append(now - T0)
        machine.refresh_failed_transient(now, refresh.refresh_id, reason="reset")
        retry_at = machine.next_wakeup(now)
        assert retry_at is not None and retry_at - now >= EARLY_RETRY_SPACING / 2
        if now >= T0 + 12 - EARLY_RETRY_SPACING:
            break
        assert retry_at <= T0 + 12, f"a retry at +{retry_at - T0:.2f} s, after the expiry"
        now = retry_at
    assert len(attempts) >= 4, attempts


# ---------------------------------------------------------------------------
# Rule 8b: one attempt ahead of the schedule, only when no valid token is left.


def backing_off(lifetime: float = 60.0) -> tuple[SessionLifecycle, float]:
    """A session whose refreshes failed until its token expired; returns it and when its
    last attempt failed (the backoff then runs well past that)."""
    machine = session(lifetime=lifetime)
    now = T0
    while True:
        wakeup = machine.next_wakeup(now)
        assert wakeup is not None
        now = wakeup
        refresh = start(machine.tick(now)[0])
        machine.refresh_failed_transient(now, refresh.refresh_id, reason="reset")
        if now > T0 + lifetime:
            return machine, now


def test_an_early_attempt_only_when_no_valid_token_is_left() -> None:
    machine = session(lifetime=3600)
    now = T0
    for _ in range(3):  # the third failure backs off 2-4 s
        wakeup = machine.next_wakeup(now)
        assert wakeup is not None
        now = wakeup
        refresh = start(machine.tick(now)[0])
        machine.refresh_failed_transient(now, refresh.refresh_id, reason="reset")
    retry_at = machine.status(now).retry_at
    assert retry_at is not None
    # A valid token is left, just not for as long as this caller wants: no jumping the
    # backoff, however long it waited (the provider is not asked more for a caller's whim).
    later = now + EARLY_RETRY_SPACING + 0.01
    assert later < retry_at
    needy = machine.request_token(later, min_valid=3600)
    assert isinstance(needy, Fail) and "the agent retries in" in needy.message
    assert machine.in_flight is None

    # No valid token left: the caller's request goes ahead of the schedule.
    machine, failed_at = backing_off()
    retry_at = machine.status(failed_at).retry_at
    assert retry_at is not None and retry_at - failed_at > EARLY_RETRY_SPACING
    now = failed_at + EARLY_RETRY_SPACING
    early = start(machine.request_token(now))
    # Still single flight: a crowd of callers shares it.
    for _ in range(10):
        assert machine.request_token(now) == WaitForRefresh(early.refresh_id)
    machine.refresh_succeeded(now + 0.2, early.refresh_id, "at-early", now + 60,
                              issued_at=now)
    assert isinstance(machine.request_token(now + 0.2, asked_at=now), Ready)


def test_early_attempts_are_spaced_and_end_with_the_callers_window() -> None:
    machine, failed_at = backing_off()
    asked_at = failed_at + 0.1  # the last attempt started 0.1 s ago
    wait = machine.request_token(asked_at)
    assert isinstance(wait, WaitForRefresh) and wait.until == failed_at + EARLY_RETRY_SPACING
    assert machine.in_flight is None  # nothing started for it yet
    attempts, now = 0, wait.until
    while True:
        decision = machine.request_token(now, asked_at=asked_at)
        if isinstance(decision, WaitForRefresh):
            assert decision.until is not None and decision.until > now
            now = decision.until
            continue
        if isinstance(decision, Fail):
            break
        refresh = start(decision)
        attempts += 1
        machine.refresh_failed_transient(now, refresh.refresh_id, reason="reset")
    assert decision.code == ErrorCode.REFRESH_FAILED and "reset" in decision.message
    assert now - asked_at <= EARLY_RETRY_WINDOW
    assert 3 <= attempts <= EARLY_RETRY_WINDOW / EARLY_RETRY_SPACING


def test_retry_after_is_never_jumped() -> None:
    machine = session(lifetime=60)
    refresh = start(machine.request_token(T0 + 100))  # expired
    machine.refresh_failed_transient(T0 + 100, refresh.refresh_id, retry_after=30,
                                     reason="HTTP 429")
    for now in (T0 + 101, T0 + 110, T0 + 129):
        decision = machine.request_token(now)
        assert isinstance(decision, Fail) and "HTTP 429" in decision.message
    assert isinstance(machine.request_token(T0 + 130), StartRefresh)
