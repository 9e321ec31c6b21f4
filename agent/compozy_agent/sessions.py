"""The session driver: feeds events to each session's lifecycle and performs its actions.

This module is the :class:`~compozy_agent.backend.Backend` of the socket
server. The decisions (when to refresh, who waits, what a failure means) are
``lifecycle.py``'s; here is only the I/O they ask for: provider calls through
``http.py``, secrets and metadata through ``store.py``, and the loopback
listener of the browser login.

Every refresh and every write of a rotated refresh token runs as a task of the
manager, never of the client that caused it, and shielded from cancellation:
a refresh the provider has already answered must not be lost to a client
hanging up or to a shutdown. Clients wait for the session's ``changed`` event
and ask the lifecycle again.

The scheduler keeps one heap of (wake-up time, session): each event costs
O(log n), and an agent whose sessions are all fresh sleeps until the earliest
refresh (in slices of at most ``clock.MAX_SLEEP``, because monotonic clocks
stop while the machine is suspended).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import anyio
import anyio.abc

from compozy_agent import oidc
from compozy_agent.backend import OpError
from compozy_agent.clock import Clock, SystemClock
from compozy_agent.http import CALL_DEADLINE, ProviderClient
from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    RECENT,
    AccessToken,
    Action,
    DeleteRefreshToken,
    Fail,
    Grant,
    IllegalTransition,
    PersistRefreshToken,
    Ready,
    SessionLifecycle,
    StartRefresh,
    State,
    WaitForRefresh,
    slot_key,
    usable_token,
)
from compozy_agent.peer import Peer
from compozy_agent.store import SecretKind, SessionStore, StoredSession, StoreError
from compozy_client import protocol as p
from compozy_client.config import (
    DEFAULT_CLIENT_ID,
    DEFAULT_ISSUER,
    DEFAULT_SCOPES,
    Config,
    load_config,
)
from compozy_client.errors import ConfigError, ErrorCode
from compozy_client.safetext import one_line

if TYPE_CHECKING:
    from compozy_agent.loopback import LoopbackRedirect

log = logging.getLogger("compozy_agent.sessions")

LOGIN_TTL: Final = 600.0
#: Logins held at once (pending, or finished and not yet collected by login_wait): each
#: pending browser login holds a loopback listener, each device login a polling task.
MAX_LOGINS: Final = 8
#: The longest account name (a provider claim) shown in messages and logs.
ACCOUNT_LIMIT: Final = 200
#: How long a token request may wait for refreshes (seconds of real time): two provider
#: calls (CALL_DEADLINE each), and below the CLI's 30 s, so that the agent's own answer,
#: which says what is slow, reaches the person (docs/architecture.md, "Deadlines").
WAIT_LIMIT: Final = 20.0
#: A caller that says how long it waits (``timeout``) is answered this much before then.
ANSWER_MARGIN: Final = 1.0
#: How long a revocation waits for a refresh in flight, so it revokes the newest token.
REVOKE_WAIT: Final = 10.0
#: The scheduler's sleep when no session has anything scheduled.
IDLE_SLEEP: Final = 3600.0
#: Refreshes in flight at once, over all providers (httpx pools 100 connections).
REFRESHES_AT_ONCE: Final = 16
#: Below the store's MAX_WAITING_CALLS, so logins and API keys still find room.
STORE_WRITES_AT_ONCE: Final = 8


@dataclass(eq=False)
class Session:
    meta: StoredSession
    lifecycle: SessionLifecycle | None
    api_key: str | None = field(default=None, repr=False)
    changed: anyio.Event = field(default_factory=anyio.Event, repr=False)
    last_used_at: float | None = None
    #: The wake-up time of this session's live heap entry (older entries are stale).
    wake_at: float | None = None
    #: Whether the manager still holds this session (a forgotten one ignores late events).
    active: bool = True

    def notify(self) -> None:
        """Wake everyone waiting for this session's refresh or persist to end."""
        self.changed.set()
        self.changed = anyio.Event()


@dataclass(eq=False)
class Login:
    login_id: str
    profile: str
    issuer: str
    client_id: str
    scopes: list[str]
    resources: list[str]
    expires_at: float
    #: The connection that started it: the login ends when that connection closes.
    owner: object = None
    #: The OIDC nonce of a browser login's authentication request (OIDC Core 3.1.2.1).
    nonce: str | None = field(default=None, repr=False)
    done: anyio.Event = field(default_factory=anyio.Event)
    session: Session | None = None
    error: OpError | None = None
    cancel_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: Set once its flow has ended and let go of its listener or polling.
    released: anyio.Event = field(default_factory=anyio.Event)


def _new_id() -> str:
    return secrets.token_hex(4)


def _secret_kind(meta: StoredSession) -> SecretKind:
    return "api_key" if meta.kind == "api_key" else "refresh_token"


def _provider_host(issuer: str | None) -> str:
    """``host:port`` of the issuer, for messages: never its user info, path or query."""
    try:
        parts = urlsplit(issuer or "")
        host, port = parts.hostname, parts.port
    except ValueError:
        return "the provider"
    if not host:
        return "the provider"
    host = f"[{host}]" if ":" in host else host
    return one_line(f"{host}:{port}" if port else host, 300)


def _login_command(profile: str) -> str:
    return "compozy login" + ("" if profile == "default" else f" --profile {profile}")


