"""The token lifecycle state machine, driven through hours of token life in milliseconds.

Synchronous, like h11's test_state.py: time is whatever the test says, every
event takes ``now``, and an illegal move must raise *and* leave the machine
as it was.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    EARLY_RETRY_WINDOW,
    EXPIRY_MARGIN,
    MAX_BACKOFF,
    MAX_NARROWER_SLOTS,
    MAX_RETRY_AFTER,
    NEW_SLOT_WINDOW,
    RECENT,
    REFUSAL_TTL,
    AccessToken,
    Action,
    DeleteRefreshToken,
    Fail,
    Grant,
    IllegalTransition,
    PersistRefreshToken,
    Ready,
    Secret,
    SessionLifecycle,
    SlotKey,
    StartRefresh,
    State,
    WaitForRefresh,
    slot_key,
)
from compozy_client.errors import ErrorCode

T0 = 1_800_000_000.0
HOUR = 3600.0
READ: SlotKey = slot_key(["read"])
API: SlotKey = slot_key(None, "https://api.example")


def at(value: str = "at-0", issued_at: float = T0, lifetime: float = HOUR) -> AccessToken:
    return AccessToken(Secret(value), issued_at, issued_at + lifetime)


def logged_in(
    now: float = T0, lifetime: float = HOUR, seed: int = 1, *, with_refresh_token: bool = True
) -> SessionLifecycle:
    return SessionLifecycle(now, refresh_token="rt-0" if with_refresh_token else None,
                            access_token=at("at-0", now, lifetime), rng=random.Random(seed))


def frozen(machine: SessionLifecycle) -> dict[str, Any]:
    """Everything the machine holds, to check that an illegal move changed nothing."""
    state = {name: value for name, value in vars(machine).items() if name != "_rng"}
    return copy.deepcopy(state) | {"_rng": machine._rng.getstate()}


def start(decision: object) -> StartRefresh:
    assert isinstance(decision, StartRefresh), decision
    return decision


def only(actions: list[Action]) -> Action:
    assert len(actions) == 1, actions
    return actions[0]


def ready_value(decision: object) -> str:
    assert isinstance(decision, Ready), decision
    return decision.token.value.reveal()


# ---------------------------------------------------------------------------
# Handing out, and the proactive window


def test_fresh_token_is_handed_out_without_refresh() -> None:
    machine = logged_in()
    assert machine.state(T0 + 60) is State.FRESH
    assert machine.request_token(T0 + 60) == Ready(at("at-0"))
    assert machine.tick(T0 + 60) == []
    assert machine.in_flight is None


@pytest.mark.parametrize("seed", range(20))
def test_proactive_refresh_falls_inside_the_window(seed: int) -> None:
    machine = logged_in(seed=seed)
    due = machine.next_wakeup(T0)
    assert due is not None
    assert T0 + 0.75 * HOUR <= due <= T0 + 0.85 * HOUR
    assert machine.tick(due - 1) == []
    assert machine.state(due - 1) is State.FRESH
    assert machine.state(due) is State.EXPIRING
    assert machine.tick(due) == [StartRefresh(1, DEFAULT_SLOT, Secret("rt-0"))]
    assert machine.state(due) is State.REFRESHING
    assert machine.next_wakeup(due) is None  # the outcome event says what comes next


def test_jitter_comes_from_the_injected_random() -> None:
    wakeups = [logged_in(seed=seed).next_wakeup(T0) for seed in range(50)]
    assert wakeups == [logged_in(seed=seed).next_wakeup(T0) for seed in range(50)]
    assert len(set(wakeups)) == 50  # spread, so sessions do not refresh in lockstep


@pytest.mark.parametrize(
    ("lifetime", "due_after_issue"),
    [
        (120, 90),  # 75-85 % would leave < 30 s: the margin wins
        (40, 20),  # the margin is capped at lifetime / 2
        (10, RECENT),  # lifetime / 2 = 5 s, which is also the floor
        (2, RECENT),  # absurdly short: once per RECENT seconds, never a loop
        (0, RECENT),
    ],
)
def test_short_lifetimes(lifetime: float, due_after_issue: float) -> None:
    for seed in range(10):
        assert logged_in(lifetime=lifetime, seed=seed).next_wakeup(T0) == T0 + due_after_issue


def test_a_day_of_token_life() -> None:
    """Refreshes every ~48 min, nobody ever gets an expired token, nobody waits."""
    machine = logged_in(seed=7)
    now, refreshes, handed_out = T0, 0, 0
    while now < T0 + 24 * HOUR:
        wakeup = machine.next_wakeup(now)
        assert wakeup is not None
        while now + 60 < wakeup:  # callers in between, a minute apart
            now += 60
            decision = machine.request_token(now, min_valid=30)
            assert isinstance(decision, Ready) and decision.background is None
            assert decision.token.remaining(now) >= 30
            handed_out += 1
        now = wakeup
        refresh = start(only(machine.tick(now)))
        refreshes += 1
        assert machine.request_token(now + 0.2) == Ready(machine.access_tokens()[0])
        assert machine.refresh_succeeded(now + 0.3, refresh.refresh_id, f"at-{refreshes}",
                                         now + 0.3 + HOUR) == []
        now += 0.3
    assert 28 <= refreshes <= 32
    assert handed_out > 1300


# ---------------------------------------------------------------------------
# Single flight


def test_single_flight_one_refresh_for_a_hundred_callers() -> None:
    machine = logged_in()
    expired = T0 + HOUR + 1
    assert machine.state(expired) is State.EXPIRED
    decisions = [machine.request_token(expired) for _ in range(100)]
    assert decisions[0] == StartRefresh(1, DEFAULT_SLOT, Secret("rt-0"))
    assert decisions[1:] == [WaitForRefresh(1)] * 99
    assert machine.refresh_succeeded(expired + 1, 1, "at-1", expired + 1 + HOUR) == []
    # Everyone asks again with when they first asked, and gets the one new token.
    answers = {ready_value(machine.request_token(expired + 1.1, asked_at=expired))
               for _ in range(99)}
    assert answers == {"at-1"}


def test_every_slot_refreshes_one_at_a_time_with_the_latest_refresh_token() -> None:
    machine = logged_in()
    due = machine.next_wakeup(T0)
    assert due is not None
    default = start(only(machine.tick(due)))
    # A narrower token needs a refresh too, but the refresh token is busy.
    assert machine.request_token(due, READ) == WaitForRefresh(default.refresh_id)
    # The default token is still valid: no waiting for it.
    assert ready_value(machine.request_token(due)) == "at-0"
    persist = only(machine.refresh_succeeded(due + 1, default.refresh_id, "at-1", due + HOUR,
                                             refresh_token="rt-1"))
    assert persist == PersistRefreshToken(2, Secret("rt-1"))
    # Rotated: the narrower refresh waits for the write too...
    assert machine.request_token(due + 1, READ, asked_at=due) == WaitForRefresh(2)
    assert machine.persist_done(due + 2, 2) == []
    # ...and then spends the new refresh token, asking for its scope.
    narrower = start(machine.request_token(due + 2, READ, asked_at=due))
    assert narrower == StartRefresh(3, READ, Secret("rt-1"))
    assert narrower.scopes == ["read"] and narrower.audience is None
    assert machine.request_token(due + 2, API) == WaitForRefresh(3)
    assert machine.refresh_succeeded(due + 3, 3, "at-read", due + 3 + 600,
                                     scope=["read"]) == []
    assert ready_value(machine.request_token(due + 4, READ)) == "at-read"
    assert ready_value(machine.request_token(due + 4)) == "at-1"
    api = start(machine.request_token(due + 4, API, asked_at=due + 2))
    assert api.audience == "https://api.example" and api.scopes is None


def test_narrower_token_inside_its_window_is_refreshed_in_the_background() -> None:
    machine = logged_in()
    read = start(machine.request_token(T0, READ))
    machine.refresh_succeeded(T0, read.refresh_id, "at-read", T0 + 600)
    assert ready_value(machine.request_token(T0 + 100, READ)) == "at-read"
    decision = machine.request_token(T0 + 590, READ)
    assert decision == Ready(AccessToken(Secret("at-read"), T0, T0 + 600 - EXPIRY_MARGIN),
                             background=StartRefresh(2, READ, Secret("rt-0")))
    # While that runs, the token is still handed out, with no second refresh.
    assert machine.request_token(T0 + 591, READ) == Ready(
        AccessToken(Secret("at-read"), T0, T0 + 600 - EXPIRY_MARGIN))


def test_narrower_slots_are_capped_least_recently_used_first() -> None:
    machine = logged_in()
    for number in range(MAX_NARROWER_SLOTS + 5):
        now = T0 + number * RECENT  # new slots at the pace rule 7 allows for ever
        refresh = start(machine.request_token(now, slot_key(None, f"https://api/{number}")))
        machine.refresh_succeeded(now, refresh.refresh_id, f"at-api-{number}", T0 + HOUR)
        machine.request_token(now, slot_key(None, "https://api/0"))  # keep this one warm
    values = {token.value.reveal() for token in machine.access_tokens()}
    assert len(values) == MAX_NARROWER_SLOTS + 1  # and the default
    assert {"at-0", "at-api-0", f"at-api-{MAX_NARROWER_SLOTS + 4}"} <= values
    assert "at-api-1" not in values


def test_cycling_through_more_slots_than_the_cache_holds_cannot_refresh_at_will() -> None:
    """Rule 7: 65 audiences asked in turn would refetch (and rotate) on every request, as
    the least recently used slot is always the one evicted. New slots are made at most
    MAX_NARROWER_SLOTS per NEW_SLOT_WINDOW seconds: one per RECENT seconds on average."""
    machine = logged_in()
    now, refreshes, refused = T0, 0, 0
    for turn in range(5 * (MAX_NARROWER_SLOTS + 1)):
        now += 0.01
        decision = machine.request_token(now, slot_key(None, f"https://api/{turn % 65}"))
        if isinstance(decision, StartRefresh):
            refreshes += 1
            machine.refresh_succeeded(now, decision.refresh_id, f"at-{turn}", now + HOUR)
        elif isinstance(decision, Fail):
            refused += 1
            assert decision.code == ErrorCode.REFRESH_FAILED and "ask again in" in decision.message
    assert refreshes == MAX_NARROWER_SLOTS and refused == 5  # the 65th, once a round
    # One window later, new slots are made again; the cached ones served all along.
    assert ready_value(machine.request_token(now, slot_key(None, "https://api/63"))) == "at-63"
    assert isinstance(machine.request_token(T0 + NEW_SLOT_WINDOW + 0.02,
                                            slot_key(None, "https://api/64")), StartRefresh)


def test_forcing_every_granted_slot_in_turn_cannot_refresh_at_will() -> None:
    """Rule 7, across slots: a login granted four scopes and one API has 31 narrower
    slots. Forcing each in turn (force_new, a huge min_valid, or naming its token as
    rejected), each slot on its own stays RECENT seconds apart, yet together they made
    31 refreshes (31 rotations, 31 secret-store writes) every 5 s, forever. Refreshes of
    narrower slots are at most MAX_NARROWER_SLOTS per NEW_SLOT_WINDOW seconds in all;
    the default token is not held back by them."""
    grant = Grant.of(["openid", "profile", "email", "offline_access"], ["https://api"])
    scopes = sorted(grant.scopes or ())
    subsets = [frozenset(s for bit, s in enumerate(scopes) if mask >> bit & 1)
               for mask in range(1, 16)]
    slots = [slot_key(subset, None) for subset in subsets] + [slot_key(None, "https://api")] \
        + [slot_key(subset, "https://api") for subset in subsets]
    assert len(set(slots)) == 31
    machine = logged_in()
    now, narrower_refreshes, issued = T0, [], 0
    for turn in range(3000):  # 3 requests a second for 1,000 s
        now += 1 / 3
        slot = slots[turn % len(slots)]
        cached = machine._narrower.get(slot)
        token = cached.token.value.reveal() if cached is not None and cached.token else None
        how = turn % 3
        decision = machine.request_token(
            now, slot, grant=grant, force_new=how == 0, min_valid=HOUR * 24 if how == 1 else 0,
            rejected_token=token if how == 2 else None)
        if isinstance(decision, StartRefresh):
            narrower_refreshes.append(now)
            issued += 1
            machine.refresh_succeeded(now, decision.refresh_id, f"at-{issued}", now + HOUR)
        else:
            assert isinstance(decision, Ready | Fail), decision
            if isinstance(decision, Fail):
                assert decision.code == ErrorCode.REFRESH_FAILED
                assert "ask again in" in decision.message
    busiest = max(sum(1 for t in narrower_refreshes if start <= t < start + NEW_SLOT_WINDOW)
                  for start in narrower_refreshes)
    assert busiest <= MAX_NARROWER_SLOTS, f"{busiest} narrower refreshes in one window"
    assert len(narrower_refreshes) <= MAX_NARROWER_SLOTS * (1000 // NEW_SLOT_WINDOW + 1)
    # The default token is refreshed as usual while the narrower budget is spent.
    refresh = start(machine.request_token(now, force_new=True))
    machine.refresh_succeeded(now, refresh.refresh_id, "at-default", now + HOUR)
    assert ready_value(machine.request_token(now)) == "at-default"


def test_slot_keys() -> None:
    assert slot_key() == slot_key([], "") == DEFAULT_SLOT
    assert slot_key(["b", "a"], "aud") == slot_key(("a", "b"), "aud")


# ---------------------------------------------------------------------------
# min_valid, force_new, rejected tokens: never a storm


def test_min_valid_refreshes_first_when_less_is_left() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 2000, min_valid=1800))  # 1600 s left
    machine.refresh_succeeded(T0 + 2001, refresh.refresh_id, "at-1", T0 + 2001 + HOUR)
    decision = machine.request_token(T0 + 2001, min_valid=1800, asked_at=T0 + 2000)
    assert ready_value(decision) == "at-1"


def test_min_valid_longer_than_the_lifetime_makes_one_refresh() -> None:
    machine = logged_in(lifetime=600)
    now = T0 + 100
    asks = [machine.request_token(now, min_valid=HOUR) for _ in range(10)]
    refresh = start(asks[0])
    assert asks[1:] == [WaitForRefresh(refresh.refresh_id)] * 9
    machine.refresh_succeeded(now + 1, refresh.refresh_id, "at-1", now + 601)
    # The provider granted 600 s, less than asked: that is the answer, for all ten.
    for _ in range(10):
        assert ready_value(machine.request_token(now + 1, min_valid=HOUR, asked_at=now)) == "at-1"
    # A new request moments later gets it too (issued under RECENT seconds ago).
    assert ready_value(machine.request_token(now + 1 + RECENT - 0.1, min_valid=HOUR)) == "at-1"
    # Later, a new request makes (exactly) one new refresh.
    assert isinstance(machine.request_token(now + 60, min_valid=HOUR), StartRefresh)


def test_a_token_expired_on_arrival_is_not_refreshed_again_for_the_same_request() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 2 * HOUR))
    # expires_in was 0 (or the clock is badly off): nothing valid came back.
    machine.refresh_succeeded(T0 + 2 * HOUR, refresh.refresh_id, "at-1", T0 + 2 * HOUR)
    decision = machine.request_token(T0 + 2 * HOUR + 0.1, asked_at=T0 + 2 * HOUR)
    assert isinstance(decision, Fail) and decision.code == ErrorCode.REFRESH_FAILED
    assert machine.in_flight is None


def test_force_new() -> None:
    machine = logged_in()
    now = T0 + 600
    refresh = start(machine.request_token(now, force_new=True))
    # The cached token was not called bad: others keep getting it meanwhile...
    assert ready_value(machine.request_token(now + 0.1)) == "at-0"
    # ...while a second force_new shares the refresh in flight.
    assert machine.request_token(now + 0.2, force_new=True) == WaitForRefresh(1)
    machine.refresh_succeeded(now + 1, refresh.refresh_id, "at-1", now + 1 + HOUR)
    for asked_at in (now, now + 0.2):
        assert ready_value(machine.request_token(now + 1, force_new=True, asked_at=asked_at)) \
            == "at-1"
    # A force_new right after that refresh completed gets its token...
    assert ready_value(machine.request_token(now + 1 + RECENT / 2, force_new=True)) == "at-1"
    # ...one later makes a new one.
    assert start(machine.request_token(now + 1 + RECENT, force_new=True)).refresh_id == 2


def test_force_new_during_a_refresh_nobody_forced_gets_one_of_its_own() -> None:
    """A restored session refreshes at once; `compozy auth refresh` asked meanwhile waits
    for that refresh, whose token was asked for before it and so is not new, then gets a
    refresh of its own (found by the django-oauth-toolkit restart test: it failed with
    "the new token had already expired when it arrived")."""
    machine = SessionLifecycle(T0, refresh_token="rt-0", rng=random.Random(1))
    restore = start(only(machine.tick(T0)))
    asked_at = T0 + 0.01
    assert machine.request_token(asked_at, force_new=True, recent=0) == WaitForRefresh(1)
    machine.refresh_succeeded(T0 + 0.1, restore.refresh_id, "at-1", T0 + HOUR, issued_at=T0)
    own = start(machine.request_token(T0 + 0.1, force_new=True, asked_at=asked_at, recent=0))
    machine.refresh_succeeded(T0 + 0.2, own.refresh_id, "at-2", T0 + HOUR,
                              issued_at=T0 + 0.15)
    assert ready_value(machine.request_token(T0 + 0.2, force_new=True, asked_at=asked_at,
                                             recent=0)) == "at-2"


def test_rejected_token_is_dropped_and_refreshed_once() -> None:
    machine = logged_in()
    now = T0 + 600
    refresh = start(machine.request_token(now, rejected_token="at-0"))
    # It was refused by an API: nobody gets it any more.
    assert machine.request_token(now + 0.1) == WaitForRefresh(refresh.refresh_id)
    assert machine.request_token(now + 0.1, rejected_token="at-0") == WaitForRefresh(1)
    machine.refresh_succeeded(now + 1, refresh.refresh_id, "at-1", now + 1 + HOUR)
    # Late 401s about the old token (even with force_new) get the new one, no refresh.
    for _ in range(50):
        decision = machine.request_token(now + 30, rejected_token="at-0", force_new=True)
        assert ready_value(decision) == "at-1"
    # The new token refused too: one more refresh.
    assert start(machine.request_token(now + 40, rejected_token="at-1")).refresh_id == 2


def test_a_waiter_whose_new_token_is_rejected_meanwhile_waits_for_the_next_one() -> None:
    machine = logged_in()
    now = T0 + HOUR + 10  # expired
    first = start(machine.request_token(now))
    assert machine.request_token(now) == WaitForRefresh(first.refresh_id)
    machine.refresh_succeeded(now + 1, first.refresh_id, "at-1", now + HOUR)
    # Before the waiter asks again, someone's API refuses the new token.
    second = start(machine.request_token(now + 1.5, rejected_token="at-1"))
    assert machine.request_token(now + 1.5, asked_at=now) == WaitForRefresh(second.refresh_id)
    machine.refresh_succeeded(now + 2, second.refresh_id, "at-2", now + HOUR)
    assert ready_value(machine.request_token(now + 2, asked_at=now)) == "at-2"


# ---------------------------------------------------------------------------
# Forced refreshes are spaced (rule 7): a loop cannot rotate the refresh token at will


def test_a_burst_of_forced_refreshes_makes_one_refresh_then_one_per_recent() -> None:
    machine = logged_in()
    now = T0 + 600
    # 200 force_new at once (recent=0.0 as the driver once passed: it cannot bypass the rule).
    burst = [machine.request_token(now, force_new=True, recent=0.0) for _ in range(200)]
    refresh = start(burst[0])
    assert burst[1:] == [WaitForRefresh(refresh.refresh_id)] * 199
    machine.refresh_succeeded(now + 0.2, refresh.refresh_id, "at-1", now + HOUR,
                              refresh_token="rt-1")
    machine.persist_done(now + 0.3, 2)
    answers = [machine.request_token(now + 0.3, force_new=True, asked_at=now, recent=0.0)
               for _ in range(200)]
    assert {ready_value(answer) for answer in answers} == {"at-1"}
    # More forced requests keep coming, every 0.1 s: each gets the newest token, no refresh.
    for step in range(1, int(RECENT * 10) - 2):
        later = now + 0.2 + step * 0.1
        assert ready_value(machine.request_token(later, force_new=True, recent=0.0)) == "at-1"
        assert machine.in_flight is None
    # RECENT seconds after the forced token was issued, a force makes a new one.
    again = start(machine.request_token(now + 0.2 + RECENT, force_new=True, recent=0.0))
    assert again.refresh_token == Secret("rt-1")


def test_forced_refreshes_are_spaced_per_slot() -> None:
    machine = logged_in()
    now = T0 + 600
    default = start(machine.request_token(now, force_new=True))
    machine.refresh_succeeded(now + 0.1, default.refresh_id, "at-1", now + HOUR)
    # Another slot has its own spacing: its first forced token is made at once.
    read = start(machine.request_token(now + 0.2, READ, force_new=True))
    machine.refresh_succeeded(now + 0.3, read.refresh_id, "at-read-1", now + HOUR)
    assert ready_value(machine.request_token(now + 1, READ, force_new=True)) == "at-read-1"
    assert ready_value(machine.request_token(now + 1, force_new=True)) == "at-1"
    assert machine.in_flight is None
    assert isinstance(machine.request_token(now + 0.1 + RECENT, force_new=True), StartRefresh)


def test_the_first_force_after_a_login_or_a_plain_refresh_makes_a_new_token_at_once() -> None:
    machine = logged_in()  # the login's token was issued at T0
    assert isinstance(machine.request_token(T0 + 0.5, force_new=True, recent=0.0), StartRefresh)
    machine = logged_in()
    assert isinstance(machine.request_token(T0 + 0.5, rejected_token="at-0"), StartRefresh)


def test_a_forced_token_rejected_within_recent_seconds_is_kept_and_the_caller_told_when(
) -> None:
    machine = logged_in()
    now = T0 + 600
    first = start(machine.request_token(now, rejected_token="at-0"))
    machine.refresh_succeeded(now + 1, first.refresh_id, "at-1", now + HOUR)
    # A caller in a loop: 401, reject, 401, reject... Only the first made a refresh.
    for step in range(1, 40):
        later = now + 1 + step * 0.1
        refused = machine.request_token(later, rejected_token="at-1")
        assert isinstance(refused, Fail) and refused.code == ErrorCode.REFRESH_FAILED
        assert f"at most one every {RECENT:.0f} s" in refused.message
        assert "ask again in" in refused.message and "at-1" not in refused.message
        # The token is kept: a plain or forced request does not refresh in its place.
        assert ready_value(machine.request_token(later)) == "at-1"
        assert ready_value(machine.request_token(later, force_new=True)) == "at-1"
        assert machine.in_flight is None
    assert start(machine.request_token(now + 1 + RECENT, rejected_token="at-1")).refresh_id == 2


FORCED_KINDS = st.sampled_from(["force_new", "reject_current", "reject_stale", "plain"])


@settings(max_examples=200, deadline=None, database=None)
@given(steps=st.lists(st.tuples(st.floats(0, 3), st.sampled_from([DEFAULT_SLOT, READ, API]),
                                FORCED_KINDS, st.floats(0, 2)), max_size=80))
# Found by random runs: a rejection empties the slot (rule 9 answers the rejecting caller
# with a failure), then a later request refills it; that refill is the force's refresh.
@example(steps=[(0.0, READ, "reject_current", 0.0), (0.0, READ, "force_new", 0.0),
                (0.0, READ, "reject_current", 0.0), (1.0, READ, "reject_stale", 0.0)])
@example(steps=[(0.0, READ, "reject_current", 0.0), (0.0, READ, "force_new", 0.0),
                (0.0, READ, "reject_current", 0.0), (1.0, READ, "reject_current", 1.0),
                (3.0, READ, "force_new", 0.0)])
@example(steps=[(0.0, READ, "reject_current", 0.0), (0.0, READ, "force_new", 0.0),
                (0.0, READ, "reject_current", 0.0), (5.0, READ, "reject_current", 0.0),
                (1.0, READ, "force_new", 0.0)])
def test_forced_refreshes_of_any_slot_start_at_least_recent_apart(
    steps: list[tuple[float, SlotKey, str, float]],
) -> None:
    """Whatever mix of forced, rejecting and plain requests arrives, and however long the
    provider takes, a forced refresh of a slot starts at least RECENT seconds after the
    token of its previous forced refresh was issued (tokens live an hour here: nothing
    is due for time alone, so every other refresh is a slot's first)."""
    machine = logged_in()
    now = T0
    issued = 0
    handed: dict[SlotKey, str] = {DEFAULT_SLOT: "at-0"}
    current: dict[SlotKey, str] = {DEFAULT_SLOT: "at-0"}  # the last token issued per slot
    forced_at: dict[SlotKey, float] = {}
    for pause, slot, kind, latency in steps:
        now += pause
        # A rejection can drop a slot's token without a refresh (rule 7, then rule 9
        # answers with the failure): such a slot holds no token any more.
        held = {token.value.reveal() for token in machine.access_tokens()}
        holding = slot in current and current[slot] in held
        decision = machine.request_token(
            now, slot, force_new=kind == "force_new", recent=0.0,
            rejected_token=handed.get(slot) if kind == "reject_current"
            else "at-stale" if kind == "reject_stale" else None)
        if isinstance(decision, Ready):
            handed[slot] = decision.token.value.reveal()
            assert decision.background is None
        if not isinstance(decision, StartRefresh):
            continue
        forcing = kind == "force_new" or (kind == "reject_current" and slot in handed)
        if holding:  # only forced requests may refresh a slot holding a token
            assert forcing, kind
        if forcing and slot in forced_at:
            assert now - forced_at[slot] >= RECENT, (slot, kind, now - forced_at[slot])
        issued += 1
        now += latency
        machine.refresh_succeeded(now, decision.refresh_id, f"at-{issued}", now + HOUR)
        current[slot] = f"at-{issued}"
        if forcing:
            forced_at[slot] = now


# ---------------------------------------------------------------------------
# The grant (rule 12): a narrower token never widens it

GRANT = Grant.of(["openid", "offline_access", "read", "write"], ["https://api.compozy.dev"])


@pytest.mark.parametrize(
    ("slot", "message"),
    [
        (slot_key(None, "https://api.compozy.dev/"),
         "audience https://api.compozy.dev/ was not granted to this session; "
         "granted: https://api.compozy.dev"),
        (slot_key(["read", "deploy"], "https://api.compozy.dev"),
         "scope deploy was not granted to this session; "
         "granted: offline_access openid read write"),
        (slot_key(["deploy", "admin"]),
         "scopes admin deploy were not granted to this session; "
         "granted: offline_access openid read write"),
        (slot_key(["read"], "https://evil.example"),
         "audience https://evil.example was not granted to this session; "
         "granted: https://api.compozy.dev"),
    ],
    ids=["trailing-slash", "one-scope", "two-scopes", "other-audience"],
)
def test_a_narrower_token_beyond_the_grant_is_refused_before_any_refresh(
    slot: SlotKey, message: str
) -> None:
    machine = logged_in()
    before = frozen(machine)
    for force_new in (False, True):
        decision = machine.request_token(T0 + 10, slot, grant=GRANT, force_new=force_new)
        assert decision == Fail(ErrorCode.BAD_REQUEST, message)
    assert machine.in_flight is None and frozen(machine) == before  # nothing spent, no slot
    # Within the grant, the same session refreshes as usual.
    within = start(machine.request_token(T0 + 10, slot_key(["read"], "https://api.compozy.dev"),
                                         grant=GRANT))
    assert within.refresh_token == Secret("rt-0")


def test_the_grant_when_scopes_are_unknown_or_no_audience_was_asked_for() -> None:
    machine = logged_in()
    unknown_scopes = Grant.of([], ["https://api.compozy.dev"])
    assert unknown_scopes.scopes is None
    assert unknown_scopes.refusal(slot_key(["anything"], "https://api.compozy.dev")) is None
    no_audiences = Grant.of(["read"], [])
    refused = machine.request_token(T0, API, grant=no_audiences)
    assert isinstance(refused, Fail) and refused.code == ErrorCode.BAD_REQUEST
    assert refused.message == (
        "audience https://api.example was not granted to this session; granted: none "
        "(add it to the profile's resources in the config and log in again)")
    assert no_audiences.refusal(DEFAULT_SLOT) is None
    assert isinstance(machine.request_token(T0 + 60, DEFAULT_SLOT, grant=no_audiences,
                                            force_new=True), StartRefresh)


def test_a_refusal_shows_odd_values_escaped_and_bounded() -> None:
    grant = Grant.of([f"s{number:03}" for number in range(30)], ["https://api"])
    refusal = grant.refusal(slot_key(["x\x1b[31m\nforged"], "https://api"))
    assert refusal is not None
    assert "\x1b" not in refusal.message and "\n" not in refusal.message
    assert "'x\\x1b[31m\\nforged'" in refusal.message
    assert refusal.message.endswith("s019 and 10 more")
    long = grant.refusal(slot_key(None, "https://" + "a" * 5000))
    assert long is not None and len(long.message) < 400


# ---------------------------------------------------------------------------
# Failures


def test_transient_failures_back_off_exponentially_up_to_the_cap() -> None:
    machine = SessionLifecycle(T0, refresh_token="rt-0", rng=random.Random(3))  # restored
    now, delays = T0, []
    for _ in range(12):
        assert machine.next_wakeup(now) == now
        refresh = start(only(machine.tick(now)))
        assert machine.refresh_failed_transient(now, refresh.refresh_id, reason="timeout") == []
        wakeup = machine.next_wakeup(now)
        assert wakeup is not None
        delays.append(wakeup - now)
        assert machine.tick(wakeup - 0.01) == []
        # (A caller that asked earlier than rule 8b's window: no attempt ahead of schedule.)
        decision = machine.request_token(wakeup - 0.01,
                                         asked_at=wakeup - 0.01 - EARLY_RETRY_WINDOW)
        assert isinstance(decision, Fail) and decision.code == ErrorCode.REFRESH_FAILED
        assert "timeout" in decision.message
        now = wakeup
    ceilings = [min(MAX_BACKOFF, 2.0 ** n) for n in range(12)]
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings,
                                                                         strict=True))
    assert max(delays) <= MAX_BACKOFF
    # Success resets the backoff.
    refresh = start(only(machine.tick(now)))
    machine.refresh_succeeded(now, refresh.refresh_id, "at-1", now + HOUR)
    refresh = start(machine.request_token(now + 10, force_new=True))
    machine.refresh_failed_transient(now + 10, refresh.refresh_id)
    assert machine.status(now + 10).retry_at is not None
    assert machine.status(now + 10).retry_at <= now + 10 + 1  # type: ignore[operator]


