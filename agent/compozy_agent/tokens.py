"""Token serving: the ``token`` and ``refresh`` ops, answered from a session's lifecycle.

A request finds its session in the driver (``sessions.py``), asks the session's
lifecycle what to do, has the driver perform what it asks (a refresh, run as
the driver's task, never the caller's), and waits for the session's
``changed`` event to ask again, within a bound: the caller always hears what
is slow from the agent (docs/architecture.md, "Deadlines").

This room sits above the driver and the driver never imports it: the driver
holds and runs sessions, this room decides how long a caller waits and what it
is told.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import anyio

from compozy_agent.backend import OpError
from compozy_agent.http import CALL_DEADLINE, host_of
from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    RECENT,
    AccessToken,
    Fail,
    Grant,
    Ready,
    StartRefresh,
    State,
    WaitForRefresh,
    slot_key,
)
from compozy_agent.narrowing import Downscope, unheld_scopes, unheld_scopes_message
from compozy_agent.oidc import valid_dpop_nonce
from compozy_agent.peer import Peer
from compozy_agent.sessions import Session, SessionDriver, login_command
from compozy_client import protocol as p
from compozy_client.config import Config, load_config
from compozy_client.errors import ConfigError, ErrorCode

#: How long a token request may wait for refreshes (seconds of real time): two provider
#: calls (CALL_DEADLINE each), and below the CLI's 30 s, so that the agent's own answer,
#: which says what is slow, reaches the person (docs/architecture.md, "Deadlines").
WAIT_LIMIT: Final = 20.0
#: A caller that says how long it waits (``timeout``) is answered this much before then.
ANSWER_MARGIN: Final = 1.0


def dpop_bound(session: Session) -> OpError:
    """The refusal of a bearer token for a DPoP-bound session (the way out named)."""
    profile = session.meta.profile
    return OpError(
        ErrorCode.DPOP_BOUND,
        f"profile {profile!r} holds DPoP-bound tokens (token_binding: dpop, RFC 9449): they "
        "work only with a proof signed by the agent, so a tool that can send only a bearer "
        "token cannot use them; use a DPoP-aware client (`compozy auth dpop-proof`, the "
        f"dpop_proof op), or set token_binding: bearer for profile {profile!r} and log in "
        "again", {"command": "compozy auth dpop-proof --method GET --url URL"})


class TokenService:
    """The ``token`` and ``refresh`` ops: a session's tokens, waiting on its refreshes."""

    def __init__(self, driver: SessionDriver, *,
                 config_loader: Callable[[], Config] = load_config) -> None:
        self.driver = driver
        self.config_loader = config_loader

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult:
        session = self.driver.find(request.profile, request.token_id)
        now = session.last_used_at = self.driver.now()
        if session.api_key is not None:
            return p.TokenResult(access_token=session.api_key, token_id=session.meta.token_id,
                                 profile=session.meta.profile, kind="api_key")
        if session.meta.token_binding == "dpop" and not request.accept_dpop:
            raise dpop_bound(session)
        slot = DEFAULT_SLOT if request.scope is None and request.audience is None \
            else slot_key(request.scope, request.audience)
        whole = False  # a narrower scope served with the session's full token
        if slot[0] is not None:
            slot, whole = await self._narrower_scopes(session, slot[0], slot[1])
        # A narrower token may not widen what the login granted (lifecycle rule 12).
        grant = None if slot == DEFAULT_SLOT else Grant.of(session.meta.scopes,
                                                           session.meta.resources)
        token = await self._obtain(session, slot, min_valid=request.min_valid,
                                   force_new=request.force_new,
                                   rejected_token=request.rejected_token, asked_at=now,
                                   grant=grant, caller_timeout=request.timeout)
        scope = list(token.scope) if token.scope is not None else None
        held = session.lifecycle.scopes.holds if session.lifecycle is not None else None
        if scope is None and whole and held is not None:
            scope = sorted(held)  # say that the token is wider than asked
        return p.TokenResult(access_token=token.value.reveal(), expires_at=token.expires_at,
                             token_id=session.meta.token_id, profile=session.meta.profile,
                             scope=scope, audience=request.audience,
                             token_type="DPoP" if session.dpop_key is not None else "Bearer")

    async def _narrower_scopes(
        self, session: Session, requested: frozenset[str], audience: str | None
    ) -> tuple[tuple[frozenset[str] | None, str | None], bool]:
        """The slot that serves a request for narrower scopes, and whether it is the
        session's full token (``downscope: never``, see ``narrowing.py``)."""
        lifecycle = session.lifecycle
        assert lifecycle is not None
        meta = session.meta
        slot = (requested, audience)
        refusal = Grant.of(meta.scopes, meta.resources).refusal(slot)
        if refusal is not None:  # lifecycle rule 12, with its message
            raise OpError(refusal.code, refusal.message)
        unheld = unheld_scopes(requested, lifecycle.scopes.holds)
        if unheld:
            raise OpError(ErrorCode.BAD_REQUEST,
                          unheld_scopes_message(unheld, login_command(meta.profile)))
        if await self._downscope(session) == "refresh":
            return slot, False
        return (None, audience), True

    async def _downscope(self, session: Session) -> Downscope:
        """The profile's ``downscope``: the config's, else ``never`` when its provider was
        seen narrowing chains, else ``refresh``."""
        try:
            config = await anyio.to_thread.run_sync(self.config_loader)
        except ConfigError as exc:
            raise OpError(ErrorCode.CONFIG_ERROR, str(exc)) from None
        profile = config.profiles.get(session.meta.profile)
        if profile is not None and profile.downscope is not None:
            return profile.downscope
        return "never" if self.driver.narrows_chains(session.meta) else "refresh"

    async def dpop_proof(self, request: p.DpopProof, peer: Peer) -> p.DpopProofResult:
        """A proof for ``htm`` ``htu`` bound to the session's current access token
        (RFC 9449 section 4.2, ``ath``), and that token; the key stays here."""
        from compozy_agent.dpop import DpopKeyError, normalize_htu, valid_method

        if not valid_method(request.htm):
            raise OpError(ErrorCode.BAD_REQUEST, "htm must be an HTTP method such as GET")
        try:
            normalize_htu(request.htu)
        except DpopKeyError as exc:
            raise OpError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if request.nonce is not None and not valid_dpop_nonce(request.nonce):
            raise OpError(ErrorCode.BAD_REQUEST,
                          "nonce is not a DPoP nonce (RFC 9449 section 8.1: printable ASCII, "
                          "no space, quote or backslash)")
        session = self.driver.find(request.profile, request.token_id)
        now = session.last_used_at = self.driver.now()
        if session.meta.token_binding != "dpop":
            raise OpError(ErrorCode.NOT_DPOP_BOUND,
                          f"profile {session.meta.profile!r} holds bearer tokens, which need no "
                          "DPoP proof; ask for a token (`compozy auth token`), or set "
                          "token_binding: dpop for it and log in again")
        slot = DEFAULT_SLOT if request.scope is None and request.audience is None \
            else slot_key(request.scope, request.audience)
        grant = None if slot == DEFAULT_SLOT else Grant.of(session.meta.scopes,
                                                           session.meta.resources)
        token = await self._obtain(session, slot, min_valid=request.min_valid,
                                   force_new=request.force_new,
                                   rejected_token=request.rejected_token, asked_at=now,
                                   grant=grant, caller_timeout=request.timeout)
        key = session.dpop_key
        if key is None:  # forgotten (logged out) while the token was being fetched
            raise OpError(ErrorCode.LOGIN_REQUIRED,
                          f"profile {session.meta.profile!r} has no DPoP key any more; log in "
                          "again", {"command": login_command(session.meta.profile)})
        access_token = token.value.reveal()
        proof = key.proof(request.htm, request.htu, self.driver.now(), nonce=request.nonce,
                          access_token=access_token)
        return p.DpopProofResult(access_token=access_token, proof=proof,
                                 expires_at=token.expires_at, token_id=session.meta.token_id,
                                 profile=session.meta.profile, dpop_thumbprint=key.thumbprint)

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
        now = asked_at = self.driver.now() if asked_at is None else asked_at
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
                        self.driver.perform(session, [background])
                    return token
                case Fail(code=code, message=message):
                    details = {"command": login_command(session.meta.profile)} \
                        if code == ErrorCode.LOGIN_REQUIRED else {}
                    raise OpError(code, message, details)
                case StartRefresh() | WaitForRefresh():
                    changed = session.changed
                    if isinstance(decision, StartRefresh):
                        self.driver.perform(session, [decision])
                    until = decision.until if isinstance(decision, WaitForRefresh) else None
                    with anyio.move_on_after(started + wait_limit - anyio.current_time()):
                        await self._wait_for_change(changed, until)
                    if anyio.current_time() >= started + wait_limit:
                        raise OpError(ErrorCode.REFRESH_FAILED,
                                      self._still_waiting(session, anyio.current_time() - started))
                    now = self.driver.now()

    async def _wait_for_change(self, changed: anyio.Event, until: float | None) -> None:
        """Until the session's operation ends, or (rule 8b) the wall clock reaches ``until``."""
        if until is None:
            await changed.wait()
            return
        async with anyio.create_task_group() as group:

            async def sleep_then_stop(scope: anyio.CancelScope = group.cancel_scope) -> None:
                await self.driver.clock.sleep_until(until)
                scope.cancel()

            group.start_soon(sleep_then_stop)
            await changed.wait()
            group.cancel_scope.cancel()

    def _still_waiting(self, session: Session, waited: float) -> str:
        """What a caller is told when its wait runs out: what is slow, and what happens next."""
        host = host_of(session.meta.issuer or "")
        took = f"{waited:.1f}" if waited < 10 else f"{waited:.0f}"
        lifecycle = session.lifecycle
        assert lifecycle is not None
        now = self.driver.now()
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
        session = self.driver.find(request.profile, request.token_id)
        if session.lifecycle is None:
            raise OpError(ErrorCode.PROVIDER_ERROR, "an API key has nothing to refresh")
        token = await self._obtain(session, DEFAULT_SLOT, force_new=True,
                                   caller_timeout=request.timeout)
        return p.RefreshResult(token_id=session.meta.token_id, profile=session.meta.profile,
                               expires_at=token.expires_at)
