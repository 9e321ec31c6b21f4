"""The session driver: every session of the agent, and its lifecycle's actions.

It holds the sessions (by token id, and each profile's current one), restores
them from the store at start, saves their metadata, and performs what each
session's lifecycle asks for. The decisions (when to refresh, who waits, what a
failure means) are ``lifecycle.py``'s; here is only the I/O they ask for:
provider calls through ``http.py``, secrets and metadata through ``store.py``.

Every refresh and every write of a rotated refresh token runs as a task of the
driver, never of the client that caused it, and shielded from cancellation:
a refresh the provider has already answered must not be lost to a client
hanging up or to a shutdown. Clients (``tokens.py``, which serves the
``token`` and ``refresh`` ops) wait for the session's ``changed`` event and
ask the lifecycle again.

When a session next needs attention is the scheduler's business
(``scheduler.py``): the driver tells it each session's next wake-up and ticks
the session's lifecycle when it comes. The rooms above use the sessions:
``tokens.py`` serves their tokens, ``logins.py`` hands a new session in
(replacing its profile's old one) and ``revocation.py`` takes one out
(revoke, then :meth:`SessionDriver.forget`).
"""

from __future__ import annotations

import contextlib
import logging
import reprlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import msgspec

from compozy_agent import oidc
from compozy_agent.backend import OpError
from compozy_agent.clock import Clock, SystemClock
from compozy_agent.endpoints import EndpointsFor, no_endpoints
from compozy_agent.http import DpopSigner, ProviderClient
from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    Action,
    DeleteRefreshToken,
    IllegalTransition,
    PersistRefreshToken,
    SessionLifecycle,
    StartRefresh,
    State,
)
from compozy_agent.narrowing import missing_scopes_message
from compozy_agent.scheduler import Scheduler
from compozy_agent.store import (
    LearnedDownscope,
    SecretKind,
    SessionStore,
    StoredSession,
    StoreError,
)
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode

if TYPE_CHECKING:  # cryptography is loaded only by an agent with a DPoP session
    from compozy_agent.dpop import DpopKey

log = logging.getLogger("compozy_agent.sessions")

#: Refreshes in flight at once, over all providers (httpx pools 100 connections).
REFRESHES_AT_ONCE: Final = 16
#: Below the store's MAX_WAITING_CALLS, so logins and API keys still find room.
STORE_WRITES_AT_ONCE: Final = 8


class Session(msgspec.Struct, eq=False):
    meta: StoredSession
    lifecycle: SessionLifecycle | None
    api_key: str | None = None
    #: The key a DPoP-bound session's tokens are bound to (RFC 9449); None for bearer.
    dpop_key: DpopKey | None = None
    changed: anyio.Event = msgspec.field(default_factory=anyio.Event)
    last_used_at: float | None = None
    #: Whether the driver still holds this session (a forgotten one ignores late events).
    active: bool = True

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # never the API key or the DPoP key
        return [("meta", self.meta), ("lifecycle", self.lifecycle),
                ("last_used_at", self.last_used_at), ("active", self.active)]

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        return "Session(" + ", ".join(f"{name}={value!r}"
                                      for name, value in self.__rich_repr__()) + ")"

    def notify(self) -> None:
        """Wake everyone waiting for this session's refresh or persist to end."""
        self.changed.set()
        self.changed = anyio.Event()

    def dpop_signer(self, clock: Clock) -> DpopSigner | None:
        """What signs this session's proofs at the provider's token endpoint, or None."""
        key = self.dpop_key
        if key is None:
            return None
        return lambda method, url, nonce: key.proof(method, url, clock.now(), nonce=nonce)


async def load_dpop_key(store: SessionStore, meta: StoredSession) -> tuple[DpopKey | None, str]:
    """A DPoP session's key from the secret store, or None and why (for its login reason).

    Never a silent downgrade: a DPoP session without its key needs a new login.
    """
    from compozy_agent.dpop import DpopKey, DpopKeyError

    try:
        secret = await store.get_secret(meta.token_id, "dpop_key")
    except StoreError as exc:
        return None, f"its DPoP key could not be read from the secret store ({exc})"
    if secret is None:
        return None, "its DPoP key is missing from the secret store"
    try:
        key = DpopKey.from_secret(secret)
    except DpopKeyError as exc:
        return None, f"its DPoP key in the secret store is unusable ({exc})"
    if meta.dpop_thumbprint is not None and key.thumbprint != meta.dpop_thumbprint:
        return None, "its DPoP key in the secret store is not the key its tokens are bound to"
    return key, ""


def _secret_kind(meta: StoredSession) -> SecretKind:
    return "api_key" if meta.kind == "api_key" else "refresh_token"


def login_command(profile: str) -> str:
    """The command that logs ``profile`` in, for messages."""
    return "compozy login" + ("" if profile == "default" else f" --profile {profile}")


