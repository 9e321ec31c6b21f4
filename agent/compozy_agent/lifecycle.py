"""The token lifecycle of one session, as a sans-I/O state machine.

No sockets, HTTP, sleeps or clock reads: every event carries ``now`` (wall-clock
epoch seconds) and the machine answers with what the driver (``sessions.py``)
must do. Tests drive hours of token life in milliseconds.

States (derived, see :meth:`SessionLifecycle.state`)::

    FRESH ──(refresh due)──> EXPIRING ──(expires_at)──> EXPIRED
      ^                         │                          │
      └──── refresh ok ─────────┴── REFRESHING <───────────┘
                                       │
               invalid_grant ──> LOGIN_REQUIRED        revoke ──> REVOKED (terminal)

Rules:

1. Expiry is wall-clock ``expires_at`` (from ``expires_in`` measured when the
   response arrived). Every request compares it with ``now``, so a suspend
   that stops monotonic clocks cannot hand out an expired token.
2. Proactive refresh of the default token at a jittered 75-85 % of its
   lifetime, and never later than ``min(30 s, lifetime / 2)`` before expiry,
   so callers almost never wait.
3. Single flight: at most one refresh per session is in flight, whatever slot
   it is for, because every refresh (narrower scopes and audiences included)
   spends the session's one rotating refresh token. Everyone else waits and
   asks again when it ends.
4. A rotated refresh token must be persisted before it is spent again: while
   a persist is in flight no refresh starts. If persisting fails the token
   stays in memory (it is the only valid one), refreshes go on, the persist is
   retried, and the snapshot carries a warning.
5. ``min_valid``: refresh first when less is left; but a token issued within
   :data:`RECENT` seconds is handed out even if the provider granted less than
   ``min_valid``, so one request causes at most one refresh (no storms).
6. ``force_new``/``rejected_token``: the named (or current) token is dropped
   and refreshed, unless a token issued after the request arrived exists.
7. Transient failures (network, 5xx, 429) back off exponentially with jitter,
   from 1 s to :data:`MAX_BACKOFF` (Retry-After honoured), while the current
   token is handed out as long as it is valid; ``refresh_failed`` only once
   none is. ``invalid_grant`` means LOGIN_REQUIRED, and the refresh token is
   deleted.
8. An event that does not fit the state raises :class:`IllegalTransition` and
   changes nothing.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Final

from compozy_client.errors import ErrorCode

#: A token issued this recently is never refreshed again just for min_valid.
RECENT: Final = 5.0
MAX_BACKOFF: Final = 60.0
FIRST_BACKOFF: Final = 1.0
#: Rule 2's window, as fractions of the token's lifetime.
WINDOW: Final = (0.75, 0.85)
MAX_MARGIN: Final = 30.0

#: A cached access token's slot: (scope set or None, audience or None); (None, None) is default.
SlotKey = tuple[frozenset[str] | None, str | None]
DEFAULT_SLOT: Final[SlotKey] = (None, None)


class State(enum.Enum):
    FRESH = "fresh"
    EXPIRING = "expiring"
    REFRESHING = "refreshing"
    EXPIRED = "expired"
    LOGIN_REQUIRED = "login_required"
    REVOKED = "revoked"


class IllegalTransition(Exception):
    """An event that the current state does not allow; the state is unchanged."""


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    issued_at: float
    expires_at: float
    scope: list[str] | None = None

    def remaining(self, now: float) -> float:
        return self.expires_at - now


# Answers to request_token.
@dataclass(frozen=True)
class Ready:
    token: AccessToken


@dataclass(frozen=True)
class StartRefresh:
    """The caller runs this refresh and reports back; others wait for it."""

    slot: SlotKey


@dataclass(frozen=True)
class Wait:
    """A refresh or persist is in flight; ask again when it ends."""


@dataclass(frozen=True)
class Fail:
    code: str
    message: str


# Actions returned by events.
@dataclass(frozen=True)
class PersistRefreshToken:
    """Write the session's current refresh token to the secret store."""


@dataclass(frozen=True)
class DeleteRefreshToken:
    """Remove the session's refresh token from the secret store."""


Action = PersistRefreshToken | DeleteRefreshToken