@pytest.mark.parametrize(
    ("retry_after", "expected_delay"),
    [(120.0, 120.0), (10 * MAX_RETRY_AFTER, MAX_RETRY_AFTER)],
)
def test_retry_after_is_honoured(retry_after: float, expected_delay: float) -> None:
    machine = SessionLifecycle(T0, refresh_token="rt-0", rng=random.Random(1))
    refresh = start(only(machine.tick(T0)))
    machine.refresh_failed_transient(T0, refresh.refresh_id, retry_after=retry_after,
                                     reason="HTTP 429")
    assert machine.next_wakeup(T0) == T0 + expected_delay
    assert machine.tick(T0 + expected_delay - 1) == []
    assert isinstance(only(machine.tick(T0 + expected_delay)), StartRefresh)


def test_a_short_retry_after_does_not_shorten_the_backoff() -> None:
    machine = SessionLifecycle(T0, refresh_token="rt-0", rng=random.Random(1))
    for _ in range(6):
        refresh = start(only(machine.tick(machine.next_wakeup(T0) or T0)))
        machine.refresh_failed_transient(T0, refresh.refresh_id, retry_after=0.1)
    wakeup = machine.next_wakeup(T0)
    assert wakeup is not None and wakeup - T0 >= 16


def test_the_valid_token_is_served_through_failures_and_fail_comes_once_it_is_gone() -> None:
    machine = logged_in(seed=5)
    due = machine.next_wakeup(T0)
    assert due is not None
    now = due
    needy = start(machine.request_token(now, min_valid=HOUR))  # wants more than is left
    assert ready_value(machine.request_token(now)) == "at-0"  # others are not held up
    assert machine.request_token(now, min_valid=HOUR) == WaitForRefresh(needy.refresh_id)
    machine.refresh_failed_transient(now + 1, needy.refresh_id, reason="HTTP 503")
    # The callers who waited: the one the token cannot serve is told; the others served.
    told = machine.request_token(now + 1, min_valid=HOUR, asked_at=now)
    assert isinstance(told, Fail) and told.code == ErrorCode.REFRESH_FAILED
    assert "HTTP 503" in told.message
    assert ready_value(machine.request_token(now + 1, min_valid=60, asked_at=now)) == "at-0"
    # The agent keeps retrying on its own while the token lasts; callers keep getting it.
    expires_at = T0 + HOUR
    while True:
        wakeup = machine.next_wakeup(now)
        assert wakeup is not None
        if wakeup >= expires_at:
            break
        now = wakeup
        refresh = start(only(machine.tick(now)))
        assert machine.request_token(now) == Ready(at("at-0"))
        machine.refresh_failed_transient(now, refresh.refresh_id, reason="HTTP 503")
    assert machine.state(expires_at) is State.EXPIRED
    # A caller past rule 8b's window (one within it gets an early attempt instead).
    gone = machine.request_token(expires_at, asked_at=expires_at - EARLY_RETRY_WINDOW)
    assert isinstance(gone, Fail) and gone.code == ErrorCode.REFRESH_FAILED
    assert machine.status(expires_at).warnings
    # The provider comes back.
    now = machine.next_wakeup(expires_at) or expires_at
    refresh = start(only(machine.tick(now)))
    machine.refresh_succeeded(now, refresh.refresh_id, "at-1", now + HOUR)
    assert machine.state(now) is State.FRESH
    assert machine.status(now).warnings == ()
    assert ready_value(machine.request_token(now)) == "at-1"