class SessionDriver:
    """Every session of the agent, by token id; at most one per profile."""

    def __init__(
        self,
        store: SessionStore,
        provider: ProviderClient,
        *,
        clock: Clock | None = None,
        endpoints: EndpointsFor = no_endpoints,
    ) -> None:
        self.store = store
        self.provider = provider
        #: The endpoints a session's profile names (endpoints.py).
        self.endpoints = endpoints
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.by_id: dict[str, Session] = {}
        #: The session each profile's requests go to (one per profile, O(1) per request).
        self._by_profile: dict[str, Session] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._warnings: list[str] = []
        #: Wakes each session when its lifecycle next needs a tick.
        self.scheduler: Scheduler[Session] = Scheduler(self.clock, self._wake)
        #: Refreshes at providers at once: an agent restoring 1,000 sessions must not
        #: open 1,000 requests (it would exhaust its connection pool and the provider's
        #: patience); the others queue here, in order.
        self._refresh_slots = anyio.CapacityLimiter(REFRESHES_AT_ONCE)
        #: Background writes to the secret store at once. The store fails calls at once
        #: when many wait behind a stuck keyring; rotations of many sessions queue here
        #: instead of failing there.
        self._store_slots = anyio.CapacityLimiter(STORE_WRITES_AT_ONCE)
        #: Profiles whose provider narrowed a chain for good (``narrowing.py``), kept in
        #: the state file so the profile's next sessions are never narrowed by refresh.
        self._narrows_chains: dict[str, LearnedDownscope] = {}

    def now(self) -> float:
        return self.clock.now()

    async def metadata(self, meta: StoredSession) -> oidc.ProviderMetadata:
        """The provider's metadata for a session: discovery, with its profile's endpoints."""
        assert meta.issuer is not None
        return await self.provider.discover(meta.issuer,
                                            self.endpoints(meta.profile, meta.issuer))

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
            await self.scheduler.run()

    async def restore(self) -> None:
        """Load the sessions of the state file, with their secrets from the secret store."""
        for path in self.store.remove_interrupted_writes():  # nothing is served yet
            log.warning("removed %s, left by a write that a crash interrupted", path)
        try:
            document = self.store.load_document()
            stored = document.sessions
            self._narrows_chains = dict(document.narrows_chains)
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
            login_reason = None if secret is not None else f"the refresh token {missing}"
            dpop_key = None
            if meta.token_binding == "dpop" and secret is not None:
                dpop_key, why = await load_dpop_key(self.store, meta)
                if dpop_key is None:
                    log.error("session %s (profile %s): %s; login required", meta.token_id,
                              meta.profile, why)
                    # RFC 9449: its tokens are bound to that key; never fall back to bearer.
                    secret, login_reason = None, (f"{why}; its tokens work only with that "
                                                  "key, so a new login is needed")
            # No access token: the first tick refreshes at once.
            lifecycle = SessionLifecycle(self.now(), refresh_token=secret,
                                         granted_scopes=meta.scopes, login_reason=login_reason)
            session = Session(meta, lifecycle, dpop_key=dpop_key)
            self._add(session)
            self.reschedule(session)
        log.info("restored %d session(s) from %s", len(self.by_id), self.store.state_path)

    def _wake(self, session: Session, now: float) -> None:
        """The scheduler's call: the session's wake-up time has come."""
        assert session.lifecycle is not None
        actions = session.lifecycle.tick(now)
        self.perform(session, actions)
        if not actions:
            # Nothing was due after all (the clock stepped back): look again later,
            # never in a tight loop.
            self.reschedule(session, not_before=now + 1.0)

    def reschedule(self, session: Session, *, not_before: float | None = None) -> None:
        """Tell the scheduler the session's next wake-up (O(log n) when it changed)."""
        lifecycle = session.lifecycle
        if lifecycle is None or not session.active:
            return
        wake_at = lifecycle.next_wakeup(self.now())
        if wake_at is not None and not_before is not None:
            wake_at = max(wake_at, not_before)
        self.scheduler.wake_at(session, wake_at)

    def spawn(self, function: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        """Run ``function(*args)`` as a task of the driver: it outlives the request."""
        assert self._group is not None, "run() first"
        self._group.start_soon(function, *args)

    # ------------------------------------------------------------ performing actions

    def perform(self, session: Session, actions: list[Action]) -> None:
        """Start what the lifecycle asked for; each outcome is reported when it ends."""
        for action in actions:
            match action:
                case StartRefresh():
                    self.spawn(self._run_refresh, session, action)
                case PersistRefreshToken():
                    self.spawn(self._run_persist, session, action)
                case DeleteRefreshToken():
                    self.spawn(self._delete_secret, session.meta.token_id, "refresh_token")
        self.reschedule(session)

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
                metadata = await self.metadata(meta)
                response = await self.provider.refresh(
                    metadata, client_id=meta.client_id,
                    refresh_token=start.refresh_token.reveal(), scopes=start.scopes,
                    resources=[start.audience] if start.audience else (),
                    dpop=session.dpop_signer(self.clock),
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
        expected_type = "DPoP" if meta.token_binding == "dpop" else "Bearer"
        if response.token_type != expected_type:
            # RFC 9449 section 5: a DPoP session must not quietly carry on with bearer
            # tokens (nor a bearer one with tokens its callers cannot use).
            reason = (f"the provider answered a {expected_type} session's refresh with a "
                      f"{response.token_type} token")
            log.warning("session %s: %s; login required", meta.token_id, reason)
            return lifecycle.refresh_failed_invalid_grant(self.now(), refresh_id, reason=reason)
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
        actions = lifecycle.refresh_succeeded(
            self.now(), refresh_id, response.access_token, response.expires_at,
            issued_at=response.issued_at, refresh_token=response.refresh_token,
            scope=response.scope)
        if lifecycle.scopes.narrows_chains and not self.narrows_chains(meta):
            await self._learn_narrowing(meta)
        return actions

    def narrows_chains(self, meta: StoredSession) -> bool:
        """Whether the session's provider was seen narrowing a chain of this profile."""
        learned = self._narrows_chains.get(meta.profile)
        return learned is not None and meta.issuer is not None and learned.issuer == meta.issuer

    async def _learn_narrowing(self, meta: StoredSession) -> None:
        """Remember, in the state file, that the profile's provider narrows chains."""
        assert meta.issuer is not None
        log.warning("profile %s: the provider narrowed the session's scopes for good after a "
                    "narrower refresh; its narrower tokens are no longer asked for by refresh "
                    "(downscope: never)", meta.profile)
        self._narrows_chains[meta.profile] = LearnedDownscope(issuer=meta.issuer,
                                                              learned_at=self.now())
        with contextlib.suppress(OpError):  # logged; known in memory until the agent stops
            await self._save_metadata()

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
        self.perform(session, actions=[a for a in actions if isinstance(a, StartRefresh)])

    async def _delete_secret(self, token_id: str, kind: SecretKind) -> None:
        with anyio.CancelScope(shield=True):
            try:
                async with self._store_slots:
                    await self.store.delete_secret(token_id, kind)
            except StoreError as exc:
                log.error("session %s: %s", token_id, exc)

    # ------------------------------------------------------------ the registry

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
                status = session.lifecycle.status(now)
                for warning in status.warnings:
                    warnings.append(f"profile {session.meta.profile}: {warning}")
                if status.missing_scopes:
                    warnings.append(f"profile {session.meta.profile}: " + missing_scopes_message(
                        status.missing_scopes, login_command(session.meta.profile)))
        return warnings

    async def sessions(self, profile: str | None) -> list[p.SessionInfo]:
        now = self.now()
        return [self.info(s, now) for s in self.by_id.values()
                if profile is None or s.meta.profile == profile]

    def info(self, session: Session, now: float) -> p.SessionInfo:
        meta = session.meta
        info = p.SessionInfo(
            token_id=meta.token_id, profile=meta.profile, kind=meta.kind,
            state=State.FRESH.value, issuer=meta.issuer, account=meta.account,
            subject=meta.subject, scopes=meta.scopes, created_at=meta.created_at,
            last_used_at=session.last_used_at, persisted=self.store.info.persistent,
        )
        if meta.token_binding == "dpop":
            info.token_type = "DPoP"
            info.dpop_algorithm = meta.dpop_algorithm
            info.dpop_thumbprint = meta.dpop_thumbprint
        if session.lifecycle is not None:
            status = session.lifecycle.status(now)
            info.state = status.state.value
            info.expires_at = status.expires_at
            info.last_refresh_at = status.last_refresh_at
            info.last_refresh_outcome = status.last_refresh_outcome
            info.missing_scopes = list(status.missing_scopes)
        return info

    def find(self, profile: str, token_id: str | None) -> Session:
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
                      {"command": login_command(profile)})

    async def hold(self, session: Session) -> list[Session]:
        """Hold a new session (its API key saved first); it becomes its profile's session.

        Returns the profile's sessions it replaces, still held: the caller decides
        what becomes of them (logins.py revokes them, then :meth:`forget`).
        """
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
        return previous

    async def forget(self, session: Session) -> None:
        meta = session.meta
        if not session.active:
            return
        session.active = False
        self.scheduler.wake_at(session, None)
        self._remove(session)
        if session.lifecycle is not None:
            with contextlib.suppress(IllegalTransition):
                session.lifecycle.revoked(self.now())  # its DeleteRefreshToken is done below
        session.notify()
        await self._delete_secret(meta.token_id, _secret_kind(meta))
        if meta.token_binding == "dpop":  # the key goes with the refresh token (RFC 9449)
            session.dpop_key = None
            await self._delete_secret(meta.token_id, "dpop_key")
        await self._save_metadata()

    async def _save_metadata(self) -> None:
        try:
            await self.store.save_metadata([s.meta for s in self.by_id.values()],
                                           self._narrows_chains)
        except StoreError as exc:
            log.error("could not save session metadata: %s", exc)
            raise OpError(ErrorCode.STORAGE_ERROR, f"could not save session metadata: {exc}") \
                from None
