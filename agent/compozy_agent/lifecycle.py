"""The token lifecycle of one session, as a sans-I/O state machine.

This module owns every decision about a session's tokens: when to refresh,
who runs the refresh and who waits, what a failure means, when a rotated
refresh token must be saved. It does no I/O and reads no clock: every call
takes ``now`` (wall-clock epoch seconds) and answers with what the driver
(``sessions.py``) must do. Tests drive hours of token life in milliseconds.
"""

################################################################
# The rules
################################################################
#
# Rule 1: everything that decides what happens to a session's tokens lives in
# this file. The driver only performs the actions it is handed and reports
# back what happened; it never looks inside.
#
# Rule 2: no I/O and no clock reads here. Time arrives as ``now`` on every
# call, and expiry is always a wall-clock value. A token's life counts from
# when its request was *sent* (the driver passes that instant as
# ``issued_at``, with the provider's expiry counted from it), never from when
# the answer arrived: an answer that took 50 s to come took 50 s of the
# token's life with it. And the agent stops handing a token out EXPIRY_MARGIN
# seconds (at most half its life) before that expiry: the provider's ``exp``
# has whole seconds, so its clock may end the token up to a second early, and
# the caller still has to use it. Every call compares expiry with ``now``: a
# suspended laptop whose monotonic clock stopped can never be handed an
# expired token, and a token the agent cannot be sure is valid is never
# handed out.
#
# Theory of operation
# ===================
#
# A session is one refresh token plus the access tokens obtained with it. The
# default access token (the login's scopes, no audience) lives in the slot
# keyed DEFAULT_SLOT == (None, None); narrower tokens (RFC 6749 section 6
# downscoping, RFC 8707 audiences) live in slots keyed (frozenset of scopes,
# audience). Each slot caches one AccessToken.
#
# There are two machines, as in h11:
#
# 1) The *phase* of the session, stored, changed only by events, with its
#    transitions in the table _TRANSITIONS below:
#
#        IDLE ──start refresh──> REFRESHING ──ok, refresh token rotated──> PERSISTING
#         ^ ^                      │  │                                      │
#         │ └─ ok / transient / ───┘  └─ invalid_grant ──> LOGIN_REQUIRED    │
#         │    refused / abandoned                                          │
#         └────────────────────── persist done / persist failed ────────────┘
#         IDLE ──persist retry due──> PERSISTING
#         any phase ──revoked──> REVOKED (terminal)
#
#    IDLE holds a refresh token with nothing in flight; LOGIN_REQUIRED holds
#    none (never had one, or the provider rejected it).
#
# 2) Each slot's *freshness*, never stored: it is where ``now`` falls
#    against the slot token's deadlines (refresh_due_at, expires_at). Time
#    passing is not an event anyone reliably tells us about (the machine may
#    have been asleep), so freshness is recomputed on every call.
#
# The session State reported to users joins the two (see
# SessionLifecycle.state): REVOKED and REFRESHING come from the phase; then
# the default token decides FRESH (valid, before its refresh window),
# EXPIRING (valid, inside the window) or, when no valid default token is
# left, EXPIRED (a refresh token is held) or LOGIN_REQUIRED (none is).
#
# Rule 3, single flight: at most one operation on the refresh token is in
# flight per session: one refresh (of *any* slot) or one persist. Every
# refresh, narrower ones included, spends the session's refresh token, and
# providers that rotate refresh tokens invalidate the old one on use: two
# concurrent refreshes would spend the same token twice, and one of them
# would lose (or, with reuse detection, revoke the whole session). So a
# request that needs a refresh while anything is in flight gets
# WaitForRefresh; the driver wakes it when the operation ends and it asks
# again. A request whose slot holds a good enough token is answered Ready at
# once, whatever is in flight.
#
# Rule 4, persist before reuse: a rotated refresh token is the only valid one;
# the driver must save it (PersistRefreshToken) and report the outcome. While
# that write is in flight no refresh starts (rule 3), so writes land in the
# order the tokens were issued and the store never goes back to a spent
# token. If the write fails the new token stays in memory (dropping it would
# lose the session), the write is retried with backoff (persist_retry_at),
# the status carries a warning, and refreshes go on: the stored token is
# already spent, so spending the in-memory one again risks nothing more, and
# each later rotation is written at once (the newest token is always what is
# written).
#
# Rule 5, proactive refresh: the default token is refreshed at a jittered
# 75-85 % of its lifetime (WINDOW; jitter from the injected random.Random),
# never later than min(MIN_MARGIN, lifetime / 2) before expiry, and never
# sooner than RECENT seconds after the answer arrived (a provider granting
# absurdly short tokens, or answering slower than they live, gets one
# refresh per RECENT seconds, not a loop). next_wakeup() says
# when the driver should next call tick(); it is O(1). The driver caps its
# sleeps (monotonic clocks stop during suspend) and calls tick() on waking.
# A narrower token is not kept warm (each refresh spends the shared refresh
# token; nobody may ask for that audience again): a request that finds it
# inside its window is answered Ready *and* handed a background StartRefresh
# when nothing else is in flight. The default slot gets the same treatment,
# which covers a driver that wakes late.
#
# Rule 6, min_valid: a request is answered from the cache only when the token
# has at least min_valid seconds left; otherwise it refreshes first. But a
# token issued at or after the request began, or less than RECENT seconds
# ago, is handed out even with less: if the provider grants less than
# min_valid, one request causes one refresh, and a crowd of them causes one
# in all (no refresh storms). Requests that wait and ask again must pass the
# same ``asked_at``.
#
# Rule 7, rejected tokens: ``rejected_token`` (a resource server answered 401)
# is compared with the cached token in constant time; if it is the cached
# token it is dropped and a refresh made; if not, the cache already holds a
# newer one and that is the answer. ``force_new`` asks for a token issued
# after the request began (or within RECENT seconds): the cached one keeps
# serving other callers until it is replaced, since nobody said it was bad.
# Either way concurrent askers share the one refresh (rule 3).
# Forced refreshes of a slot (``force_new``, or ``rejected_token`` naming the
# cached token) are at least RECENT seconds apart, whatever the driver passes
# as ``recent``: every refresh rotates the refresh token and writes it to the
# secret store, and a caller in a loop (a buggy tool, a host on the forwarding
# socket) must not turn that into hundreds a second. The slot remembers when
# it was last forced (forced_at: the decision, then the issue of the token
# that force brought). Within RECENT seconds of that, ``force_new`` is
# answered with the cached token (the one the force produced, or newer), and
# a ``rejected_token`` naming it fails with refresh_failed and a time to ask
# again; the token is kept, or a plain request would refresh in its place.
# Only a rejection empties a slot; the refresh that refills it counts as that
# force's refresh, whoever's request starts it and however late.
# Many slots are the other way to refresh at will: each slot alone is spaced,
# but forcing each granted (scopes, audience) in turn (four scopes and one API
# make 31 slots) or cycling through more slots than the cache holds (each
# refetched) added up to a refresh per request. So refreshes of narrower slots,
# new or cached, forced or not, are at most MAX_NARROWER_SLOTS per
# NEW_SLOT_WINDOW seconds for the whole session, one per RECENT seconds on
# average; beyond that, refresh_failed with a time (and no background refresh).
# The default token is not counted: it has its own spacing, and callers of
# narrower tokens must not be able to starve it.
#
# Rule 8, failures: a transient failure (network, 5xx, 429, timeouts) backs
# off exponentially with jitter from FIRST_BACKOFF to MAX_BACKOFF, or longer
# when the provider sent Retry-After (honoured up to MAX_RETRY_AFTER). The
# backoff respects the default token's expiry: while it is valid, the next
# attempt comes no later than halfway to its expiry (and no sooner than
# EARLY_RETRY_SPACING), so a flapping network gets several attempts before
# the token runs out instead of one long wait past it. While backing off, a
# request the cached token satisfies is answered with it; a request that has
# a valid token, just not valid long enough, fails with refresh_failed at
# once, rather than hang. A request for which no valid token is left may
# start one attempt ahead of the schedule (rule 8b). The callers who waited
# for the failed refresh are told refresh_failed, unless the cached token
# still serves them or rule 8b lets them wait for another attempt.
# invalid_grant means the refresh token is dead:
# LOGIN_REQUIRED, every cached token dropped, DeleteRefreshToken. A narrower
# request the provider refuses (invalid_scope, invalid_target) fails for that
# slot alone, for REFUSAL_TTL seconds.
#
# Rule 8b, early attempts: when a request finds no valid token in its slot
# (none, expired, or rejected) and the session is backing off, one refresh may
# start ahead of the schedule, if none started in the last
# EARLY_RETRY_SPACING seconds: still single flight (rule 3), so a crowd of
# callers causes at most one attempt a second. Such a request keeps the agent
# trying this way for EARLY_RETRY_WINDOW seconds after it asked (told
# WaitForRefresh with ``until`` while the spacing runs), so a flapping network
# costs a caller a retry, not an outage, and a dead one costs it a few
# seconds. A provider's Retry-After is never jumped (rule 8).
#
# Rule 9, no second refresh for one request: when a refresh of its slot has
# ended since the request began (attempt_ended_at >= asked_at) and still
# cannot serve it, the request fails; it never starts another, except under
# rule 8b. (It does wait for a refresh of its slot already in flight: that
# one may serve it.) A force_new request that waited for a refresh nobody
# forced (begun before it asked, e.g. on restore) is not served by it: it then
# starts its own forced refresh, once.
#
# Rule 10: an event the phase does not allow (a result for a refresh that is
# not in flight, a second revoke) raises IllegalTransition and changes
# nothing. The one exception is the answer to the operation that was in
# flight when the session was revoked: it is expected, and is absorbed.
#
# Rule 11: no token value ever appears in a repr, str or exception message:
# values are wrapped in Secret, and messages are built from codes and times.
#
# Rule 12, a refresh narrows a grant, never widens it (RFC 6749 section 6,
# RFC 8707 section 2.2): a narrower slot is asked of the provider only when
# its scopes are among those granted at login and its audience is one of the
# resources the login asked for (the driver passes them as a Grant). Anything
# else fails with bad_request, naming what was granted, before any refresh:
# a provider may spend (rotate) the refresh token before it finds the target
# unknown (node oidc-provider does, for invalid_target), which would end the
# session over a typo.
#
# Rule 13, a rotation supersedes every other slot: when a refresh rotates the
# refresh token, the access tokens cached in the *other* slots are no longer
# handed out (a request for one refreshes it; the default token is not
# refreshed ahead of a request, which would kill the token just handed out).
# Some providers (django-oauth-toolkit) revoke the previous access token the
# moment a refresh rotates, and nothing in the answer says so; a token the
# agent has reason to believe dead is never handed out. The superseded tokens
# are still listed by access_tokens() until they expire, for revocation at
# logout at providers that did not kill them. The default slot stays on its
# proactive schedule (idle refresh tokens expire at some providers), but is not
# refreshed ahead of a request before the token that superseded it is due: that
# refresh may kill the token just handed out. The cost, at a rotating provider
# only: a request that switches slots refreshes (bounded by rule 7).
#
# Rule 14, a session never shrinks silently: every default refresh's ``scope``
# goes to the session's ScopeWatch (``narrowing.py``); fewer scopes than the
# login granted are served as they are (it is what the provider holds) and
# reported (Status.missing_scopes), and a shrink after a narrower refresh of
# the same chain marks the provider as narrowing chains (narrows_chains).
#
# The driver's side of the contract
# ---------------------------------
#
# - Perform every Action returned, in order: run a StartRefresh (also the one
#   in Ready.background, and the one request_token returns), shielded from
#   cancellation; write a PersistRefreshToken; delete on DeleteRefreshToken.
# - Answer every StartRefresh and PersistRefreshToken exactly once, with its
#   id, through one outcome method. Each outcome method returns whatever is
#   due right after it (a persist, the next refresh), so there is no need to
#   call tick() after an event.
# - When an operation ends, wake the callers told WaitForRefresh; they ask
#   again with their original ``asked_at`` (one told WaitForRefresh with
#   ``until`` also asks again at that wall-clock time, if nothing ended before).
# - Sleep until next_wakeup() (re-read after every call; it is O(1)), in
#   capped slices, then call tick(). None means: nothing until an event.