def test_invalid_grant_requires_a_login_and_deletes_the_refresh_token() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 10, force_new=True))
    assert machine.request_token(T0 + 10, READ) == WaitForRefresh(refresh.refresh_id)
    assert machine.refresh_failed_invalid_grant(T0 + 11, refresh.refresh_id) == [
        DeleteRefreshToken()]
    assert machine.state(T0 + 11) is State.LOGIN_REQUIRED
    assert machine.refresh_token is None
    assert machine.access_tokens() == []  # the grant is dead; so are its tokens
    for slot in (DEFAULT_SLOT, READ):
        decision = machine.request_token(T0 + 11, slot)
        assert isinstance(decision, Fail) and decision.code == ErrorCode.LOGIN_REQUIRED
    assert machine.tick(T0 + 11) == []
    assert machine.next_wakeup(T0 + 11) is None
    status = machine.status(T0 + 11)
    assert status.last_refresh_outcome == "rejected: invalid_grant"
    assert not status.has_refresh_token
    assert any("login required" in warning for warning in status.warnings)


def test_a_session_without_a_refresh_token_lasts_as_long_as_its_access_token() -> None:
    machine = logged_in(with_refresh_token=False)
    assert machine.state(T0 + 0.9 * HOUR) is State.FRESH
    assert ready_value(machine.request_token(T0 + 0.9 * HOUR)) == "at-0"
    assert machine.next_wakeup(T0) is None and machine.tick(T0 + 0.9 * HOUR) == []
    needs_more = machine.request_token(T0 + 100, min_valid=2 * HOUR)
    assert isinstance(needs_more, Fail) and needs_more.code == ErrorCode.LOGIN_REQUIRED
    assert machine.state(T0 + HOUR) is State.LOGIN_REQUIRED
    assert machine.revoked(T0 + HOUR) == []  # nothing to delete


