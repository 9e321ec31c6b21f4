"""The token lifecycle state machine, driven through hours of token life in milliseconds.

Time is whatever the test says it is: every event takes ``now``.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    MAX_BACKOFF,
    AccessToken,
    DeleteRefreshToken,
    Fail,
    IllegalTransition,
    PersistRefreshToken,
    Ready,
    SessionLifecycle,
    StartRefresh,
    State,
    Wait,
)

T0 = 1_800_000_000.0
HOUR = 3600.0


def token(issued_at: float, lifetime: float = HOUR, value: str = "at") -> AccessToken:
    return AccessToken(value, issued_at=issued_at, expires_at=issued_at + lifetime)


def logged_in(now: float = T0, lifetime: float = HOUR, seed: int = 1) -> SessionLifecycle:
    machine = SessionLifecycle(has_refresh_token=True, rng=random.Random(seed))
    machine.install(now, token(now, lifetime, "at-0"))
    return machine


def test_fresh_token_is_handed_out_without_refresh() -> None:
    machine = logged_in()
    assert machine.state(T0 + 60) is State.FRESH
    assert machine.request_token(T0 + 60) == Ready(token(T0, value="at-0"))


@pytest.mark.parametrize("seed", range(20))
def test_proactive_refresh_falls_in_the_window(seed: int) -> None:
    machine = logged_in(seed=seed)
    due = machine.next_wakeup()
    assert due is not None
    assert T0 + 0.75 * HOUR <= due <= T0 + 0.85 * HOUR
    assert machine.tick(due - 1) is None
    assert machine.state(due) is State.EXPIRING
    assert machine.tick(due) == StartRefresh(DEFAULT_SLOT)
    assert machine.state(due) is State.REFRESHING


def test_short_lifetimes_still_refresh_before_expiry() -> None:
    machine = logged_in(lifetime=10)
    due = machine.next_wakeup()
    assert due is not None and T0 < due <= T0 + 10 - 5  # at least lifetime/2 before expiry


def test_single_flight_one_refresh_for_a_hundred_callers() -> None:
    machine = logged_in()
    at_expiry = T0 + HOUR + 1
    decisions = [machine.request_token(at_expiry) for _ in range(100)]
    assert decisions[0] == StartRefresh(DEFAULT_SLOT)
    assert decisions[1:] == [Wait()] * 99
    machine.refresh_succeeded(at_expiry, DEFAULT_SLOT, token(at_expiry, value="at-1"),
                              rotated=False)
    assert {machine.request_token(at_expiry + 0.1) for _ in range(100)} == {
        Ready(token(at_expiry, value="at-1"))}


def test_min_valid_refreshes_first_but_never_storms() -> None:
    machine = logged_in(lifetime=600)
    now = T0 + 300
    assert machine.request_token(now, min_valid=400) == StartRefresh(DEFAULT_SLOT)
    # The provider still grants only 600 s: one refresh, then its token is handed out.
    machine.refresh_succeeded(now, DEFAULT_SLOT, token(now, 600, "at-1"), rotated=False)
    assert machine.request_token(now + 1, min_valid=7200) == Ready(token(now, 600, "at-1"))
    assert machine.request_token(now + 2, min_valid=7200) == Ready(token(now, 600, "at-1"))
    # Later, the same demand is a real need again.
    assert machine.request_token(now + 60, min_valid=7200) == StartRefresh(DEFAULT_SLOT)


def test_force_new_and_rejected_token_refresh_once() -> None:
    machine = logged_in()
    asked_at = T0 + 100
    assert machine.request_token(asked_at, rejected="at-0") == StartRefresh(DEFAULT_SLOT)
    assert machine.request_token(asked_at, rejected="at-0") == Wait()
    machine.refresh_succeeded(asked_at + 1, DEFAULT_SLOT, token(asked_at + 1, value="at-1"),
                              rotated=False)
    # Everyone who rejected at-0 gets at-1; nobody refreshes again.
    assert machine.request_token(asked_at + 2, rejected="at-0") == Ready(
        token(asked_at + 1, value="at-1"))
    # force_new from before the refresh is satisfied by it; a later one is not.
    assert machine.request_token(asked_at + 2, force_new=True, arrived_at=asked_at) == Ready(
        token(asked_at + 1, value="at-1"))
    assert machine.request_token(asked_at + 3, force_new=True) == StartRefresh(DEFAULT_SLOT)


def test_transient_failures_back_off_and_keep_serving_a_valid_token() -> None:
    machine = logged_in(lifetime=HOUR)
    now = T0 + 0.9 * HOUR
    delays = []
    for _ in range(9):
        start = machine.tick(now) or machine.request_token(now, min_valid=HOUR)
        assert start == StartRefresh(DEFAULT_SLOT)
        machine.refresh_failed_transient(now, DEFAULT_SLOT, "HTTP 503")
        assert machine.retry_at is not None
        delays.append(machine.retry_at - now)
        # While backing off, the still-valid token is handed out, even to demanding callers.
        assert machine.request_token(now + 0.01, min_valid=HOUR) == Ready(token(T0, value="at-0"))
        now = machine.retry_at
        if now >= T0 + HOUR:
            break
    assert all(0.5 * 2**i <= d <= min(MAX_BACKOFF, 2**i) for i, d in enumerate(delays[:6]))
    assert max(delays) <= MAX_BACKOFF


def test_refresh_failed_only_when_no_valid_token_remains() -> None:
    machine = logged_in(lifetime=60)
    now = T0 + 61
    assert machine.request_token(now) == StartRefresh(DEFAULT_SLOT)
    machine.refresh_failed_transient(now, DEFAULT_SLOT, "cannot connect")
    decision = machine.request_token(now + 0.1)
    assert isinstance(decision, Fail) and decision.code == "refresh_failed"
    assert "cannot connect" in decision.message


def test_retry_after_is_honoured() -> None:
    machine = logged_in()
    now = T0 + HOUR + 5
    machine.request_token(now)
    machine.refresh_failed_transient(now, DEFAULT_SLOT, "HTTP 429", retry_after=120)
    assert machine.retry_at == now + 120
    assert machine.tick(now + 119) is None
    assert machine.tick(now + 120) == StartRefresh(DEFAULT_SLOT)


def test_invalid_grant_means_login_required_and_the_refresh_token_goes() -> None:
    machine = logged_in()
    now = T0 + HOUR + 1
    machine.request_token(now)
    actions = machine.refresh_failed_invalid_grant(now, DEFAULT_SLOT, "invalid_grant")
    assert actions == [DeleteRefreshToken()]
    assert machine.state(now) is State.LOGIN_REQUIRED
    decision = machine.request_token(now + 1)
    assert isinstance(decision, Fail) and decision.code == "login_required"
    assert machine.tick(now + 10 * HOUR) is None and machine.next_wakeup() is None


def test_rotated_refresh_token_is_persisted_before_the_next_refresh() -> None:
    machine = logged_in()
    now = T0 + HOUR + 1
    machine.request_token(now)
    actions = machine.refresh_succeeded(now, DEFAULT_SLOT, token(now, value="at-1"), rotated=True)
    assert actions == [PersistRefreshToken()]
    # A refresh now would spend the unsaved token: it waits for the persist.
    assert machine.request_token(now + 1, force_new=True) == Wait()
    assert machine.tick(now + 10 * HOUR) is None
    machine.persist_done(now + 1)
    assert machine.request_token(now + 2, force_new=True) == StartRefresh(DEFAULT_SLOT)


def test_failed_persist_keeps_the_token_in_memory_and_retries() -> None:
    machine = logged_in()
    now = T0 + HOUR + 1
    machine.request_token(now)
    machine.refresh_succeeded(now, DEFAULT_SLOT, token(now, value="at-1"), rotated=True)
    machine.persist_failed_at(now, retry_in=30)
    assert machine.snapshot(now).warnings  # status says so
    assert machine.request_token(now + 1) == Ready(token(now, value="at-1"))
    assert machine.persist_retry_due(now + 29) is False
    assert machine.next_wakeup() == now + 30
    assert machine.persist_retry_due(now + 30) is True
    machine.persist_done(now + 31)
    assert machine.snapshot(now + 31).warnings == []


def test_suspend_past_expiry_is_noticed_on_the_next_request() -> None:
    machine = logged_in()
    woke_up = T0 + 5 * HOUR  # the machine slept through the whole refresh window
    assert machine.state(woke_up) is State.EXPIRED
    assert machine.request_token(woke_up) == StartRefresh(DEFAULT_SLOT)


def test_narrower_tokens_are_cached_per_slot_and_serialized_with_the_default() -> None:
    machine = logged_in()
    narrow = (frozenset({"compozy:read"}), "https://api.compozy.dev")
    now = T0 + 10
    assert machine.request_token(now, narrow) == StartRefresh(narrow)
    # The default slot's proactive refresh must not run concurrently: one refresh token.
    assert machine.tick(T0 + HOUR) is None
    assert machine.request_token(T0 + HOUR, min_valid=HOUR) == Wait()
    machine.refresh_succeeded(now, narrow, token(now, value="narrow-1"), rotated=False)
    assert machine.request_token(now + 1, narrow) == Ready(token(now, value="narrow-1"))
    assert machine.request_token(now + 1) == Ready(token(T0, value="at-0"))


def test_illegal_moves_raise_and_change_nothing() -> None:
    machine = logged_in()
    before = (machine.state(T0), dict(machine.slots), machine.in_flight, machine.refresh_due_at)
    with pytest.raises(IllegalTransition):
        machine.refresh_succeeded(T0, DEFAULT_SLOT, token(T0, value="x"), rotated=True)
    with pytest.raises(IllegalTransition):
        machine.refresh_failed_transient(T0, DEFAULT_SLOT, "x")
    with pytest.raises(IllegalTransition):
        machine.persist_done(T0)
    assert (machine.state(T0), dict(machine.slots), machine.in_flight,
            machine.refresh_due_at) == before


def test_revoked_is_terminal() -> None:
    machine = logged_in()
    machine.revoke()
    assert machine.state(T0) is State.REVOKED
    assert isinstance(machine.request_token(T0), Fail)
    assert machine.next_wakeup() is None and machine.tick(T0 + 10 * HOUR) is None


def test_tokens_never_appear_in_reprs() -> None:
    assert "secret-value" not in repr(token(T0, value="secret-value"))
    machine = logged_in()
    machine.install(T0, token(T0, value="secret-value"))
    assert "secret-value" not in repr(machine.request_token(T0))


events = st.lists(
    st.tuples(
        st.sampled_from(["request", "force", "tick", "ok", "ok_rotated", "transient",
                         "persist_ok", "persist_fail", "persist_retry"]),
        st.floats(min_value=0, max_value=900),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_random_event_sequences_keep_the_invariants(sequence: list[tuple[str, float]]) -> None:
    """Never two refreshes in flight; never a refresh while a rotated token is unsaved."""
    machine = logged_in(lifetime=600)
    now = T0
    in_flight: list[object] = []
    for name, step in sequence:
        now += step
        decision: object = None
        if name in ("request", "force"):
            decision = machine.request_token(now, force_new=name == "force")
        elif name == "tick":
            decision = machine.tick(now)
        elif name in ("ok", "ok_rotated", "transient") and in_flight:
            slot = in_flight.pop()
            if name == "transient":
                machine.refresh_failed_transient(now, DEFAULT_SLOT, "x")
            else:
                machine.refresh_succeeded(now, DEFAULT_SLOT, token(now, 600),
                                          rotated=name == "ok_rotated")
            del slot
        elif name == "persist_ok" and machine.persist_in_flight:
            machine.persist_done(now)
        elif name == "persist_fail" and machine.persist_in_flight:
            machine.persist_failed_at(now)
        elif name == "persist_retry":
            machine.persist_retry_due(now)
        if isinstance(decision, StartRefresh):
            assert not in_flight, "two refreshes in flight"
            assert not machine.persist_in_flight, "refresh while a rotated token is unsaved"
            in_flight.append(decision)
        assert machine.state(now) is not State.LOGIN_REQUIRED
