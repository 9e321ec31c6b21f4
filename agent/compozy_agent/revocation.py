"""Revocation: RFC 7009 at the provider, then the session is forgotten.

``revoke`` (one session by token id), ``revoke_all`` and ``logout`` (a
profile's sessions, or all) revoke each session's refresh token at the
provider, then its access tokens (best effort), then have the driver forget
it: secret deleted, metadata saved. A session that could not be revoked at
its provider (unreachable, refused, or no revocation endpoint in its metadata
or profile) is kept unless the request says ``force``: removing it locally
would leave its refresh token valid at the provider, with nobody holding it,
until it expires. An API key is the exception: it is revoked in the dashboard,
so forgetting it here is all a logout can do. ``logins.py`` uses
:meth:`Revocation.revoke_at_provider` for the session a new login replaces.
"""

from __future__ import annotations

import contextlib
from typing import Final

import anyio

from compozy_agent import oidc
from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.sessions import Session, SessionDriver
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode

#: How long a revocation waits for a refresh in flight, so it revokes the newest token.
REVOKE_WAIT: Final = 10.0
API_KEY_NOTE: Final = "an API key is revoked in the Compozy Cloud dashboard, not here"
#: What a session forgotten without being revoked leaves behind.
LEFT_VALID: Final = "its refresh token stays valid at the provider until it expires"


class Revocation:
    """Revokes sessions at their provider and has the driver forget them."""

    def __init__(self, driver: SessionDriver, provider: ProviderClient) -> None:
        self.driver = driver
        self.provider = provider

    async def revoke_at_provider(self, session: Session) -> str | None:
        """Revoke at the provider (RFC 7009, refresh token first); the failure reason or None."""
        meta = session.meta
        if session.api_key is not None:
            return API_KEY_NOTE
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
            metadata = await self.driver.metadata(meta)
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

    async def _revoke_sessions(self, targets: list[Session], force: bool) -> p.RevokeResult:
        result = p.RevokeResult(forgotten=[], revoked_at_provider=[], not_revoked={})
        kept: dict[str, str] = {}
        for session in targets:
            token_id = session.meta.token_id
            reason = await self.revoke_at_provider(session)
            if reason is None:
                result.revoked_at_provider.append(token_id)
            elif reason == API_KEY_NOTE:
                result.not_revoked[token_id] = reason
            elif not force:
                kept[token_id] = reason
                continue
            else:
                result.not_revoked[token_id] = f"{reason}; {LEFT_VALID}"
            await self.driver.forget(session)
            result.forgotten.append(token_id)
        if kept:
            done = f"; {len(result.forgotten)} other session(s) were revoked and removed" \
                if result.forgotten else ""
            unreachable = all("could not be reached" in reason for reason in kept.values())
            raise OpError(
                ErrorCode.PROVIDER_UNREACHABLE if unreachable else ErrorCode.PROVIDER_ERROR,
                "not revoked, so not removed: " + "; ".join(
                    f"{token_id}: {reason}" for token_id, reason in kept.items())
                + f" ({LEFT_VALID} if removed here){done}",
                {"command": "retry with --force to remove locally anyway"},
            )
        return result

    async def revoke(self, request: p.Revoke) -> p.RevokeResult:
        session = self.driver.find("", request.token_id)
        return await self._revoke_sessions([session], request.force)

    async def revoke_all(self, request: p.RevokeAll) -> p.RevokeResult:
        return await self._revoke_sessions(list(self.driver.by_id.values()), request.force)

    async def logout(self, request: p.Logout) -> p.RevokeResult:
        if request.all:
            targets = list(self.driver.by_id.values())
        else:
            targets = [s for s in self.driver.by_id.values() if s.meta.profile == request.profile]
        return await self._revoke_sessions(targets, request.force)