def test_a_refused_narrower_token_fails_that_slot_only_for_a_while() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0, API))
    assert machine.request_token(T0, API) == WaitForRefresh(refresh.refresh_id)
    assert machine.refresh_refused(T0 + 1, refresh.refresh_id, reason="invalid_target") == []
    for asked_at in (T0, T0 + 30):  # the waiter, and a newcomer
        decision = machine.request_token(T0 + 30, API, asked_at=asked_at)
        assert isinstance(decision, Fail) and decision.code == ErrorCode.PROVIDER_ERROR
        assert "invalid_target" in decision.message
    assert ready_value(machine.request_token(T0 + 30)) == "at-0"
    assert isinstance(machine.request_token(T0 + 1 + REFUSAL_TTL, API), StartRefresh)


# ---------------------------------------------------------------------------
# Rotation: persist before reuse


def test_a_rotated_refresh_token_is_saved_before_it_is_spent_again() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 10, force_new=True))
    actions = machine.refresh_succeeded(T0 + 11, refresh.refresh_id, "at-1", T0 + 11 + 60,
                                        refresh_token="rt-1")
    assert actions == [PersistRefreshToken(2, Secret("rt-1"))]
    assert machine.status(T0 + 11).unsaved_refresh_token
    assert machine.status(T0 + 11).persist_warning is None  # in flight, not failed
    # The new token is handed out at once; a refresh must wait for the write.
    assert ready_value(machine.request_token(T0 + 11)) == "at-1"
    assert machine.request_token(T0 + 200) == WaitForRefresh(2)  # at-1 has expired
    assert machine.tick(T0 + 200) == []
    assert machine.next_wakeup(T0 + 200) is None
    # The write lands: the overdue refresh starts at once, with the new token.
    assert machine.persist_done(T0 + 200, 2) == [StartRefresh(3, DEFAULT_SLOT, Secret("rt-1"))]
    assert not machine.status(T0 + 200).unsaved_refresh_token


