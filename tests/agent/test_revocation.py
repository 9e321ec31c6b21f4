"""Logout, revoke and revoke-all against providers that cannot revoke (issue 12, item 1).

A session whose refresh token was not revoked at the provider stays valid there
until it expires, so forgetting it locally is not a success: the agent keeps it
and says why, unless the request says ``force``, and then it says what was left
valid. A profile can name the revocation endpoint the provider's metadata lacks.
The driver runs in-process on a fake clock; the provider is the aiohttp fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import AccessToken, Secret, SessionLifecycle
from compozy_agent.manager import SessionManager
from compozy_agent.revocation import LEFT_VALID
from compozy_agent.sessions import Session
from compozy_agent.store import MemorySecrets, SessionStore, StoredSession
from compozy_client import protocol as p
from compozy_client.config import Config, ProfileConfig
from compozy_client.errors import ErrorCode
from support.clock import FakeClock
from support.fake_provider import REVOCATION, Behaviour, FakeProvider

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def manager_with_session(
    fake: FakeProvider, tmp_path: object, config: Callable[[], Config] = Config,
) -> AsyncIterator[SessionManager]:
    """A manager on a fake clock holding one session of profile ``default`` (``rt-0``)."""
    clock = FakeClock()
    store = SessionStore(str(tmp_path), MemorySecrets())
    provider = ProviderClient(now=clock.now, timeout=5.0)
    manager = SessionManager(store, provider, clock=clock, config_loader=config)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            now = clock.now()
            meta = StoredSession(token_id="s1", profile="default", kind="oidc",
                                 issuer=fake.issuer, client_id="cli", created_at=now)
            await store.put_secret("s1", "refresh_token", "rt-0")
            lifecycle = SessionLifecycle(now, refresh_token="rt-0", access_token=AccessToken(
                Secret("login-at"), issued_at=now, expires_at=now + 3600))
            await manager.logins.adopt(Session(meta, lifecycle))
            yield manager
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


async def test_logout_without_a_revocation_endpoint_keeps_the_session_unless_forced(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    fake_provider.omitted_metadata = {"revocation_endpoint"}
    async with manager_with_session(fake_provider, tmp_path) as manager:
        with pytest.raises(OpError) as refused:
            await manager.logout(p.Logout(id=1))
        assert refused.value.code == ErrorCode.PROVIDER_ERROR
        message = refused.value.message
        assert "names no revocation endpoint" in message
        assert "revocation_endpoint" in message and LEFT_VALID in message
        assert "rt-0" not in message
        assert refused.value.details == {"command": "retry with --force to remove locally anyway"}
        assert list(manager.by_id) == ["s1"]  # nothing lost
        forced = await manager.logout(p.Logout(id=2, force=True))
        assert forced.forgotten == ["s1"] and forced.revoked_at_provider == []
        assert LEFT_VALID in forced.not_revoked["s1"]
        assert manager.by_id == {}


@pytest.mark.parametrize("request_of", [
    lambda force: p.Revoke(id=1, token_id="s1", force=force),
    lambda force: p.RevokeAll(id=1, force=force),
], ids=["revoke", "revoke_all"])
async def test_revoke_refused_by_the_provider_keeps_the_session_unless_forced(
    fake_provider: FakeProvider, tmp_path: object,
    request_of: Callable[[bool], p.Revoke | p.RevokeAll],
) -> None:
    fake_provider.on(REVOCATION, Behaviour.oauth_error("unsupported_token_type"))
    async with manager_with_session(fake_provider, tmp_path) as manager:
        call = manager.revoke if isinstance(request_of(False), p.Revoke) else manager.revoke_all
        with pytest.raises(OpError) as refused:
            await call(request_of(False))  # type: ignore[arg-type]
        assert refused.value.code == ErrorCode.PROVIDER_ERROR
        assert "refused the revocation" in refused.value.message
        assert "unsupported_token_type" in refused.value.message
        assert list(manager.by_id) == ["s1"]
        fake_provider.on(REVOCATION, Behaviour.oauth_error("unsupported_token_type"))
        forced = await call(request_of(True))  # type: ignore[arg-type]
        assert forced.forgotten == ["s1"] and LEFT_VALID in forced.not_revoked["s1"]


async def test_a_profile_names_the_revocation_endpoint_discovery_lacks(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    fake_provider.omitted_metadata = {"revocation_endpoint"}

    def config() -> Config:
        return Config(profiles={"default": ProfileConfig(
            issuer=fake_provider.issuer, revocation_endpoint=fake_provider.url(REVOCATION))})

    async with manager_with_session(fake_provider, tmp_path, config) as manager:
        result = await manager.logout(p.Logout(id=1))
        assert result.revoked_at_provider == ["s1"] and result.not_revoked == {}
        assert fake_provider.revocations()[0]["token"] == "rt-0"


async def test_a_profile_of_another_issuer_lends_no_endpoint(
    fake_provider: FakeProvider, tmp_path: object
) -> None:
    """Endpoints named for one provider are never used for a session of another."""
    fake_provider.omitted_metadata = {"revocation_endpoint"}

    def config() -> Config:
        return Config(profiles={"default": ProfileConfig(
            issuer="https://other.example", revocation_endpoint=fake_provider.url(REVOCATION))})

    async with manager_with_session(fake_provider, tmp_path, config) as manager:
        with pytest.raises(OpError, match="names no revocation endpoint"):
            await manager.logout(p.Logout(id=1))
        assert fake_provider.revocations() == []