from __future__ import annotations

import enum
import hmac
import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Final, TypeAlias

import msgspec

from compozy_agent.narrowing import ScopeWatch
from compozy_client.errors import ErrorCode

__all__ = [
    "DEFAULT_SLOT",
    "EARLY_RETRY_SPACING",
    "EARLY_RETRY_WINDOW",
    "EXPIRY_MARGIN",
    "FIRST_BACKOFF",
    "MAX_BACKOFF",
    "MAX_NARROWER_SLOTS",
    "MAX_RETRY_AFTER",
    "MIN_MARGIN",
    "NEW_SLOT_WINDOW",
    "RECENT",
    "REFUSAL_TTL",
    "WINDOW",
    "AccessToken",
    "AccessTokenSlot",
    "Action",
    "Decision",
    "DeleteRefreshToken",
    "Fail",
    "Grant",
    "IllegalTransition",
    "PersistRefreshToken",
    "Ready",
    "Secret",
    "SessionLifecycle",
    "SlotKey",
    "StartRefresh",
    "State",
    "Status",
    "WaitForRefresh",
    "slot_key",
    "usable_token",
]

#: A token issued this recently is new enough for any request (rules 5-7).
RECENT: Final = 5.0
#: Rule 5's proactive window, as fractions of the default token's lifetime.
WINDOW: Final = (0.75, 0.85)
#: The proactive refresh happens at least this long before expiry (capped at lifetime / 2).
MIN_MARGIN: Final = 30.0
#: Rule 8's backoff: the first delay, doubling per consecutive failure, up to the cap.
FIRST_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 60.0
#: The longest Retry-After honoured; a provider asking for more is retried after this.
MAX_RETRY_AFTER: Final = 600.0
#: How long a narrower token the provider refused is not asked for again.
REFUSAL_TTL: Final = 60.0
#: Narrower slots kept per session; the least recently used one goes first.
MAX_NARROWER_SLOTS: Final = 64
#: Rule 7: at most MAX_NARROWER_SLOTS refreshes of narrower slots in this many seconds.
NEW_SLOT_WINDOW: Final = MAX_NARROWER_SLOTS * RECENT
#: Rule 2: a token is handed out until this long (at most half its life) before the
#: provider's expiry: ``exp`` has whole seconds, and the caller still has to use it.
EXPIRY_MARGIN: Final = 2.0
#: Rule 8b: attempts ahead of the backoff schedule start at most this often.
EARLY_RETRY_SPACING: Final = 1.0
#: Rule 8b: how long after it asked a request without a valid token keeps the agent trying.
EARLY_RETRY_WINDOW: Final = 5.0