def test_the_same_refresh_token_back_is_not_a_rotation() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 10, force_new=True))
    assert machine.refresh_succeeded(T0 + 11, refresh.refresh_id, "at-1", T0 + 11 + HOUR,
                                     refresh_token="rt-0") == []
    assert machine.status(T0 + 11).last_refresh_outcome == "refreshed"


def test_a_failed_save_keeps_the_token_retries_and_warns() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 10, force_new=True))
    persist = only(machine.refresh_succeeded(T0 + 11, refresh.refresh_id, "at-1",
                                             T0 + 11 + HOUR, refresh_token="rt-1"))
    assert isinstance(persist, PersistRefreshToken)
    assert machine.persist_failed(T0 + 12, persist.persist_id, reason="keyring locked") == []
    status = machine.status(T0 + 12)
    assert status.unsaved_refresh_token and status.persist_warning is not None
    assert "keyring locked" in status.persist_warning
    assert status.persist_warning in status.warnings
    assert machine.refresh_token == Secret("rt-1")  # kept in memory
    retry_at = machine.next_wakeup(T0 + 12)
    assert retry_at is not None and T0 + 12.5 <= retry_at <= T0 + 13
    second = only(machine.tick(retry_at))
    assert second == PersistRefreshToken(3, Secret("rt-1"))
    machine.persist_failed(retry_at, 3)
    later = machine.next_wakeup(retry_at)
    assert later is not None and retry_at + 1 <= later <= retry_at + 2  # backing off
    # Meanwhile refreshes go on with the in-memory token; the next rotation is written at once.
    refresh = start(machine.request_token(retry_at + 1, READ))
    assert refresh.refresh_token == Secret("rt-1")
    assert machine.refresh_succeeded(retry_at + 1.1, refresh.refresh_id, "at-2",
                                     retry_at + HOUR, refresh_token="rt-2") == [
        PersistRefreshToken(5, Secret("rt-2"))]
    assert machine.persist_done(retry_at + 1.2, 5) == []
    status = machine.status(retry_at + 1.2)
    assert not status.unsaved_refresh_token and status.persist_warning is None
    assert status.warnings == ()