@dataclass
class Snapshot:
    state: State
    expires_at: float | None
    last_refresh_at: float | None
    last_refresh_outcome: str | None
    next_wakeup: float | None
    warnings: list[str]


class SessionLifecycle:
    """The state of one session's tokens. See the module docstring for the rules."""

    def __init__(self, *, has_refresh_token: bool, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self.has_refresh_token = has_refresh_token
        self.slots: dict[SlotKey, AccessToken] = {}
        self.in_flight: SlotKey | None = None
        self.persist_in_flight = False
        self.persist_failed = False
        self.persist_retry_at: float | None = None
        self.refresh_due_at: float | None = None
        self.retry_at: float | None = None
        self.failures = 0
        self.login_required = not has_refresh_token
        self.revoked = False
        self.last_refresh_at: float | None = None
        self.last_refresh_outcome: str | None = None
        self.last_error: str | None = None
        #: The slot whose refresh failed and is retried.
        self.in_retry_slot: SlotKey = DEFAULT_SLOT

    # ------------------------------------------------------------------ queries

    def state(self, now: float) -> State:
        if self.revoked:
            return State.REVOKED
        if self.in_flight is not None:
            return State.REFRESHING
        token = self.slots.get(DEFAULT_SLOT)
        if token is not None and token.remaining(now) > 0:
            due = self.refresh_due_at
            return State.EXPIRING if due is not None and now >= due else State.FRESH
        if self.login_required or not self.has_refresh_token:
            return State.LOGIN_REQUIRED
        return State.EXPIRED

    def next_wakeup(self) -> float | None:
        """When the driver should call :meth:`tick` next (O(1))."""
        if self.revoked or self.login_required:
            return None
        candidates = [t for t in (self.retry_at, self.persist_retry_at) if t is not None]
        if self.retry_at is None and self.refresh_due_at is not None and self.has_refresh_token:
            candidates.append(self.refresh_due_at)
        return min(candidates) if candidates else None

    def snapshot(self, now: float) -> Snapshot:
        token = self.slots.get(DEFAULT_SLOT)
        warnings = []
        if self.persist_failed:
            warnings.append("the newest refresh token could not be saved to the secret store; "
                            "it is kept in memory and saving is retried")
        if self.retry_at is not None and self.last_error:
            warnings.append(f"refreshing failed ({self.last_error}); retrying")
        return Snapshot(self.state(now), token.expires_at if token else None,
                        self.last_refresh_at, self.last_refresh_outcome, self.next_wakeup(),
                        warnings)

    # ------------------------------------------------------------------ requests

    def request_token(
        self,
        now: float,
        slot: SlotKey = DEFAULT_SLOT,
        *,
        min_valid: float = 0.0,
        force_new: bool = False,
        rejected: str | None = None,
        arrived_at: float | None = None,
    ) -> Ready | StartRefresh | Wait | Fail:
        """What to do for a caller who wants a token of ``slot``.

        ``arrived_at`` is when the caller first asked (a waiting caller asks
        again with the same value), for rule 6.
        """
        if self.revoked:
            return Fail(ErrorCode.NOT_LOGGED_IN, "this session was revoked")
        arrived_at = now if arrived_at is None else arrived_at
        token = self.slots.get(slot)
        if token is not None and (force_new or rejected is not None):
            newer = token.issued_at > arrived_at
            named_other = rejected is not None and rejected != token.value
            if not (newer or named_other):
                del self.slots[slot]  # rule 6: drop it, then refresh below
                token = None
        if (token is not None and token.remaining(now) > 0
                and (token.remaining(now) >= min_valid or now - token.issued_at <= RECENT)):
            return Ready(token)
        if self.login_required or not self.has_refresh_token:
            return Fail(ErrorCode.LOGIN_REQUIRED,
                        self.last_error or "this session needs a new login")
        if self.in_flight is not None or self.persist_in_flight:
            return Wait()
        if self.retry_at is not None and now < self.retry_at:
            if token is not None and token.remaining(now) > 0:
                return Ready(token)  # rule 7: still valid, hand it out
            return Fail(ErrorCode.REFRESH_FAILED,
                        f"could not refresh the token ({self.last_error or 'provider error'}); "
                        "retrying automatically")
        self.in_flight = slot
        return StartRefresh(slot)

    def tick(self, now: float) -> StartRefresh | None:
        """The proactive refresh or a retry, when it is due (rule 2, rule 7)."""
        if self.revoked or self.login_required or not self.has_refresh_token:
            return None
        if self.in_flight is not None or self.persist_in_flight:
            return None
        due = self.retry_at if self.retry_at is not None else self.refresh_due_at
        if due is None or now < due:
            return None
        slot = self.in_retry_slot if self.retry_at is not None else DEFAULT_SLOT
        self.in_flight = slot
        return StartRefresh(slot)

    # ------------------------------------------------------------------ events

    def install(self, now: float, token: AccessToken, slot: SlotKey = DEFAULT_SLOT) -> None:
        """A token from a login (or a restored one)."""
        self.slots[slot] = token
        if slot == DEFAULT_SLOT:
            self.refresh_due_at = self._due(token)
        self.login_required = False

    def refresh_succeeded(
        self, now: float, slot: SlotKey, token: AccessToken, *, rotated: bool
    ) -> list[Action]:
        self._expect_in_flight(slot)
        self.in_flight = None
        self.retry_at = None
        self.failures = 0
        self.last_error = None
        self.last_refresh_at = now
        self.last_refresh_outcome = "ok"
        self.install(now, token, slot)
        if rotated:
            self.persist_in_flight = True
            return [PersistRefreshToken()]
        return []

    def refresh_failed_transient(
        self, now: float, slot: SlotKey, reason: str, retry_after: float | None = None
    ) -> None:
        self._expect_in_flight(slot)
        self.in_flight = None
        self.failures += 1
        backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.failures - 1))
        delay = backoff * self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, 10 * MAX_BACKOFF))
        self.retry_at = now + delay
        self.in_retry_slot = slot
        self.last_refresh_at = now
        self.last_refresh_outcome = f"failed: {reason}"
        self.last_error = reason

    def refresh_failed_invalid_grant(self, now: float, slot: SlotKey, reason: str) -> list[Action]:
        self._expect_in_flight(slot)
        self.in_flight = None
        self.retry_at = None
        self.login_required = True
        self.has_refresh_token = False
        self.slots.clear()
        self.refresh_due_at = None
        self.last_refresh_at = now
        self.last_refresh_outcome = f"rejected: {reason}"
        self.last_error = "the provider no longer accepts this session; log in again"
        return [DeleteRefreshToken()]

    def refresh_abandoned(self, slot: SlotKey) -> None:
        """The refresh was cancelled before an answer (e.g. shutdown)."""
        self._expect_in_flight(slot)
        self.in_flight = None

    def persist_done(self, now: float) -> None:
        if not self.persist_in_flight:
            raise IllegalTransition("no persist is in flight")
        self.persist_in_flight = False
        self.persist_failed = False
        self.persist_retry_at = None

    def persist_failed_at(self, now: float, retry_in: float = 30.0) -> None:
        if not self.persist_in_flight:
            raise IllegalTransition("no persist is in flight")
        self.persist_in_flight = False
        self.persist_failed = True
        self.persist_retry_at = now + retry_in

    def persist_retry_due(self, now: float) -> bool:
        """True (and a persist is then in flight) when a failed persist should be retried."""
        if self.persist_retry_at is None or now < self.persist_retry_at or self.persist_in_flight:
            return False
        self.persist_in_flight = True
        self.persist_retry_at = None
        return True

    def revoke(self) -> None:
        self.revoked = True
        self.slots.clear()
        self.refresh_due_at = None
        self.retry_at = None

    # ------------------------------------------------------------------ helpers

    def _expect_in_flight(self, slot: SlotKey) -> None:
        if self.in_flight != slot:
            raise IllegalTransition(f"no refresh of slot {slot!r} is in flight")

    def _due(self, token: AccessToken) -> float:
        lifetime = max(0.0, token.expires_at - token.issued_at)
        due = token.issued_at + lifetime * self._rng.uniform(*WINDOW)
        latest = token.expires_at - min(MAX_MARGIN, lifetime / 2)
        return min(due, latest)