#: (scopes, audience) of a cached access token; (None, None) is the default token.
SlotKey: TypeAlias = tuple[frozenset[str] | None, str | None]
DEFAULT_SLOT: Final[SlotKey] = (None, None)


def slot_key(scopes: Iterable[str] | None = None, audience: str | None = None) -> SlotKey:
    """The slot for a request's scopes and audience; empty values mean the default."""
    scope_set = frozenset(scopes) if scopes is not None else None
    return (scope_set or None, audience or None)


#: How many granted values a bad_request message names before "and N more".
_NAMES_SHOWN: Final = 20
#: How much of one (caller- or provider-supplied) value such a message shows.
_NAME_CHARS: Final = 200


def _shown(value: str) -> str:
    """A caller's or provider's value, safe to put in a message: printable ASCII without
    spaces as it is (every RFC 6749 scope-token and sane URI), anything else escaped."""
    if value.isascii() and value.isprintable() and " " not in value and value:
        shown = value
    else:
        shown = ascii(value)
    return shown if len(shown) <= _NAME_CHARS else shown[:_NAME_CHARS] + "..."


def _names(values: Iterable[str]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "none"
    listed = " ".join(_shown(value) for value in ordered[:_NAMES_SHOWN])
    more = len(ordered) - _NAMES_SHOWN
    return listed + (f" and {more} more" if more > 0 else "")


class Grant(msgspec.Struct, frozen=True):
    """What a session was granted at login, which a narrower token may not exceed (rule 12).

    ``scopes``: the login response's ``scope``, or what the login asked for when
    the provider left it out (RFC 6749 section 5.1); None when not known (a
    session saved without them), and then not checked. ``audiences``: the RFC
    8707 resources the login asked for; compared exactly, as providers do (a
    trailing slash names another resource).
    """

    scopes: frozenset[str] | None
    audiences: frozenset[str]

    @classmethod
    def of(cls, scopes: Iterable[str], audiences: Iterable[str]) -> Grant:
        """From a session's stored scopes and resources; no scopes means not known."""
        return cls(frozenset(scopes) or None, frozenset(audiences))

    def refusal(self, slot: SlotKey) -> Fail | None:
        """Why ``slot`` is more than this grant (a bad_request), or None if it is within."""
        scopes, audience = slot
        if audience is not None and audience not in self.audiences:
            return Fail(ErrorCode.BAD_REQUEST, (
                f"audience {_shown(audience)} was not granted to this session; "
                f"granted: {_names(self.audiences)}"
                + ("" if self.audiences else
                   " (add it to the profile's resources in the config and log in again)")))
        if scopes is not None and self.scopes is not None:
            extra = scopes - self.scopes
            if extra:
                noun = "scope" if len(extra) == 1 else "scopes"
                return Fail(ErrorCode.BAD_REQUEST, (
                    f"{noun} {_names(extra)} {'was' if len(extra) == 1 else 'were'} not granted "
                    f"to this session; granted: {_names(self.scopes)}"))
        return None


class IllegalTransition(Exception):
    """An event the session's phase does not allow. The machine is unchanged."""


class Secret:
    """A token value that never shows in a repr, str or f-string (rule 11)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value, for the one place that must send or store it."""
        return self._value

    def matches(self, value: str) -> bool:
        """Whether ``value`` is this secret, compared in constant time."""
        return hmac.compare_digest(self._value.encode(), value.encode())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self.matches(other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__


class AccessToken(msgspec.Struct, frozen=True):
    """A cached access token. ``issued_at`` and ``expires_at`` are on the agent's wall clock."""

    value: Secret
    issued_at: float
    expires_at: float
    #: The scopes the provider granted, when it said (RFC 6749 section 5.1).
    scope: tuple[str, ...] | None = None

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expires_at - self.issued_at)


def usable_token(
    value: str, *, sent_at: float, expires_at: float, scope: Iterable[str] | None = None
) -> AccessToken:
    """The AccessToken for a provider's answer to a request sent at ``sent_at``, whose
    expiry (counted from ``sent_at``) is ``expires_at``: handed out until EXPIRY_MARGIN
    (at most half its life) before then (rule 2)."""
    stated_expiry = max(expires_at, sent_at)
    margin = min(EXPIRY_MARGIN, (stated_expiry - sent_at) / 2)
    return AccessToken(Secret(value), sent_at, stated_expiry - margin,
                       tuple(scope) if scope is not None else None)


# ---------------------------------------------------------------------------
# What request_token answers (a Decision) and what events ask of the driver
# (Actions). StartRefresh is both: the caller that receives it must run it.


class Ready(msgspec.Struct, frozen=True):
    """Hand out ``token``. If ``background`` is set, also run that refresh (don't wait for it)."""

    token: AccessToken
    background: StartRefresh | None = None


class StartRefresh(msgspec.Struct, frozen=True):
    """Run this refresh (shielded from cancellation) and report its outcome.

    Spend ``refresh_token`` at the token endpoint, asking for ``slot``'s scopes
    (RFC 6749 section 6) and audience (RFC 8707 ``resource``) when set. Report
    with refresh_succeeded / refresh_failed_transient /
    refresh_failed_invalid_grant / refresh_refused / refresh_abandoned, passing
    ``refresh_id``. Whoever else needs a refresh meanwhile is told to wait.
    """

    refresh_id: int
    slot: SlotKey
    refresh_token: Secret

    @property
    def scopes(self) -> list[str] | None:
        return sorted(self.slot[0]) if self.slot[0] is not None else None

    @property
    def audience(self) -> str | None:
        return self.slot[1]


class WaitForRefresh(msgspec.Struct, frozen=True):
    """A refresh (or the saving of a rotated refresh token) is in flight, or (``until``
    set) an early attempt may start at that wall-clock time (rule 8b).

    Wait until operation ``op_id`` ends (or ``until`` comes, when set), then ask again
    with the same ``asked_at``.
    """

    op_id: int
    until: float | None = None


class Fail(msgspec.Struct, frozen=True):
    """Answer the caller with this wire error (``compozy_client.errors.ErrorCode``)."""

    code: str
    message: str


class PersistRefreshToken(msgspec.Struct, frozen=True):
    """Write ``refresh_token`` to the secret store; report persist_done / persist_failed."""

    persist_id: int
    refresh_token: Secret


class DeleteRefreshToken(msgspec.Struct, frozen=True):
    """Remove the session's refresh token from the secret store (best effort)."""


Decision: TypeAlias = Ready | StartRefresh | WaitForRefresh | Fail
Action: TypeAlias = StartRefresh | PersistRefreshToken | DeleteRefreshToken


class State(enum.Enum):
    """The session's state as ``compozy auth status`` shows it (values are the wire strings)."""

    FRESH = "fresh"
    EXPIRING = "expiring"
    REFRESHING = "refreshing"
    EXPIRED = "expired"
    LOGIN_REQUIRED = "login_required"
    REVOKED = "revoked"


class Status(msgspec.Struct, frozen=True):
    """A snapshot for ``compozy auth status``. Never carries a token."""

    state: State
    #: The default token's expiry, if one is cached (even an expired one).
    expires_at: float | None
    #: Whether the default token is valid now (during REFRESHING: whether one remains).
    token_valid: bool
    has_refresh_token: bool
    last_refresh_at: float | None
    #: "refreshed", "refreshed; refresh token rotated", "failed: ...", "rejected: ...", ...
    last_refresh_outcome: str | None
    #: When a refresh is next allowed after transient failures, if backing off.
    retry_at: float | None
    next_wakeup: float | None
    #: The newest refresh token is not (yet) known to be in the secret store.
    unsaved_refresh_token: bool
    #: Set when saving the newest refresh token failed (rule 4).
    persist_warning: str | None
    warnings: tuple[str, ...]
    #: Granted scopes the provider no longer holds for this session (rule 14).
    missing_scopes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The phase machine (rule 3's single flight, rule 4's persist-before-reuse).


class Phase(enum.Enum):
    IDLE = "idle"
    REFRESHING = "refreshing"
    PERSISTING = "persisting"
    LOGIN_REQUIRED = "login_required"
    REVOKED = "revoked"


class Event(enum.Enum):
    START_REFRESH = "start refresh"
    REFRESH_OK = "refresh ok"
    REFRESH_OK_ROTATED = "refresh ok, refresh token rotated"
    REFRESH_TRANSIENT = "refresh failed (transient)"
    REFRESH_INVALID_GRANT = "refresh failed (invalid_grant)"
    REFRESH_REFUSED = "narrower refresh refused"
    REFRESH_ABANDONED = "refresh abandoned"
    START_PERSIST = "start persist"
    PERSIST_DONE = "persist done"
    PERSIST_FAILED = "persist failed"
    REVOKE = "revoke"


_TRANSITIONS: Final[dict[Phase, dict[Event, Phase]]] = {
    Phase.IDLE: {
        Event.START_REFRESH: Phase.REFRESHING,
        Event.START_PERSIST: Phase.PERSISTING,
        Event.REVOKE: Phase.REVOKED,
    },
    Phase.REFRESHING: {
        Event.REFRESH_OK: Phase.IDLE,
        Event.REFRESH_OK_ROTATED: Phase.PERSISTING,
        Event.REFRESH_TRANSIENT: Phase.IDLE,
        Event.REFRESH_INVALID_GRANT: Phase.LOGIN_REQUIRED,
        Event.REFRESH_REFUSED: Phase.IDLE,
        Event.REFRESH_ABANDONED: Phase.IDLE,
        Event.REVOKE: Phase.REVOKED,
    },
    Phase.PERSISTING: {
        Event.PERSIST_DONE: Phase.IDLE,
        Event.PERSIST_FAILED: Phase.IDLE,
        Event.REVOKE: Phase.REVOKED,
    },
    Phase.LOGIN_REQUIRED: {
        Event.REVOKE: Phase.REVOKED,
    },
    Phase.REVOKED: {},
}


def _retry_hint(slot: SlotKey | None, delay: float) -> str:
    if slot == DEFAULT_SLOT:
        return f"the agent retries in {delay:.0f} s"
    return f"ask again in {delay:.0f} s or later"


class _Flight(msgspec.Struct, frozen=True):
    """The one operation in flight: a refresh of ``slot``, or a persist (slot is None)."""

    op_id: int
    slot: SlotKey | None
    #: Rule 7: a refresh a caller forced (its token's issue time becomes forced_at).
    forced: bool = False


class AccessTokenSlot(msgspec.Struct):
    """The cache for one (scopes, audience) of a session, and what its last refresh did."""

    key: SlotKey
    token: AccessToken | None = None
    #: Rule 5: when this token enters its refresh window.
    refresh_due_at: float | None = None
    #: Rule 9: when the last refresh of this slot ended (success or not).
    attempt_ended_at: float | None = None
    #: Rule 9: whether that refresh was forced (a force_new caller it did not serve
    #: joined one begun for something else, and gets one of its own).
    attempt_forced: bool = True
    #: What callers who waited for that refresh are told if it did not serve them.
    failure: Fail | None = None
    #: Rule 8: a refused narrower slot is not asked for again before this.
    refused_until: float | None = None
    #: Rule 7: when this slot was last forced (the decision, then its token's issue).
    forced_at: float | None = None

    def forced_recently(self, now: float, token: AccessToken) -> bool:
        """Whether ``token`` came of (or after) a force less than RECENT seconds ago."""
        forced_at = self.forced_at
        return forced_at is not None and 0.0 <= now - forced_at < RECENT \
            and token.issued_at >= forced_at


class SessionLifecycle:
    """One session's tokens. The rules are at the top of this module.

    Create one per session: after a login with its tokens, or on restore with
    the stored refresh token and no access token (the first tick refreshes).
    """

    def __init__(
        self,
        now: float,
        *,
        refresh_token: str | None,
        access_token: AccessToken | None = None,
        refresh_token_saved: bool = True,
        login_reason: str | None = None,
        rng: random.Random | None = None,
        granted_scopes: Iterable[str] | None = None,
    ) -> None:
        # Jitter only; never secrecy.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._phase = Phase.IDLE if refresh_token is not None else Phase.LOGIN_REQUIRED
        self._refresh_token = Secret(refresh_token) if refresh_token is not None else None
        self._default = AccessTokenSlot(DEFAULT_SLOT)
        self._narrower: OrderedDict[SlotKey, AccessTokenSlot] = OrderedDict()
        #: Rule 7: when the latest refreshes of narrower slots started (any slot, any cause).
        self._narrower_refresh_times: deque[float] = deque(maxlen=MAX_NARROWER_SLOTS)
        self._last_op_id = 0
        self._flight: _Flight | None = None
        #: The operation in flight when the session was revoked; its answer is absorbed.
        self._orphan: _Flight | None = None
        # Rule 8: transient failures.
        self._failures = 0
        self._retry_at: float | None = None
        self._last_error: str | None = None
        #: Rule 8: the provider's Retry-After runs until then; no early attempt jumps it.
        self._retry_after_until: float | None = None
        #: Rule 8b: when the latest refresh started.
        self._last_attempt_at = float("-inf")
        # Rule 4: the newest refresh token is not known to be stored.
        self._unsaved = refresh_token is not None and not refresh_token_saved
        self._persist_failures = 0
        self._persist_retry_at: float | None = now if self._unsaved else None
        self._persist_error: str | None = None
        #: Why a session without a refresh token needs a login (shown to users).
        self._login_reason = login_reason or ("the provider issued no refresh token"
                                              if refresh_token is None else "")
        self._last_refresh_at: float | None = None
        self._last_refresh_outcome: str | None = None
        #: Rule 14: what the chain holds, against what the login granted.
        self.scopes = ScopeWatch(frozenset(granted_scopes or ()) or None)
        #: Rule 13: the default token was superseded by another slot's rotation.
        self._default_superseded = False
        #: Rule 13: superseded tokens, for revocation at logout until they expire.
        self._superseded: deque[AccessToken] = deque(maxlen=MAX_NARROWER_SLOTS + 1)
        if access_token is not None:
            self._install(self._default, access_token, now)

    def __repr__(self) -> str:
        return (f"<SessionLifecycle phase={self._phase.name} in_flight={self.in_flight} "
                f"narrower_slots={len(self._narrower)}>")

    # ------------------------------------------------------------------ queries

    @property
    def refresh_token(self) -> Secret | None:
        """The newest refresh token (for revocation at logout), if the session has one."""
        return self._refresh_token

    @property
    def in_flight(self) -> int | None:
        """The id of the refresh or persist in flight, if any."""
        return self._flight.op_id if self._flight is not None else None

    def access_tokens(self) -> list[AccessToken]:
        """Every cached access token (for best-effort revocation at logout)."""
        slots = [self._default, *self._narrower.values()]
        return [slot.token for slot in slots if slot.token is not None] + list(self._superseded)

    def state(self, now: float) -> State:
        """The session's state at ``now`` (see the theory of operation)."""
        if self._phase is Phase.REVOKED:
            return State.REVOKED
        if self._phase is Phase.REFRESHING:
            return State.REFRESHING
        token = self._default.token
        if token is None or token.remaining(now) <= 0:
            return State.LOGIN_REQUIRED if self._phase is Phase.LOGIN_REQUIRED else State.EXPIRED
        if self._phase is Phase.LOGIN_REQUIRED:
            return State.FRESH  # valid, and no refresh window without a refresh token
        due = self._default.refresh_due_at
        return State.EXPIRING if due is not None and now >= due else State.FRESH

    def next_wakeup(self, now: float) -> float | None:
        """When the driver should call :meth:`tick` next; never before ``now``. O(1).

        None when nothing is scheduled: an operation is in flight (its outcome
        event returns what comes next), or the session cannot refresh.
        """
        if self._phase is not Phase.IDLE:
            return None
        refresh_at = self._default_refresh_at()
        if self._unsaved and self._persist_retry_at is not None:
            refresh_at = min(refresh_at, self._persist_retry_at)
        return max(now, refresh_at)

    def status(self, now: float) -> Status:
        """A snapshot for ``compozy auth status``."""
        token = self._default.token
        persist_warning = None
        if self._unsaved and self._persist_failures:
            persist_warning = (
                "the newest refresh token could not be saved to the secret store"
                + (f" ({self._persist_error})" if self._persist_error else "")
                + "; it is kept in memory and saving is retried; if the agent stops first, "
                "the next start needs a new login")
        warnings = [persist_warning] if persist_warning else []
        if self._retry_at is not None and self._phase is not Phase.REVOKED:
            warnings.append(f"refreshing failed ({self._last_error or 'provider error'}); "
                            f"retrying in {max(0.0, self._retry_at - now):.0f} s")
        if self._phase is Phase.LOGIN_REQUIRED:
            warnings.append(
                f"login required: {self._login_reason}" if not (token and token.remaining(now) > 0)
                else f"{self._login_reason}: a new login is needed once the access token expires")
        return Status(
            state=self.state(now),
            expires_at=token.expires_at if token is not None else None,
            token_valid=token is not None and token.remaining(now) > 0,
            has_refresh_token=self._refresh_token is not None,
            last_refresh_at=self._last_refresh_at,
            last_refresh_outcome=self._last_refresh_outcome,
            retry_at=self._retry_at,
            next_wakeup=self.next_wakeup(now),
            unsaved_refresh_token=self._unsaved,
            persist_warning=persist_warning,
            warnings=tuple(warnings),
            missing_scopes=tuple(sorted(self.scopes.missing)),
        )

    # ------------------------------------------------------------------ requests

    def request_token(
        self,
        now: float,
        slot: SlotKey = DEFAULT_SLOT,
        *,
        min_valid: float = 0.0,
        force_new: bool = False,
        rejected_token: str | None = None,
        asked_at: float | None = None,
        recent: float = RECENT,
        grant: Grant | None = None,
    ) -> Decision:
        """What to do for a caller who wants an access token of ``slot``.

        ``asked_at`` is when this caller first asked (default ``now``); a caller
        told to wait asks again with the same value (rules 6, 7, 9). ``recent`` is
        how young a token counts as new whenever it was issued (rules 6, 7); a
        person who asked for a new token by hand passes 0. Forced refreshes of
        a slot stay RECENT seconds apart whatever it says (rule 7).
        ``grant`` is what the session was granted at login: a narrower slot
        outside it fails with bad_request before anything else (rule 12).
        StartRefresh means the caller must run the refresh; WaitForRefresh means
        someone else's operation must end first.
        """
        asked_at = now if asked_at is None else min(asked_at, now)
        if self._phase is Phase.REVOKED:
            return Fail(ErrorCode.NOT_LOGGED_IN, "this session was logged out or revoked")
        if grant is not None and slot != DEFAULT_SLOT:
            refusal = grant.refusal(slot)
            if refusal is not None:
                return refusal  # rule 12: never ask the provider to widen the grant
        cache = self._default if slot == DEFAULT_SLOT else self._narrower.get(slot)
        token = cache.token if cache is not None else None
        forced = force_new and rejected_token is None
        if cache is not None and token is not None and rejected_token is not None \
                and token.value.matches(rejected_token):
            if cache.forced_recently(now, token) and token.remaining(now) > 0:  # rule 7
                assert cache.forced_at is not None
                return Fail(ErrorCode.REFRESH_FAILED, (
                    "that token is already a replacement made less than "
                    f"{RECENT:.0f} s ago, and the agent makes at most one every {RECENT:.0f} s "
                    "for the same scope and audience; ask again in "
                    f"{math.ceil(cache.forced_at + RECENT - now):.0f} s"))
            cache.token = cache.refresh_due_at = token = None  # rule 7: known bad
            cache.forced_at = now
            forced = True
        if token is not None and token.remaining(now) > 0:
            assert cache is not None
            new_enough = token.issued_at >= asked_at or now - token.issued_at < recent
            if forced:
                # Rule 7: within RECENT seconds of the last force, its token is the answer.
                wanted = new_enough or cache.forced_recently(now, token)
            else:
                wanted = new_enough or token.remaining(now) >= min_valid
            if wanted:
                if slot != DEFAULT_SLOT:
                    self._narrower.move_to_end(slot)  # least recently used goes first
                due = cache.refresh_due_at
                if due is not None and now >= due and self._may_start_refresh(now, cache) \
                        and (slot == DEFAULT_SLOT or self._narrower_wait(now) is None):
                    return Ready(token, self._start_refresh(now, slot))  # rule 5
                return Ready(token)
        if self._refresh_token is None:
            return Fail(ErrorCode.LOGIN_REQUIRED,
                        f"this session needs a new login ({self._login_reason})")
        flight = self._flight
        if flight is not None and flight.slot == slot:
            return WaitForRefresh(flight.op_id)  # its outcome is this caller's answer
        # Rule 8b: the session is backing off, nothing valid is left for this caller, and
        # the caller is still within its window.
        keeps_trying = self._retry_at is not None \
            and (token is None or token.remaining(now) <= 0) \
            and now - asked_at < EARLY_RETRY_WINDOW
        # Rule 9; a forcing caller is owed one forced refresh, not one begun for others.
        owed_own = forced and cache is not None and not cache.attempt_forced
        if cache is not None and cache.attempt_ended_at is not None \
                and cache.attempt_ended_at >= asked_at and not keeps_trying \
                and not owed_own:  # rule 9
            return cache.failure or Fail(ErrorCode.REFRESH_FAILED, (
                "the new token had already expired when it arrived; check the system clock"
                if cache.token is not None else
                "the new token was reported rejected before it could be handed out; ask again"))
        if cache is not None and cache.refused_until is not None and now < cache.refused_until:
            assert cache.failure is not None
            return cache.failure
        if flight is not None:
            return WaitForRefresh(flight.op_id)
        if self._retry_at is not None and now < self._retry_at:
            early_at = min(self._last_attempt_at + EARLY_RETRY_SPACING, self._retry_at)
            if not keeps_trying or early_at - asked_at >= EARLY_RETRY_WINDOW or (
                    self._retry_after_until is not None and now < self._retry_after_until):
                return Fail(ErrorCode.REFRESH_FAILED,
                            f"could not refresh the token "
                            f"({self._last_error or 'provider error'}); "
                            + _retry_hint(slot, self._retry_at - now))
            if now < early_at:
                return WaitForRefresh(self._last_op_id, until=early_at)
            # Rule 8b: one attempt ahead of the schedule.
        wait = self._narrower_wait(now) if slot != DEFAULT_SLOT else None
        if wait is not None:  # rule 7, across slots
            return Fail(ErrorCode.REFRESH_FAILED, (
                f"this session fetched narrower tokens {MAX_NARROWER_SLOTS} times in the "
                f"last {NEW_SLOT_WINDOW:.0f} s, the most it does; ask again in "
                f"{math.ceil(wait):.0f} s"))
        if cache is not None and token is None and cache.forced_at is not None:
            forced = True  # rule 7: only a rejection empties a slot; this refills it
        return self._start_refresh(now, slot, forced=forced)

    def tick(self, now: float) -> list[Action]:
        """What is due at ``now`` (at most one action): a persist retry (rule 4), else a
        refresh of the default token (rules 5, 8). Call it when next_wakeup() comes."""
        if self._phase is not Phase.IDLE:
            return []
        if self._unsaved and self._persist_retry_at is not None and now >= self._persist_retry_at:
            return [self._start_persist()]
        if now >= self._default_refresh_at():
            return [self._start_refresh(now, DEFAULT_SLOT)]
        return []

    # ------------------------------------------------------------------ refresh outcomes

    def refresh_succeeded(
        self,
        now: float,
        refresh_id: int,
        access_token: str,
        expires_at: float,
        *,
        issued_at: float | None = None,
        refresh_token: str | None = None,
        scope: Iterable[str] | None = None,
    ) -> list[Action]:
        """The provider issued a token. ``refresh_token`` is the response's, if it sent one.

        ``issued_at`` is when the refresh request was sent (default ``now``) and
        ``expires_at`` the provider's expiry counted from then (rule 2); the token is
        handed out until EXPIRY_MARGIN before it, and never if that is already past.

        A refresh token different from the current one is a rotation (RFC 6749
        section 6, RFC 9700 section 4.14.2): the answer then holds its
        PersistRefreshToken, and no refresh starts until that write is reported.
        """
        if self._absorb_orphan(refresh_id, persist=False):
            return []
        current = self._refresh_token
        rotated = refresh_token is not None and (current is None
                                                 or not current.matches(refresh_token))
        flight = self._end_refresh(
            refresh_id, Event.REFRESH_OK_ROTATED if rotated else Event.REFRESH_OK)
        issued = now if issued_at is None else min(issued_at, now)
        token = usable_token(access_token, sent_at=issued, expires_at=expires_at, scope=scope)
        cache = self._cache_for(flight)
        self._install(cache, token, now)
        if flight.slot == DEFAULT_SLOT:
            self._default_superseded = False
            self.scopes.default_refreshed(scope)  # rule 14
        else:
            self.scopes.narrower_refresh(flight.slot[0] if flight.slot else None)
        if rotated:
            self._supersede_others(cache, now)  # rule 13
        if flight.forced:
            cache.forced_at = issued  # rule 7: spaced from the forced token's issue
        cache.attempt_ended_at = now
        cache.attempt_forced = flight.forced
        cache.failure = None
        if token.remaining(now) <= 0 and now - issued >= token.lifetime > 0:
            # Rule 2: never handed out; a caller still in its window tries again (8b).
            cache.failure = Fail(ErrorCode.REFRESH_FAILED, (
                f"the provider took {now - issued:.0f} s to answer, longer than the new token "
                f"lives ({token.lifetime:.0f} s); ask again"))
        cache.refused_until = None
        self._failures = 0
        self._retry_at = None
        self._retry_after_until = None
        self._last_error = None
        self._last_refresh_at = now
        self._last_refresh_outcome = "refreshed"
        if refresh_token is not None and rotated:
            self._refresh_token = Secret(refresh_token)
            self._unsaved = True
            self._last_refresh_outcome = "refreshed; refresh token rotated"
            return [self._issue_persist()]
        return self.tick(now)

    def refresh_failed_transient(
        self,
        now: float,
        refresh_id: int,
        *,
        retry_after: float | None = None,
        reason: str = "provider unavailable",
    ) -> list[Action]:
        """The refresh failed for now (network, 5xx, 429, timeout); back off (rule 8).

        ``retry_after`` is the provider's Retry-After in seconds, if it sent one.
        ``reason`` is shown to users and must not contain a token.
        """
        if self._absorb_orphan(refresh_id, persist=False):
            return []
        flight = self._end_refresh(refresh_id, Event.REFRESH_TRANSIENT)
        self._failures += 1
        delay = self._backoff(self._failures)
        default = self._default.token
        if default is not None and default.remaining(now) > 0:
            # Rule 8: the next attempt comes before the token runs out, not after.
            delay = min(delay, max(EARLY_RETRY_SPACING, default.remaining(now) / 2))
        self._retry_after_until = None
        if retry_after is not None:
            honoured = min(max(retry_after, 0.0), MAX_RETRY_AFTER)
            self._retry_after_until = now + honoured
            delay = max(delay, honoured)
        self._retry_at = now + delay
        self._last_error = reason
        self._last_refresh_at = now
        self._last_refresh_outcome = f"failed: {reason}"
        cache = self._cache_for(flight)
        cache.attempt_ended_at = now
        cache.attempt_forced = True  # a failure ends every waiting request (rule 9)
        cache.failure = Fail(ErrorCode.REFRESH_FAILED, f"could not refresh the token ({reason}); "
                             + _retry_hint(flight.slot, delay))
        return self.tick(now)

    def refresh_failed_invalid_grant(
        self, now: float, refresh_id: int, *, reason: str = "invalid_grant"
    ) -> list[Action]:
        """The provider rejected the refresh token: LOGIN_REQUIRED, and delete it (rule 8)."""
        if self._absorb_orphan(refresh_id, persist=False):
            return []
        self._end_refresh(refresh_id, Event.REFRESH_INVALID_GRANT)
        self._refresh_token = None
        self._drop_tokens()
        self._login_reason = f"the provider no longer accepts this session ({reason})"
        self._last_refresh_at = now
        self._last_refresh_outcome = f"rejected: {reason}"
        return [DeleteRefreshToken()]

    def refresh_refused(self, now: float, refresh_id: int, *, reason: str) -> list[Action]:
        """The provider will not issue this narrower token (invalid_scope, invalid_target).

        Only for narrower slots: the session itself is fine (rule 8).
        """
        if self._absorb_orphan(refresh_id, persist=False):
            return []
        flight = self._check_refresh(refresh_id, Event.REFRESH_REFUSED)
        if flight.slot == DEFAULT_SLOT:
            raise IllegalTransition(
                "the default token's refresh cannot be refused for its scope; "
                "report it as transient or invalid_grant")
        self._end_refresh(refresh_id, Event.REFRESH_REFUSED)
        cache = self._cache_for(flight)
        cache.attempt_ended_at = now
        cache.attempt_forced = True
        cache.refused_until = now + REFUSAL_TTL
        cache.failure = Fail(ErrorCode.PROVIDER_ERROR,
                             f"the provider will not issue a token for that scope or "
                             f"audience ({reason})")
        self._last_refresh_at = now
        self._last_refresh_outcome = f"refused: {reason}"
        return self.tick(now)

    def refresh_abandoned(self, now: float, refresh_id: int) -> list[Action]:
        """The refresh ended without an answer (the driver is stopping). Nothing is learnt."""
        if self._absorb_orphan(refresh_id, persist=False):
            return []
        self._end_refresh(refresh_id, Event.REFRESH_ABANDONED)
        return []

    # ------------------------------------------------------------------ persist outcomes

    def persist_done(self, now: float, persist_id: int) -> list[Action]:
        """The rotated refresh token is in the secret store."""
        if self._absorb_orphan(persist_id, persist=True):
            # The write may have landed after the logout's delete: delete again.
            return [DeleteRefreshToken()]
        self._end_persist(persist_id, Event.PERSIST_DONE)
        self._unsaved = False
        self._persist_failures = 0
        self._persist_retry_at = None
        self._persist_error = None
        return self.tick(now)

    def persist_failed(self, now: float, persist_id: int, *, reason: str = "") -> list[Action]:
        """Saving failed: keep the token in memory, retry with backoff, warn (rule 4)."""
        if self._absorb_orphan(persist_id, persist=True):
            return []
        self._end_persist(persist_id, Event.PERSIST_FAILED)
        self._persist_failures += 1
        self._persist_retry_at = now + self._backoff(self._persist_failures)
        self._persist_error = reason or None
        return self.tick(now)

    # ------------------------------------------------------------------ the end

    def revoked(self, now: float) -> list[Action]:
        """The session is logged out or revoked: forget every token (terminal).

        Revoke at the provider first if you mean to (see :attr:`refresh_token`
        and :meth:`access_tokens`). An answer to the operation in flight now is
        absorbed when it arrives.
        """
        self._fire(Event.REVOKE)
        self._orphan = self._flight
        self._flight = None
        had_refresh_token = self._refresh_token is not None
        self._refresh_token = None
        self._drop_tokens()
        return [DeleteRefreshToken()] if had_refresh_token else []

    # ------------------------------------------------------------------ internals

    def _fire(self, event: Event) -> None:
        """Move the phase by the table, or raise IllegalTransition and change nothing."""
        try:
            self._phase = _TRANSITIONS[self._phase][event]
        except KeyError:
            raise IllegalTransition(
                f"cannot handle '{event.value}' in phase {self._phase.name}") from None

    def _check_refresh(self, refresh_id: int, event: Event) -> _Flight:
        flight = self._flight
        if event not in _TRANSITIONS[self._phase] or flight is None or flight.slot is None \
                or flight.op_id != refresh_id:
            raise IllegalTransition(
                f"cannot handle '{event.value}' for refresh {refresh_id} in phase "
                f"{self._phase.name} (in flight: {self.in_flight})")
        return flight

    def _end_refresh(self, refresh_id: int, event: Event) -> _Flight:
        flight = self._check_refresh(refresh_id, event)
        self._fire(event)
        self._flight = None
        return flight

    def _end_persist(self, persist_id: int, event: Event) -> None:
        flight = self._flight
        if event not in _TRANSITIONS[self._phase] or flight is None or flight.slot is not None \
                or flight.op_id != persist_id:
            raise IllegalTransition(
                f"cannot handle '{event.value}' for persist {persist_id} in phase "
                f"{self._phase.name} (in flight: {self.in_flight})")
        self._fire(event)
        self._flight = None

    def _absorb_orphan(self, op_id: int, *, persist: bool) -> bool:
        orphan = self._orphan
        if self._phase is Phase.REVOKED and orphan is not None and orphan.op_id == op_id \
                and (orphan.slot is None) == persist:
            self._orphan = None
            return True
        return False

    def _narrower_wait(self, now: float) -> float | None:
        """Rule 7: seconds until a narrower slot may be refreshed, or None if it may now."""
        started = self._narrower_refresh_times
        if len(started) == started.maxlen and 0.0 <= now - started[0] < NEW_SLOT_WINDOW:
            return started[0] + NEW_SLOT_WINDOW - now
        return None

    def _may_start_refresh(self, now: float, cache: AccessTokenSlot) -> bool:
        return (self._phase is Phase.IDLE
                and (self._retry_at is None or now >= self._retry_at)
                and (cache.refused_until is None or now >= cache.refused_until))

    def _start_refresh(self, now: float, slot: SlotKey, *, forced: bool = False) -> StartRefresh:
        assert self._refresh_token is not None
        self._fire(Event.START_REFRESH)
        self._last_op_id += 1
        self._last_attempt_at = now
        self._flight = _Flight(self._last_op_id, slot, forced)
        if slot != DEFAULT_SLOT:
            self._narrower_refresh_times.append(now)
            if slot not in self._narrower:
                self._narrower[slot] = AccessTokenSlot(slot)
                self._evict()
        if forced:
            self._cache_for(self._flight).forced_at = now
        return StartRefresh(self._last_op_id, slot, self._refresh_token)

    def _start_persist(self) -> PersistRefreshToken:
        self._fire(Event.START_PERSIST)
        return self._issue_persist()

    def _issue_persist(self) -> PersistRefreshToken:
        assert self._refresh_token is not None and self._phase is Phase.PERSISTING
        self._last_op_id += 1
        self._flight = _Flight(self._last_op_id, None)
        self._persist_retry_at = None
        return PersistRefreshToken(self._last_op_id, self._refresh_token)

    def _supersede_others(self, kept: AccessTokenSlot, now: float) -> None:
        """Rule 13: no token of another slot is handed out after a rotation."""
        for cache in (self._default, *self._narrower.values()):
            token = cache.token
            if cache is kept or token is None:
                continue
            if token.remaining(now) > 0:
                self._superseded.append(token)
            due, cache.token, cache.refresh_due_at = cache.refresh_due_at, None, None
            if cache is self._default:
                # Still kept warm (providers expire idle refresh tokens), but not before
                # the token that superseded it is due itself: its refresh may kill that one.
                self._default_superseded = True
                cache.refresh_due_at = max(due or now, kept.refresh_due_at or now)
        while self._superseded and self._superseded[0].remaining(now) <= 0:
            self._superseded.popleft()

    def _default_refresh_at(self) -> float:
        """When the default token is due for a refresh, respecting backoff (rules 5, 8)."""
        due = self._default.refresh_due_at
        refresh_at = due if (self._default.token is not None or self._default_superseded) \
            and due is not None else float("-inf")
        if self._retry_at is not None:
            refresh_at = max(refresh_at, self._retry_at)
        return refresh_at

    def _cache_for(self, flight: _Flight) -> AccessTokenSlot:
        assert flight.slot is not None
        if flight.slot == DEFAULT_SLOT:
            return self._default
        # A slot in flight is never evicted (see _evict); setdefault only for safety.
        return self._narrower.setdefault(flight.slot, AccessTokenSlot(flight.slot))

    def _install(self, cache: AccessTokenSlot, token: AccessToken, now: float) -> None:
        lifetime = token.lifetime
        jittered = token.issued_at + lifetime * self._rng.uniform(*WINDOW)
        latest = token.expires_at - min(MIN_MARGIN, lifetime / 2)
        cache.token = token
        cache.refresh_due_at = max(min(jittered, latest), max(token.issued_at, now) + RECENT)

    def _evict(self) -> None:
        in_flight = self._flight.slot if self._flight is not None else None
        while len(self._narrower) > MAX_NARROWER_SLOTS:
            oldest = next(iter(self._narrower))
            if oldest == in_flight:
                self._narrower.move_to_end(oldest)
                continue
            del self._narrower[oldest]

    def _drop_tokens(self) -> None:
        self._default = AccessTokenSlot(DEFAULT_SLOT)
        self._default_superseded = False
        self._superseded.clear()
        self._narrower.clear()
        self._failures = 0
        self._retry_at = None
        self._retry_after_until = None
        self._unsaved = False
        self._persist_failures = 0
        self._persist_retry_at = None
        self._persist_error = None

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff with jitter: [d/2, d] for d = 1, 2, 4, ... 60 s."""
        ceiling = min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** min(failures - 1, 32))
        return ceiling * self._rng.uniform(0.5, 1.0)