def test_a_refresh_token_not_yet_saved_at_login_is_saved_first() -> None:
    machine = SessionLifecycle(T0, refresh_token="rt-0", access_token=at(),
                               refresh_token_saved=False, rng=random.Random(1))
    assert machine.next_wakeup(T0) == T0
    assert machine.tick(T0) == [PersistRefreshToken(1, Secret("rt-0"))]


# ---------------------------------------------------------------------------
# Sleep and resume, restore


def test_after_a_suspend_past_expiry_the_next_request_refreshes() -> None:
    machine = logged_in()
    assert ready_value(machine.request_token(T0 + 60)) == "at-0"
    # The laptop sleeps for five hours; the driver's timers never fired.
    resumed = T0 + 5 * HOUR
    assert machine.state(resumed) is State.EXPIRED
    assert machine.request_token(resumed) == StartRefresh(1, DEFAULT_SLOT, Secret("rt-0"))
    assert machine.state(resumed) is State.REFRESHING
    assert machine.status(resumed).token_valid is False


def test_after_a_suspend_the_first_tick_refreshes() -> None:
    machine = logged_in()
    assert machine.next_wakeup(T0 + 5 * HOUR) == T0 + 5 * HOUR  # overdue: now
    assert machine.tick(T0 + 5 * HOUR) == [StartRefresh(1, DEFAULT_SLOT, Secret("rt-0"))]


def test_a_restored_session_warms_up_at_once() -> None:
    machine = SessionLifecycle(T0, refresh_token="rt-0", rng=random.Random(1))
    assert machine.state(T0) is State.EXPIRED
    assert machine.next_wakeup(T0) == T0
    assert machine.tick(T0) == [StartRefresh(1, DEFAULT_SLOT, Secret("rt-0"))]


# ---------------------------------------------------------------------------
# Revocation


def test_revoke_forgets_everything_and_absorbs_the_late_answer() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 10, force_new=True))
    assert machine.revoked(T0 + 11) == [DeleteRefreshToken()]
    assert machine.state(T0 + 11) is State.REVOKED
    decision = machine.request_token(T0 + 11)
    assert isinstance(decision, Fail) and decision.code == ErrorCode.NOT_LOGGED_IN
    assert machine.tick(T0 + 11) == [] and machine.next_wakeup(T0 + 11) is None
    # The refresh that was in flight answers: absorbed, its new token not kept.
    assert machine.refresh_succeeded(T0 + 12, refresh.refresh_id, "at-1", T0 + HOUR,
                                     refresh_token="rt-1") == []
    assert machine.refresh_token is None and machine.access_tokens() == []
    with pytest.raises(IllegalTransition):  # only once
        machine.refresh_succeeded(T0 + 12, refresh.refresh_id, "at-1", T0 + HOUR)


def test_a_save_landing_after_revoke_is_deleted_again() -> None:
    machine = logged_in()
    refresh = start(machine.request_token(T0 + 10, force_new=True))
    persist = only(machine.refresh_succeeded(T0 + 11, refresh.refresh_id, "at-1", T0 + HOUR,
                                             refresh_token="rt-1"))
    assert isinstance(persist, PersistRefreshToken)
    assert machine.revoked(T0 + 12) == [DeleteRefreshToken()]
    assert machine.persist_done(T0 + 13, persist.persist_id) == [DeleteRefreshToken()]


# ---------------------------------------------------------------------------
# Illegal moves raise and change nothing (h11's test_state.py)


def _idle() -> SessionLifecycle:
    return logged_in()


def _refreshing() -> SessionLifecycle:
    machine = logged_in()
    start(machine.request_token(T0 + 10, force_new=True))  # refresh 1
    return machine