class SessionManager:
    """Every session of the agent, by token id; at most one per profile."""

    def __init__(
        self,
        store: SessionStore,
        provider: ProviderClient,
        *,
        clock: Clock | None = None,
        config_loader: Callable[[], Config] = load_config,
    ) -> None:
        self.store = store
        self.provider = provider
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.config_loader = config_loader
        self.by_id: dict[str, Session] = {}
        #: The session each profile's requests go to (one per profile, O(1) per request).
        self._by_profile: dict[str, Session] = {}
        self.logins: dict[str, Login] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._poke = anyio.Event()
        self._warnings: list[str] = []
        #: (wake-up time, tie-breaker, session); entries whose time is not the
        #: session's wake_at are stale and skipped (lazy deletion).
        self._heap: list[tuple[float, int, Session]] = []
        self._sequence = itertools.count()
        #: How often the scheduler has woken (for the idle-cost benchmark).
        self.scheduler_wakeups = 0
        #: Refreshes at providers at once: an agent restoring 1,000 sessions must not
        #: open 1,000 requests (it would exhaust its connection pool and the provider's
        #: patience); the others queue here, in order.
        self._refresh_slots = anyio.CapacityLimiter(REFRESHES_AT_ONCE)
        #: Background writes to the secret store at once. The store fails calls at once
        #: when many wait behind a stuck keyring; rotations of many sessions queue here
        #: instead of failing there.
        self._store_slots = anyio.CapacityLimiter(STORE_WRITES_AT_ONCE)

    def now(self) -> float:
        return self.clock.now()

    def _add(self, session: Session) -> None:
        """Hold ``session``; it becomes its profile's session (the newest one wins)."""
        self.by_id[session.meta.token_id] = session
        self._by_profile[session.meta.profile] = session

    def _remove(self, session: Session) -> None:
        self.by_id.pop(session.meta.token_id, None)
        profile = session.meta.profile
        if self._by_profile.get(profile) is session:
            del self._by_profile[profile]
            for other in self.by_id.values():  # a replaced session being forgotten: rare
                if other.meta.profile == profile:
                    self._by_profile[profile] = other

    # ------------------------------------------------------------ running

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Restore saved sessions, then schedule refreshes until cancelled."""
        async with anyio.create_task_group() as group:
            self._group = group
            await self.restore()
            task_status.started()
            await self._schedule()

    async def restore(self) -> None:
        """Load the sessions of the state file, with their secrets from the secret store."""
        for path in self.store.remove_interrupted_writes():  # nothing is served yet
            log.warning("removed %s, left by a write that a crash interrupted", path)
        try:
            stored = self.store.load()
        except StoreError as exc:
            self._warnings.append(str(exc))
            log.error("%s", exc)
            return
        for meta in stored:
            try:
                secret = await self.store.get_secret(meta.token_id, _secret_kind(meta))
                missing = "is missing from the secret store"
            except StoreError as exc:
                log.error("session %s: %s", meta.token_id, exc)
                secret = None
                missing = f"could not be read from the secret store ({exc})"
            if meta.kind == "api_key":
                if secret is None:
                    self._warnings.append(f"the API key of profile {meta.profile!r} {missing}; "
                                          "store it again")
                    continue
                self._add(Session(meta, None, api_key=secret))
                continue
            # No access token: the first tick refreshes at once.
            lifecycle = SessionLifecycle(
                self.now(), refresh_token=secret,
                login_reason=None if secret is not None else f"the refresh token {missing}")
            session = Session(meta, lifecycle)
            self._add(session)
            self._reschedule(session)
        log.info("restored %d session(s) from %s", len(self.by_id), self.store.state_path)

    def poke(self) -> None:
        self._poke.set()

    async def _schedule(self) -> None:
        while True:
            self.scheduler_wakeups += 1
            now = self.now()
            while self._heap and self._heap[0][0] <= now:
                wake_at, _, session = heapq.heappop(self._heap)
                if not session.active or session.wake_at != wake_at:
                    continue  # stale entry
                session.wake_at = None
                assert session.lifecycle is not None
                actions = session.lifecycle.tick(now)
                self._perform(session, actions)
                if not actions:
                    # Nothing was due after all (the clock stepped back): look again later,
                    # never in a tight loop.
                    self._reschedule(session, not_before=now + 1.0)
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

    def _reschedule(self, session: Session, *, not_before: float | None = None) -> None:
        """Put the session's next wake-up on the heap if it changed (O(log n))."""
        lifecycle = session.lifecycle
        if lifecycle is None or not session.active:
            return
        wake_at = lifecycle.next_wakeup(self.now())
        if wake_at is not None and not_before is not None:
            wake_at = max(wake_at, not_before)
        if wake_at == session.wake_at:
            return
        session.wake_at = wake_at
        if wake_at is None:
            return  # the old entry goes stale
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (wake_at, next(self._sequence), session))
        if earliest is None or wake_at < earliest:
            self.poke()
        if len(self._heap) > 4 * len(self.by_id) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop stale entries, so a long-lived agent's heap stays O(sessions)."""
        self._heap = [entry for entry in self._heap
                      if entry[2].active and entry[2].wake_at == entry[0]]
        heapq.heapify(self._heap)

    def _spawn(self, function: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        assert self._group is not None, "run() first"
        self._group.start_soon(function, *args)

    # ------------------------------------------------------------ performing actions

    def _perform(self, session: Session, actions: list[Action]) -> None:
        """Start what the lifecycle asked for; each outcome is reported when it ends."""
        for action in actions:
            match action:
                case StartRefresh():
                    self._spawn(self._run_refresh, session, action)
                case PersistRefreshToken():
                    self._spawn(self._run_persist, session, action)
                case DeleteRefreshToken():
                    self._spawn(self._delete_secret, session.meta.token_id, "refresh_token")
        self._reschedule(session)

    async def _run_refresh(self, session: Session, start: StartRefresh) -> None:
        lifecycle = session.lifecycle
        assert lifecycle is not None
        with anyio.CancelScope(shield=True):
            actions = await self._refresh_at_provider(session, lifecycle, start)
            await self._conclude(session, actions)

    async def _refresh_at_provider(
        self, session: Session, lifecycle: SessionLifecycle, start: StartRefresh
    ) -> list[Action]:
        """One refresh (RFC 6749 section 6), reported to the lifecycle; never raises."""
        meta = session.meta
        refresh_id = start.refresh_id
        try:
            assert meta.issuer is not None and meta.client_id is not None
            async with self._refresh_slots:
                metadata = await self.provider.discover(meta.issuer)
                response = await self.provider.refresh(
                    metadata, client_id=meta.client_id,
                    refresh_token=start.refresh_token.reveal(), scopes=start.scopes,
                    resources=[start.audience] if start.audience else (),
                )
        except oidc.OAuthError as exc:
            if exc.error == "invalid_grant":
                log.warning("session %s: refresh token rejected (%s); login required",
                            meta.token_id, exc.error)
                return lifecycle.refresh_failed_invalid_grant(self.now(), refresh_id,
                                                              reason=exc.error)
            if start.slot != DEFAULT_SLOT and exc.error in ("invalid_scope", "invalid_target"):
                return lifecycle.refresh_refused(self.now(), refresh_id, reason=str(exc))
            log.warning("session %s: refresh failed: %s", meta.token_id, exc)
            return lifecycle.refresh_failed_transient(self.now(), refresh_id,
                                                      reason=f"provider said {exc}")
        except oidc.TransientProviderError as exc:
            log.warning("session %s: refresh failed: %s", meta.token_id, exc)
            return lifecycle.refresh_failed_transient(
                self.now(), refresh_id, retry_after=exc.retry_after, reason=str(exc))
        except oidc.OAuthFailure as exc:  # unreachable, malformed answers
            log.warning("session %s: refresh failed: %s", meta.token_id, exc)
            return lifecycle.refresh_failed_transient(self.now(), refresh_id, reason=str(exc))
        except Exception:
            log.exception("session %s: refresh failed unexpectedly", meta.token_id)
            return lifecycle.refresh_failed_transient(self.now(), refresh_id,
                                                      reason="internal error")
        if response.id_token is not None:
            try:  # OIDC Core 12.2: about the login's person, or not this session's tokens
                oidc.validate_refresh_id_token(response.id_token, issuer=meta.issuer,
                                               client_id=meta.client_id, subject=meta.subject)
            except oidc.MalformedResponse as exc:
                log.warning("session %s: refresh answer not used: %s", meta.token_id, exc)
                return lifecycle.refresh_failed_invalid_grant(self.now(), refresh_id,
                                                              reason=str(exc))
        log.info("session %s: refreshed%s; valid for %.0f s (answered in %.1f s)", meta.token_id,
                 "" if response.refresh_token in (None, start.refresh_token.reveal())
                 else " (refresh token rotated)", response.expires_at - response.received_at,
                 response.received_at - response.issued_at)
        # The token's life counts from when the request was sent (lifecycle rule 2).
        return lifecycle.refresh_succeeded(
            self.now(), refresh_id, response.access_token, response.expires_at,
            issued_at=response.issued_at, refresh_token=response.refresh_token,
            scope=response.scope)

    async def _run_persist(self, session: Session, persist: PersistRefreshToken) -> None:
        lifecycle = session.lifecycle
        assert lifecycle is not None
        token_id = session.meta.token_id
        with anyio.CancelScope(shield=True):
            try:
                async with self._store_slots:
                    await self.store.put_secret(token_id, "refresh_token",
                                                persist.refresh_token.reveal())
            except StoreError as exc:
                log.error("session %s: could not save the rotated refresh token (%s); "
                          "keeping it in memory and retrying", token_id, exc)
                actions = lifecycle.persist_failed(self.now(), persist.persist_id,
                                                   reason=str(exc))
            else:
                actions = lifecycle.persist_done(self.now(), persist.persist_id)
            await self._conclude(session, actions)

    async def _conclude(self, session: Session, actions: list[Action]) -> None:
        """After an operation ended: delete or save the refresh token first, then wake
        the waiters and start what comes next.

        So a caller told "login required" finds the secret gone, and a caller handed
        a token from a rotating refresh knows the new refresh token is already saved
        (or that saving failed and is retried): a crash after the answer loses nothing.
        """
        for action in actions:
            if isinstance(action, DeleteRefreshToken):
                await self._delete_secret(session.meta.token_id, "refresh_token")
            elif isinstance(action, PersistRefreshToken):
                await self._run_persist(session, action)
                return  # it concluded: woke the waiters, started what came next
        session.notify()
        self._perform(session, actions=[a for a in actions if isinstance(a, StartRefresh)])

    async def _delete_secret(self, token_id: str, kind: SecretKind) -> None:
        with anyio.CancelScope(shield=True):
            try:
                async with self._store_slots:
                    await self.store.delete_secret(token_id, kind)
            except StoreError as exc:
                log.error("session %s: %s", token_id, exc)

    # ------------------------------------------------------------ the backend

    def storage_info(self) -> p.StorageInfo:
        return self.store.info

    def clock_skew(self) -> float | None:
        return self.provider.last_clock_skew

    def warnings(self) -> list[str]:
        warnings = list(self._warnings)
        if not self.store.info.persistent:
            warnings.append("no secure storage: sessions are kept in memory only and end when "
                            f"the agent stops ({self.store.info.detail})")
        now = self.now()
        for session in self.by_id.values():
            if session.lifecycle is not None:
                for warning in session.lifecycle.status(now).warnings:
                    warnings.append(f"profile {session.meta.profile}: {warning}")
        return warnings

    async def sessions(self, profile: str | None) -> list[p.SessionInfo]:
        now = self.now()
        return [self._info(s, now) for s in self.by_id.values()
                if profile is None or s.meta.profile == profile]

    def _info(self, session: Session, now: float) -> p.SessionInfo:
        meta = session.meta
        info = p.SessionInfo(
            token_id=meta.token_id, profile=meta.profile, kind=meta.kind,
            state=State.FRESH.value, issuer=meta.issuer, account=meta.account,
            subject=meta.subject, scopes=meta.scopes, created_at=meta.created_at,
            last_used_at=session.last_used_at, persisted=self.store.info.persistent,
        )
        if session.lifecycle is not None:
            status = session.lifecycle.status(now)
            info.state = status.state.value
            info.expires_at = status.expires_at
            info.last_refresh_at = status.last_refresh_at
            info.last_refresh_outcome = status.last_refresh_outcome
        return info

    def _find(self, profile: str, token_id: str | None) -> Session:
        if token_id:
            session = self.by_id.get(token_id)
            if session is None:
                raise OpError(ErrorCode.UNKNOWN_TOKEN_ID,
                              f"no session has token id {token_id!r}; see `compozy auth list`")
            return session
        session = self._by_profile.get(profile)
        if session is not None:
            return session
        raise OpError(ErrorCode.NOT_LOGGED_IN, f"not logged in (profile {profile!r})",
                      {"command": _login_command(profile)})

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult:
        session = self._find(request.profile, request.token_id)
        now = session.last_used_at = self.now()
        if session.api_key is not None:
            return p.TokenResult(access_token=session.api_key, token_id=session.meta.token_id,
                                 profile=session.meta.profile, kind="api_key")
        slot = DEFAULT_SLOT if request.scope is None and request.audience is None \
            else slot_key(request.scope, request.audience)
        # A narrower token may not widen what the login granted (lifecycle rule 12).
        grant = None if slot == DEFAULT_SLOT else Grant.of(session.meta.scopes,
                                                           session.meta.resources)
        token = await self._obtain(session, slot, min_valid=request.min_valid,
                                   force_new=request.force_new,
                                   rejected_token=request.rejected_token, asked_at=now,
                                   grant=grant, caller_timeout=request.timeout)
        return p.TokenResult(access_token=token.value.reveal(), expires_at=token.expires_at,
                             token_id=session.meta.token_id, profile=session.meta.profile,
                             scope=list(token.scope) if token.scope is not None else None,
                             audience=request.audience)

    async def _obtain(
        self,
        session: Session,
        slot: tuple[frozenset[str] | None, str | None],
        *,
        min_valid: float = 0.0,
        force_new: bool = False,
        rejected_token: str | None = None,
        asked_at: float | None = None,
        grant: Grant | None = None,
        caller_timeout: float | None = None,
    ) -> AccessToken:
        """The token the lifecycle decides on, running and waiting for refreshes as told.

        Waits at most WAIT_LIMIT seconds, and answers ANSWER_MARGIN before the
        caller's own ``caller_timeout`` when it gave one, so the caller hears
        what is slow from the agent rather than its own timeout.
        """
        lifecycle = session.lifecycle
        assert lifecycle is not None
        now = asked_at = self.now() if asked_at is None else asked_at
        wait_limit = WAIT_LIMIT if caller_timeout is None else \
            max(0.0, min(WAIT_LIMIT, caller_timeout - ANSWER_MARGIN))
        started = anyio.current_time()
        while True:
            decision = lifecycle.request_token(
                now, slot, min_valid=min_valid, force_new=force_new,
                rejected_token=rejected_token, asked_at=asked_at, grant=grant,
                # Asked for explicitly (after a 401, or `compozy auth refresh`): only a
                # token issued after the request began will do, unless the slot was
                # forced less than RECENT seconds ago (lifecycle rule 7).
                recent=0.0 if force_new else RECENT)
            match decision:
                case Ready(token=token, background=background):
                    if background is not None:
                        self._perform(session, [background])
                    return token
                case Fail(code=code, message=message):
                    details = {"command": _login_command(session.meta.profile)} \
                        if code == ErrorCode.LOGIN_REQUIRED else {}
                    raise OpError(code, message, details)
                case StartRefresh() | WaitForRefresh():
                    changed = session.changed
                    if isinstance(decision, StartRefresh):
                        self._perform(session, [decision])
                    until = decision.until if isinstance(decision, WaitForRefresh) else None
                    with anyio.move_on_after(started + wait_limit - anyio.current_time()):
                        await self._wait_for_change(changed, until)
                    if anyio.current_time() >= started + wait_limit:
                        raise OpError(ErrorCode.REFRESH_FAILED,
                                      self._still_waiting(session, anyio.current_time() - started))
                    now = self.now()

    async def _wait_for_change(self, changed: anyio.Event, until: float | None) -> None:
        """Until the session's operation ends, or (rule 8b) the wall clock reaches ``until``."""
        if until is None:
            await changed.wait()
            return
        async with anyio.create_task_group() as group:

            async def sleep_then_stop(scope: anyio.CancelScope = group.cancel_scope) -> None:
                await self.clock.sleep_until(until)
                scope.cancel()

            group.start_soon(sleep_then_stop)
            await changed.wait()
            group.cancel_scope.cancel()

    def _still_waiting(self, session: Session, waited: float) -> str:
        """What a caller is told when its wait runs out: what is slow, and what happens next."""
        host = _provider_host(session.meta.issuer)
        took = f"{waited:.1f}" if waited < 10 else f"{waited:.0f}"
        lifecycle = session.lifecycle
        assert lifecycle is not None
        now = self.now()
        if lifecycle.state(now) is State.REFRESHING:
            return (f"the provider at {host} did not answer within {took} s; the agent "
                    f"gives each attempt {CALL_DEADLINE:.0f} s and keeps trying in the "
                    "background")
        if lifecycle.in_flight is not None:
            return (f"the secret store has not finished saving the new refresh token after "
                    f"{took} s; the agent keeps trying")
        retry_at = lifecycle.status(now).retry_at
        retry = f"retries in {max(0.0, retry_at - now):.0f} s" \
            if retry_at is not None else "keeps trying"
        return (f"could not get a token from the provider at {host} within {took} s; "
                f"the agent {retry}")

    async def refresh(self, request: p.Refresh) -> p.RefreshResult:
        session = self._find(request.profile, request.token_id)
        if session.lifecycle is None:
            raise OpError(ErrorCode.PROVIDER_ERROR, "an API key has nothing to refresh")
        token = await self._obtain(session, DEFAULT_SLOT, force_new=True,
                                   caller_timeout=request.timeout)
        return p.RefreshResult(token_id=session.meta.token_id, profile=session.meta.profile,
                               expires_at=token.expires_at)

    # ------------------------------------------------------------ revocation

    async def _revoke_at_provider(self, session: Session) -> str | None:
        """Revoke at the provider (RFC 7009, refresh token first); the failure reason or None."""
        meta = session.meta
        if session.api_key is not None:
            return "an API key is revoked in the Compozy Cloud dashboard, not here"
        lifecycle = session.lifecycle
        assert lifecycle is not None
        # A refresh in flight may rotate the refresh token: revoke the newest one.
        with anyio.move_on_after(REVOKE_WAIT):
            while lifecycle.in_flight is not None:
                await session.changed.wait()
        refresh_token = lifecycle.refresh_token
        if refresh_token is None or meta.issuer is None or meta.client_id is None:
            return None  # nothing left that the provider would accept
        try:
            metadata = await self.provider.discover(meta.issuer)
            await self.provider.revoke(metadata, client_id=meta.client_id,
                                       token=refresh_token.reveal(), hint="refresh_token")
        except (oidc.ProviderUnreachable, oidc.TransientProviderError) as exc:
            return f"the provider could not be reached ({exc})"
        except oidc.OAuthFailure as exc:
            return f"the provider refused the revocation ({exc})"
        # Access tokens too, best effort: many providers revoke them with the refresh
        # token (RFC 7009 section 2.1) and refuse to revoke self-contained JWTs.
        for token in lifecycle.access_tokens():
            with contextlib.suppress(oidc.OAuthFailure):
                await self.provider.revoke(metadata, client_id=meta.client_id,
                                           token=token.value.reveal(), hint="access_token")
        return None

    async def _forget(self, session: Session) -> None:
        meta = session.meta
        if not session.active:
            return
        session.active = False
        session.wake_at = None
        self._remove(session)
        if session.lifecycle is not None:
            with contextlib.suppress(IllegalTransition):
                session.lifecycle.revoked(self.now())  # its DeleteRefreshToken is done below
        session.notify()
        await self._delete_secret(meta.token_id, _secret_kind(meta))
        await self._save_metadata()

    async def _save_metadata(self) -> None:
        try:
            await self.store.save_metadata([s.meta for s in self.by_id.values()])
        except StoreError as exc:
            log.error("could not save session metadata: %s", exc)
            raise OpError(ErrorCode.STORAGE_ERROR, f"could not save session metadata: {exc}") \
                from None

    async def _revoke_sessions(self, targets: list[Session], force: bool) -> p.RevokeResult:
        result = p.RevokeResult(forgotten=[], revoked_at_provider=[], not_revoked={})
        unreachable: dict[str, str] = {}
        for session in targets:
            token_id = session.meta.token_id
            reason = await self._revoke_at_provider(session)
            if reason is None:
                result.revoked_at_provider.append(token_id)
            elif "could not be reached" in reason and not force:
                unreachable[token_id] = reason
                continue
            else:
                result.not_revoked[token_id] = reason
            await self._forget(session)
            result.forgotten.append(token_id)
        if unreachable:
            done = f"; {len(result.forgotten)} other session(s) were revoked and removed" \
                if result.forgotten else ""
            raise OpError(
                ErrorCode.PROVIDER_UNREACHABLE,
                "not revoked, so not removed: " + "; ".join(
                    f"{token_id}: {reason}" for token_id, reason in unreachable.items()) + done,
                {"command": "retry with --force to remove locally anyway"},
            )
        return result

    async def revoke(self, request: p.Revoke) -> p.RevokeResult:
        session = self._find("", request.token_id)
        return await self._revoke_sessions([session], request.force)

    async def revoke_all(self, request: p.RevokeAll) -> p.RevokeResult:
        return await self._revoke_sessions(list(self.by_id.values()), request.force)

    async def logout(self, request: p.Logout) -> p.RevokeResult:
        if request.all:
            targets = list(self.by_id.values())
        else:
            targets = [s for s in self.by_id.values() if s.meta.profile == request.profile]
        return await self._revoke_sessions(targets, request.force)

    # ------------------------------------------------------------ login

    def _login_settings(self, request: p.LoginStart) -> tuple[str, str, list[str], list[str]]:
        try:
            config = self.config_loader()
        except ConfigError as exc:
            raise OpError(ErrorCode.CONFIG_ERROR, str(exc)) from None
        profile = config.profiles.get(request.profile)
        issuer = request.issuer or (profile.issuer if profile else None) or DEFAULT_ISSUER
        client_id = request.client_id or (profile.client_id if profile else None) \
            or DEFAULT_CLIENT_ID
        scopes = request.scope or (profile.scopes if profile else None) or list(DEFAULT_SCOPES)
        resources = (profile.resources if profile and profile.resources else [])
        return issuer.rstrip("/"), client_id, list(scopes), list(resources)

    def _hold_login(self, login: Login) -> None:
        """Hold a new login: it replaces the profile's pending one, and at most MAX_LOGINS
        are held (finished ones nobody collected make room first; else ``busy``).

        Synchronous, so concurrent login_start requests cannot all pass the check.
        """
        for old in [held for held in self.logins.values() if held.profile == login.profile]:
            self._end_login(old, ErrorCode.LOGIN_FAILED,
                            f"a newer login for profile {login.profile!r} replaced this one")
        for finished in [held for held in self.logins.values() if held.done.is_set()]:
            if len(self.logins) < MAX_LOGINS:
                break
            del self.logins[finished.login_id]
        if len(self.logins) >= MAX_LOGINS:
            profiles = ", ".join(sorted(held.profile for held in self.logins.values()))
            raise OpError(ErrorCode.BUSY,
                          f"{len(self.logins)} logins are already in progress (profiles "
                          f"{profiles}); finish or cancel one of them (Ctrl-C where it runs) "
                          "and try again")
        self.logins[login.login_id] = login

    def _end_login(self, login: Login, code: str, message: str) -> None:
        """Stop a login that has not finished (its listener or polling ends) and forget it."""
        self.logins.pop(login.login_id, None)
        login.cancel_scope.cancel()
        if not login.done.is_set():
            self._fail_login(login, code, message)

    def connection_closed(self, owner: object) -> None:
        """End the logins the closed connection started: nobody is left to wait for them."""
        for login in [held for held in self.logins.values() if held.owner is owner]:
            self._end_login(login, ErrorCode.LOGIN_FAILED,
                            "cancelled: the connection that started it closed")

    async def login_start(
        self, request: p.LoginStart, owner: object = None
    ) -> p.LoginStartResult:
        issuer, client_id, scopes, resources = self._login_settings(request)
        try:
            metadata = await self.provider.discover(issuer)
        except oidc.ProviderUnreachable as exc:
            raise OpError(ErrorCode.PROVIDER_UNREACHABLE,
                          f"cannot reach the provider {issuer}: {exc}") from None
        except oidc.OAuthFailure as exc:
            raise OpError(ErrorCode.PROVIDER_ERROR, str(exc)) from None
        login = Login(_new_id(), request.profile, issuer, client_id, scopes, resources,
                      self.now() + LOGIN_TTL, owner=owner)
        self._hold_login(login)
        if request.flow == "device":
            try:
                device = await self.provider.device_authorize(oidc.device_authorization_request(
                    metadata, client_id=client_id, scopes=scopes, resources=resources))
            except oidc.OAuthFailure as exc:
                self.logins.pop(login.login_id, None)
                raise OpError(ErrorCode.LOGIN_FAILED, f"the provider refused: {exc}") from None
            login.expires_at = self.now() + device.expires_in
            self._spawn(self._device_flow, login, metadata, device)
            return p.LoginStartResult(
                login_id=login.login_id, flow="device", issuer=issuer,
                verification_uri=one_line(device.verification_uri, 2000),
                verification_uri_complete=one_line(device.verification_uri_complete, 2000)
                if device.verification_uri_complete else None,
                user_code=one_line(device.user_code, 64), interval=device.interval,
                expires_in=device.expires_in,
            )
        pkce = oidc.new_pkce()
        state = oidc.new_state()
        login.nonce = oidc.new_nonce()
        # aiohttp (about 10 MiB) is imported only by an agent that does a browser login.
        from compozy_agent.loopback import LoopbackRedirect

        # RFC 9207 section 2.4: the response's iss must name the issuer this request went
        # to (mix-up defence); required when the provider says it sends one.
        listener = LoopbackRedirect(
            state, issuer=metadata.issuer,
            issuer_required=metadata.authorization_response_iss_parameter_supported)
        try:
            await listener.start()
            url = oidc.authorization_url(metadata, client_id=client_id,
                                         redirect_uri=listener.redirect_uri, scopes=scopes,
                                         state=state, pkce=pkce, nonce=login.nonce,
                                         resources=resources)
        except (oidc.OAuthFailure, OSError) as exc:
            with anyio.CancelScope(shield=True):
                await listener.close()
            self.logins.pop(login.login_id, None)
            raise OpError(ErrorCode.LOGIN_FAILED, str(exc)) from None
        self._spawn(self._browser_flow, login, metadata, listener, pkce)
        return p.LoginStartResult(login_id=login.login_id, flow="browser", issuer=issuer,
                                  authorization_url=url, expires_in=LOGIN_TTL)

    async def _browser_flow(self, login: Login, metadata: oidc.ProviderMetadata,
                            listener: LoopbackRedirect, pkce: oidc.Pkce) -> None:
        try:
            await self._browser_login(login, metadata, listener, pkce)
        finally:
            login.released.set()

    async def _browser_login(self, login: Login, metadata: oidc.ProviderMetadata,
                             listener: LoopbackRedirect, pkce: oidc.Pkce) -> None:
        with login.cancel_scope:
            try:
                with anyio.fail_after(LOGIN_TTL):
                    code = await listener.wait()
            except TimeoutError:
                self._fail_login(login, ErrorCode.LOGIN_TIMEOUT,
                                 "nobody completed the browser login in time")
                return
            except oidc.OAuthError as exc:  # RFC 6749 4.1.2.1: error= on the redirect
                self._fail_login(login, ErrorCode.ACCESS_DENIED if exc.error == "access_denied"
                                 else ErrorCode.LOGIN_FAILED, f"the provider said {exc}")
                return
            except oidc.CallbackError as exc:  # another issuer (RFC 9207), no code
                self._fail_login(login, ErrorCode.LOGIN_FAILED,
                                 f"refused the login response: {exc}; no code was exchanged")
                return
            finally:
                # Shielded: a cancelled login (replaced, its connection closed) must still
                # close its port rather than be interrupted halfway.
                with anyio.CancelScope(shield=True):
                    await listener.close()
                log.debug("login %s: stopped listening on 127.0.0.1:%d",
                          login.login_id, listener.port)
            await self._exchange(login, metadata, oidc.code_exchange_request(
                metadata, client_id=login.client_id, code=code,
                redirect_uri=listener.redirect_uri, pkce=pkce))

    async def _device_flow(self, login: Login, metadata: oidc.ProviderMetadata,
                           device: oidc.DeviceAuthorization) -> None:
        try:
            await self._device_login(login, metadata, device)
        finally:
            login.released.set()

    async def _device_login(self, login: Login, metadata: oidc.ProviderMetadata,
                            device: oidc.DeviceAuthorization) -> None:
        interval = max(device.interval, 1.0)
        with login.cancel_scope:
            while True:
                await self.clock.sleep_until(self.now() + interval)
                if self.now() > login.expires_at:
                    self._fail_login(login, ErrorCode.LOGIN_TIMEOUT,
                                     "the device code expired before the login was approved")
                    return
                try:
                    answer = await self.provider.poll_device(
                        metadata, client_id=login.client_id, device_code=device.device_code)
                except oidc.OAuthError as exc:
                    match exc.error:
                        case "expired_token":
                            self._fail_login(login, ErrorCode.LOGIN_TIMEOUT,
                                             "the device code expired; run the login again")
                        case "access_denied":
                            self._fail_login(login, ErrorCode.ACCESS_DENIED,
                                             "the login was denied")
                        case _:
                            self._fail_login(login, ErrorCode.LOGIN_FAILED,
                                             f"the provider said {exc}")
                    return
                except (oidc.TransientProviderError, oidc.ProviderUnreachable) as exc:
                    log.warning("device login %s: polling failed (%s); retrying",
                                login.login_id, exc)
                    continue
                except oidc.OAuthFailure as exc:
                    self._fail_login(login, ErrorCode.LOGIN_FAILED, str(exc))
                    return
                match answer:
                    case oidc.DevicePending():
                        continue
                    case oidc.DeviceSlowDown():  # RFC 8628 section 3.5
                        interval = answer.next_interval(interval)
                        continue
                    case oidc.TokenResponse():
                        await self._finish(login, metadata, answer, answer.received_at)
                        return

    async def _exchange(self, login: Login, metadata: oidc.ProviderMetadata,
                        request: oidc.HttpRequest) -> None:
        try:
            response, received_at = await self.provider.token(request)
        except oidc.OAuthFailure as exc:
            self._fail_login(login, ErrorCode.LOGIN_FAILED, f"exchanging the code failed: {exc}")
            return
        await self._finish(login, metadata, response, received_at)

    async def _finish(self, login: Login, metadata: oidc.ProviderMetadata,
                      response: oidc.TokenResponse, received_at: float) -> None:
        # The provider has issued the tokens: a login cancelled now (its connection
        # closed) still stores them rather than stopping halfway through the writes.
        with anyio.CancelScope(shield=True):
            await self._adopt_login(login, metadata, response, received_at)

    async def _adopt_login(self, login: Login, metadata: oidc.ProviderMetadata,
                           response: oidc.TokenResponse, received_at: float) -> None:
        claims: dict[str, object] = {}
        if response.id_token:
            claims = oidc.decode_jwt_claims(response.id_token)
            try:
                # The nonce (browser logins) ties the ID token to this login's request
                # (OIDC Core 3.1.3.7 item 11).
                oidc.validate_id_token_claims(claims, issuer=login.issuer,
                                              client_id=login.client_id, now=received_at,
                                              nonce=login.nonce)
            except oidc.MalformedResponse as exc:
                self._fail_login(login, ErrorCode.LOGIN_FAILED, str(exc))
                return
        subject = claims.get("sub")
        if oidc.account_from_claims(claims) in (None, subject) and metadata.userinfo_endpoint:
            try:  # a nicety; the login stands without it
                # OIDC Core 5.3.2: an answer about another sub than the ID token's
                # MUST NOT be used.
                claims = {**claims, **await self.provider.userinfo(
                    oidc.userinfo_request(metadata, response.access_token),
                    subject=subject if isinstance(subject, str) else None)}
            except oidc.OAuthFailure as exc:
                log.warning("login %s: userinfo not used: %s", login.login_id, exc)
        account = oidc.account_from_claims(claims)
        meta = StoredSession(
            token_id=_new_id(), profile=login.profile, kind="oidc", issuer=login.issuer,
            client_id=login.client_id,
            subject=str(claims["sub"]) if "sub" in claims else None,
            account=one_line(account, ACCOUNT_LIMIT) if account is not None else None,
            scopes=response.scope or login.scopes, resources=login.resources,
            created_at=received_at,
        )
        # Its life counts from when the request was sent (lifecycle rule 2).
        access_token = usable_token(response.access_token, sent_at=response.issued_at,
                                    expires_at=response.expires_at, scope=response.scope)
        saved = True
        if response.refresh_token is not None:
            try:
                await self.store.put_secret(meta.token_id, "refresh_token",
                                            response.refresh_token)
            except StoreError as exc:
                # Kept in memory; the lifecycle retries the write and status warns (rule 4).
                log.error("session %s: could not save the refresh token (%s); retrying",
                          meta.token_id, exc)
                saved = False
        lifecycle = SessionLifecycle(
            received_at, refresh_token=response.refresh_token, access_token=access_token,
            refresh_token_saved=saved)
        session = Session(meta, lifecycle)
        try:
            await self._adopt(session)
        except OpError as exc:
            self._fail_login(login, exc.code, exc.message)
            return
        login.session = session
        login.done.set()
        log.info("profile %s: logged in to %s as %s (session %s)", login.profile, login.issuer,
                 meta.account, meta.token_id)

    async def _adopt(self, session: Session) -> None:
        """Store a new session, replacing the profile's previous one."""
        meta = session.meta
        previous = [s for s in self.by_id.values() if s.meta.profile == meta.profile]
        if session.api_key is not None:
            try:
                await self.store.put_secret(meta.token_id, "api_key", session.api_key)
            except StoreError as exc:
                raise OpError(ErrorCode.STORAGE_ERROR, str(exc)) from None
        self._add(session)
        try:
            await self._save_metadata()
        except OpError:
            self._remove(session)
            raise
        for old in previous:
            # The old session is replaced; it stays valid at the provider unless revoked.
            reason = await self._revoke_at_provider(old)
            if reason:
                log.warning("replaced session %s was not revoked: %s", old.meta.token_id, reason)
            await self._forget(old)
        self._reschedule(session)

    def _fail_login(self, login: Login, code: str, message: str) -> None:
        if login.done.is_set():
            return  # ended already (cancelled, replaced): the first outcome stands
        login.error = OpError(code, message)  # one printable line: it quotes provider text
        log.warning("login %s (profile %s) failed: %s", login.login_id, login.profile,
                    login.error.message)
        login.done.set()

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult:
        login = self.logins.get(request.login_id)
        if login is None:
            raise OpError(ErrorCode.UNKNOWN_LOGIN, f"no login {request.login_id!r} in progress")
        with anyio.move_on_after(max(0.0, min(request.timeout, 300.0))):
            await login.done.wait()
        if not login.done.is_set():
            return p.LoginWaitResult(state="pending")
        self.logins.pop(login.login_id, None)
        if login.error is not None:
            raise login.error
        assert login.session is not None
        return p.LoginWaitResult(state="done", session=self._info(login.session, self.now()))

    async def login_cancel(self, request: p.LoginCancel) -> p.Empty:
        login = self.logins.get(request.login_id)
        if login is None:
            raise OpError(ErrorCode.UNKNOWN_LOGIN, f"no login {request.login_id!r} in progress")
        self._end_login(login, ErrorCode.LOGIN_FAILED, "cancelled")
        return p.Empty()

    async def store_api_key(self, request: p.StoreApiKey) -> p.SessionInfo:
        meta = StoredSession(token_id=_new_id(), profile=request.profile, kind="api_key",
                             created_at=self.now())
        session = Session(meta, None, api_key=request.api_key)
        await self._adopt(session)
        return self._info(session, self.now())