def _persisting() -> SessionLifecycle:
    machine = _refreshing()
    machine.refresh_succeeded(T0 + 11, 1, "at-1", T0 + HOUR, refresh_token="rt-1")  # persist 2
    return machine


def _login_required() -> SessionLifecycle:
    machine = _refreshing()
    machine.refresh_failed_invalid_grant(T0 + 11, 1)
    return machine


def _revoked() -> SessionLifecycle:
    machine = logged_in()
    machine.revoked(T0 + 1)
    return machine


def _refreshing_narrower() -> SessionLifecycle:
    machine = logged_in()
    start(machine.request_token(T0 + 10, READ))  # refresh 1
    return machine


Move = Callable[[SessionLifecycle], object]
NOW = T0 + 20
ILLEGAL: list[tuple[str, Callable[[], SessionLifecycle], Move]] = [
    ("result with nothing in flight", _idle, lambda m: m.refresh_succeeded(NOW, 1, "x", NOW + 1)),
    ("transient with nothing in flight", _idle, lambda m: m.refresh_failed_transient(NOW, 1)),
    ("persist done with nothing in flight", _idle, lambda m: m.persist_done(NOW, 1)),
    ("result for another refresh", _refreshing,
     lambda m: m.refresh_succeeded(NOW, 7, "x", NOW + 1)),
    ("invalid_grant for another refresh", _refreshing,
     lambda m: m.refresh_failed_invalid_grant(NOW, 2)),
    ("persist outcome for a refresh", _refreshing, lambda m: m.persist_done(NOW, 1)),
    ("persist failure for a refresh", _refreshing, lambda m: m.persist_failed(NOW, 1)),
    ("refused default token", _refreshing, lambda m: m.refresh_refused(NOW, 1, reason="x")),
    ("refused for another refresh", _refreshing_narrower,
     lambda m: m.refresh_refused(NOW, 2, reason="x")),
    ("refresh outcome while persisting", _persisting,
     lambda m: m.refresh_succeeded(NOW, 2, "x", NOW + 1)),
    ("abandoning a persist", _persisting, lambda m: m.refresh_abandoned(NOW, 2)),
    ("the wrong persist", _persisting, lambda m: m.persist_done(NOW, 3)),
    ("the old refresh again", _persisting, lambda m: m.refresh_failed_transient(NOW, 1)),
    ("result after invalid_grant", _login_required,
     lambda m: m.refresh_succeeded(NOW, 1, "x", NOW + 1)),
    ("persist after invalid_grant", _login_required, lambda m: m.persist_done(NOW, 1)),
    ("revoking twice", _revoked, lambda m: m.revoked(NOW)),
    ("a result after revoke, nothing was in flight", _revoked,
     lambda m: m.refresh_succeeded(NOW, 1, "x", NOW + 1)),
]


@pytest.mark.parametrize(("setup", "move"), [(s, m) for _, s, m in ILLEGAL],
                         ids=[name for name, _, _ in ILLEGAL])
def test_illegal_moves_raise_and_change_nothing(
    setup: Callable[[], SessionLifecycle], move: Move
) -> None:
    machine = setup()
    before = frozen(machine)
    state_before = machine.state(NOW)
    with pytest.raises(IllegalTransition):
        move(machine)
    assert frozen(machine) == before
    assert machine.state(NOW) is state_before


def test_legal_moves_do_change_the_machine() -> None:
    """The check above would pass for a machine that ignores everything; this one would not."""
    machine = _refreshing()
    before = frozen(machine)
    machine.refresh_succeeded(NOW, 1, "x", NOW + HOUR)
    assert frozen(machine) != before


# ---------------------------------------------------------------------------
# Status, and never a token in sight


def test_status_snapshot() -> None:
    machine = logged_in(seed=2)
    status = machine.status(T0 + 10)
    assert status.state is State.FRESH and status.state.value == "fresh"
    assert status.expires_at == T0 + HOUR and status.token_valid and status.has_refresh_token
    assert status.last_refresh_at is None and status.last_refresh_outcome is None
    assert status.next_wakeup == machine.next_wakeup(T0 + 10)
    assert status.retry_at is None and status.warnings == ()
    refresh = start(machine.request_token(T0 + 20, force_new=True))
    assert machine.status(T0 + 20).state is State.REFRESHING
    assert machine.status(T0 + 20).token_valid  # a valid token remains
    machine.refresh_succeeded(T0 + 21, refresh.refresh_id, "at-1", T0 + 21 + HOUR,
                              refresh_token="rt-1")
    status = machine.status(T0 + 21)
    assert status.last_refresh_at == T0 + 21
    assert status.last_refresh_outcome == "refreshed; refresh token rotated"
    assert status.expires_at == T0 + 21 + HOUR - EXPIRY_MARGIN


def test_no_token_value_in_any_repr_or_message() -> None:
    secrets = ["AT-SECRET-0", "RT-SECRET-0", "AT-SECRET-1", "RT-SECRET-1"]
    machine = SessionLifecycle(T0, refresh_token=secrets[1], access_token=at(secrets[0]),
                               rng=random.Random(1))
    seen: list[object] = [machine, machine.access_tokens(), machine.refresh_token]
    refresh = start(machine.request_token(T0 + 10, rejected_token=secrets[0]))
    seen += [refresh, machine.request_token(T0 + 10)]
    seen += machine.refresh_succeeded(T0 + 11, refresh.refresh_id, secrets[2], T0 + HOUR,
                                      refresh_token=secrets[3])
    seen += [machine.request_token(T0 + 11), machine.status(T0 + 11), machine]
    try:
        machine.refresh_succeeded(T0 + 12, refresh.refresh_id, secrets[2], T0 + HOUR)
    except IllegalTransition as exc:
        seen.append(exc)
    text = " ".join(f"{item!r} {item!s} {item}" for item in seen)
    assert "redacted" in text
    assert not [secret for secret in secrets if secret in text]


# ---------------------------------------------------------------------------
# Random event sequences (hypothesis): one operation in flight, no token lost

SLOTS = st.sampled_from([DEFAULT_SLOT, READ, API])


class LifecycleModel(RuleBasedStateMachine):
    """Drives one machine with random events, against a model of the provider and the store."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.machine = SessionLifecycle(T0, refresh_token="rt-0", access_token=at(),
                                        rng=random.Random(0))
        self.provider_accepts: str | None = "rt-0"  # the one refresh token the provider accepts
        self.stored: str | None = "rt-0"  # what the secret store holds
        self.flight: StartRefresh | PersistRefreshToken | None = None
        self.orphan: StartRefresh | PersistRefreshToken | None = None
        self.handed_out: dict[SlotKey, str] = {}
        self.issued = 0
        self.revoked = False
        #: Rule 13, against the harshest provider: a rotation kills every access token
        #: issued before it (django-oauth-toolkit kills the spent refresh token's).
        self.access_tokens_issued = {"at-0"}
        self.killed: set[str] = set()

    def perform(self, actions: Iterable[Action | None]) -> None:
        for action in actions:
            match action:
                case StartRefresh(refresh_token=refresh_token):
                    assert self.flight is None, "two operations in flight"
                    assert refresh_token.reveal() == self.provider_accepts, "spent a stale token"
                    self.flight = action
                case PersistRefreshToken():
                    assert self.flight is None, "two operations in flight"
                    self.flight = action
                case DeleteRefreshToken():
                    self.stored = None
                case None:
                    pass

    @rule(seconds=st.one_of(st.floats(0, 10), st.floats(0, 2 * HOUR)))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(slot=SLOTS, min_valid=st.sampled_from([0.0, 60.0, 2 * HOUR]), force_new=st.booleans(),
          reject=st.booleans())
    def request(self, slot: SlotKey, min_valid: float, force_new: bool, reject: bool) -> None:
        rejected = self.handed_out.get(slot) if reject else None
        decision = self.machine.request_token(self.now, slot, min_valid=min_valid,
                                              force_new=force_new, rejected_token=rejected)
        match decision:
            case Ready(token=token, background=background):
                assert token.remaining(self.now) > 0, "handed out an expired token"
                assert token.value.reveal() not in self.killed, \
                    "handed out a token a rotation may have killed"
                self.handed_out[slot] = token.value.reveal()
                self.perform([background])
            case StartRefresh():
                self.perform([decision])
            case WaitForRefresh(until=float() as until):  # rule 8b: an early attempt later
                assert self.flight is None and until > self.now
            case WaitForRefresh(op_id=op_id):
                assert self.flight is not None and op_id in (
                    getattr(self.flight, "refresh_id", None),
                    getattr(self.flight, "persist_id", None))
            case Fail():
                pass

    @rule()
    def tick(self) -> None:
        self.perform(self.machine.tick(self.now))

    @precondition(lambda self: isinstance(self.flight, StartRefresh))
    @rule(outcome=st.sampled_from(["ok", "rotated", "transient", "invalid_grant", "refused",
                                   "abandoned"]),
          lifetime=st.sampled_from([0.0, 30.0, 600.0, HOUR]),
          retry_after=st.none() | st.floats(0, 1000))
    def refresh_outcome(self, outcome: str, lifetime: float, retry_after: float | None) -> None:
        refresh = self.flight
        assert isinstance(refresh, StartRefresh)
        refresh_id, machine, now = refresh.refresh_id, self.machine, self.now
        if outcome == "refused" and refresh.slot == DEFAULT_SLOT:
            before = frozen(machine)
            with pytest.raises(IllegalTransition):
                machine.refresh_refused(now, refresh_id, reason="invalid_scope")
            assert frozen(machine) == before
            return
        self.flight = None
        self.issued += 1
        if outcome in ("ok", "rotated"):
            new_refresh_token = None
            if outcome == "rotated":
                new_refresh_token = self.provider_accepts = f"rt-{self.issued}"
                self.killed |= self.access_tokens_issued
            self.access_tokens_issued.add(f"at-{self.issued}")
            actions = machine.refresh_succeeded(now, refresh_id, f"at-{self.issued}",
                                                now + lifetime, refresh_token=new_refresh_token)
        elif outcome == "transient":
            actions = machine.refresh_failed_transient(now, refresh_id, retry_after=retry_after)
        elif outcome == "invalid_grant":
            self.provider_accepts = None
            actions = machine.refresh_failed_invalid_grant(now, refresh_id)
        elif outcome == "refused":
            actions = machine.refresh_refused(now, refresh_id, reason="invalid_target")
        else:
            actions = machine.refresh_abandoned(now, refresh_id)
        self.perform(actions)

    @precondition(lambda self: isinstance(self.flight, PersistRefreshToken))
    @rule(saved=st.booleans())
    def persist_outcome(self, saved: bool) -> None:
        persist = self.flight
        assert isinstance(persist, PersistRefreshToken)
        self.flight = None
        if saved:
            self.stored = persist.refresh_token.reveal()
            self.perform(self.machine.persist_done(self.now, persist.persist_id))
        else:
            self.perform(self.machine.persist_failed(self.now, persist.persist_id,
                                                     reason="locked"))

    @rule(op_id=st.integers(0, 40), kind=st.sampled_from(["ok", "transient", "persist_done"]))
    def bogus_outcome(self, op_id: int, kind: str) -> None:
        for expected in (self.flight, self.orphan):
            if expected is not None and op_id == getattr(
                    expected, "refresh_id", getattr(expected, "persist_id", None)):
                return  # that one would be legal
        moves: dict[str, Move] = {
            "ok": lambda m: m.refresh_succeeded(self.now, op_id, "x", self.now + HOUR),
            "transient": lambda m: m.refresh_failed_transient(self.now, op_id),
            "persist_done": lambda m: m.persist_done(self.now, op_id),
        }
        before = frozen(self.machine)
        with pytest.raises(IllegalTransition):
            moves[kind](self.machine)
        assert frozen(self.machine) == before

    @precondition(lambda self: not self.revoked)
    @rule(coin=st.integers(0, 9))
    def revoke(self, coin: int) -> None:
        if coin:
            return  # rarely: it ends the session
        self.revoked = True
        self.orphan, self.flight = self.flight, None
        self.perform(self.machine.revoked(self.now))
        assert self.stored is None

    @precondition(lambda self: self.orphan is not None)
    @rule()
    def late_answer(self) -> None:
        orphan, self.orphan = self.orphan, None
        if isinstance(orphan, StartRefresh):
            assert self.machine.refresh_succeeded(self.now, orphan.refresh_id, "late",
                                                  self.now + HOUR, refresh_token="rt-late") == []
        else:
            assert isinstance(orphan, PersistRefreshToken)
            self.stored = orphan.refresh_token.reveal()
            self.perform(self.machine.persist_done(self.now, orphan.persist_id))
        assert self.machine.refresh_token is None and self.stored is None

    @invariant()
    def one_operation_in_flight(self) -> None:
        expected = None if self.flight is None else getattr(
            self.flight, "refresh_id", getattr(self.flight, "persist_id", None))
        assert self.machine.in_flight == expected

    @invariant()
    def the_rotated_refresh_token_is_never_lost(self) -> None:
        held = self.machine.refresh_token
        if self.revoked or self.provider_accepts is None:
            assert held is None
            return
        # The machine holds exactly the one token the provider still accepts...
        assert held is not None and held.reveal() == self.provider_accepts
        if self.stored == self.provider_accepts:
            return
        # ...and if the store lacks it, it is being written or a retry is scheduled.
        status = self.machine.status(self.now)
        assert status.unsaved_refresh_token
        being_written = isinstance(self.flight, PersistRefreshToken) \
            and self.flight.refresh_token == held
        assert being_written or status.persist_warning is not None

    def teardown(self) -> None:
        """With a healthy provider and store, the newest refresh token always gets saved."""
        for _ in range(20):
            if self.revoked or self.provider_accepts is None or (
                    self.flight is None and self.stored == self.provider_accepts):
                return
            flight = self.flight
            self.flight = None
            if isinstance(flight, StartRefresh):
                self.perform(self.machine.refresh_succeeded(
                    self.now, flight.refresh_id, "at-final", self.now + HOUR))
            elif isinstance(flight, PersistRefreshToken):
                self.stored = flight.refresh_token.reveal()
                self.perform(self.machine.persist_done(self.now, flight.persist_id))
            else:
                wakeup = self.machine.next_wakeup(self.now)
                assert wakeup is not None, "an unsaved refresh token and nothing scheduled"
                self.now = max(self.now, wakeup)
                self.perform(self.machine.tick(self.now))
        raise AssertionError("the newest refresh token was never saved")


LifecycleModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50,
                                            database=None, deadline=None)
TestLifecycleModel = LifecycleModel.TestCase
