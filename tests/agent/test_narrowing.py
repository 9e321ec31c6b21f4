"""A narrower refresh with side effects (issue 12, item 2): the session never shrinks
silently and no token the provider killed is handed out.

First the lifecycle alone, on explicit times (lifecycle rules 13 and 14); then the
driver on the fake clock against the fake provider playing django-oauth-toolkit
(``FakeProvider.narrows_chains``): a narrower refresh narrows the chain for good and
each rotation revokes the previous access token.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    AccessToken,
    Action,
    PersistRefreshToken,
    Ready,
    Secret,
    SessionLifecycle,
    StartRefresh,
    State,
    slot_key,
)
from compozy_agent.manager import SessionManager
from compozy_agent.peer import Peer
from compozy_agent.sessions import Session
from compozy_agent.store import LearnedDownscope, MemorySecrets, SessionStore, StoredSession
from compozy_client import protocol as p
from compozy_client.config import Config, ProfileConfig, load_config
from compozy_client.errors import ConfigError
from support.clock import T0, FakeClock
from support.driver import settle
from support.fake_provider import DEVICE_AUTHORIZATION, USERINFO, FakeProvider

GRANTED = ["email", "offline_access", "openid", "profile"]
OPENID = slot_key(["openid"])
HOUR = 3600.0
PEER = Peer(uid=0, gid=0, pid=None)


# --------------------------------------------------------------------------
# The lifecycle (sans-I/O): rules 13 and 14.


def logged_in(now: float = T0) -> SessionLifecycle:
    return SessionLifecycle(now, refresh_token="rt-0", granted_scopes=GRANTED,
                            access_token=AccessToken(Secret("at-0"), now, now + HOUR),
                            rng=random.Random(1))


def start(decision: object) -> StartRefresh:
    assert isinstance(decision, StartRefresh), decision
    return decision


def only(actions: list[Action]) -> Action:
    assert len(actions) == 1, actions
    return actions[0]


def persisted(machine: SessionLifecycle, now: float, actions: list[Action]) -> None:
    """Report the write of a rotated refresh token as done."""
    (persist,) = actions
    assert isinstance(persist, PersistRefreshToken)
    machine.persist_done(now, persist.persist_id)


def test_a_rotation_by_a_narrower_refresh_supersedes_the_default_token() -> None:
    machine = logged_in()
    narrower = start(machine.request_token(T0 + 10, OPENID))
    actions = machine.refresh_succeeded(T0 + 11, narrower.refresh_id, "at-openid", T0 + HOUR,
                                        refresh_token="rt-1", scope=["openid"])
    persisted(machine, T0 + 11, actions)
    # The provider may have revoked at-0 when rt-0 was spent: never handed out again.
    default = machine.request_token(T0 + 12)
    assert isinstance(default, StartRefresh) and default.slot == DEFAULT_SLOT
    assert default.refresh_token == Secret("rt-1")
    # Kept warm, but not refreshed ahead of a request before the token that superseded
    # it is due itself: that refresh may kill the token just handed out.
    machine.refresh_abandoned(T0 + 12, default.refresh_id)
    wakeup = machine.next_wakeup(T0 + 13)
    assert wakeup is not None and wakeup >= T0 + 11 + 0.75 * (HOUR - 11)
    assert machine.tick(wakeup - 1) == []
    assert start(only(machine.tick(wakeup))).slot == DEFAULT_SLOT
    # Still listed for revocation at logout, at providers that did not kill it.
    assert "at-0" in {token.value.reveal() for token in machine.access_tokens()}
    # The narrower token is the one the rotation brought: still served.
    assert machine.request_token(T0 + 14, OPENID) == Ready(
        AccessToken(Secret("at-openid"), T0 + 11, T0 + HOUR - 2.0, ("openid",)))


def test_a_refresh_without_rotation_supersedes_nothing() -> None:
    machine = logged_in()
    narrower = start(machine.request_token(T0 + 10, OPENID))
    machine.refresh_succeeded(T0 + 11, narrower.refresh_id, "at-openid", T0 + HOUR,
                              scope=["openid"])
    ready = machine.request_token(T0 + 12)
    assert isinstance(ready, Ready) and ready.token.value.reveal() == "at-0"


def test_a_default_refresh_with_fewer_scopes_is_served_and_reported() -> None:
    machine = logged_in()
    narrower = start(machine.request_token(T0 + 10, OPENID))
    persisted(machine, T0 + 11, machine.refresh_succeeded(
        T0 + 11, narrower.refresh_id, "at-openid", T0 + HOUR, refresh_token="rt-1",
        scope=["openid"]))
    assert machine.status(T0 + 11).missing_scopes == ()  # nothing known to be lost yet
    default = start(machine.request_token(T0 + 12))
    persisted(machine, T0 + 13, machine.refresh_succeeded(
        T0 + 13, default.refresh_id, "at-narrowed", T0 + 13 + HOUR, refresh_token="rt-2",
        scope=["openid"]))
    # What the provider holds is what is served...
    ready = machine.request_token(T0 + 14)
    assert isinstance(ready, Ready) and ready.token.value.reveal() == "at-narrowed"
    assert ready.token.scope == ("openid",)
    # ...and the shrink is reported, and marks the provider as narrowing chains.
    status = machine.status(T0 + 14)
    assert status.missing_scopes == ("email", "offline_access", "profile")
    assert status.state is State.FRESH
    assert machine.scopes.narrows_chains
    assert machine.scopes.holds == frozenset({"openid"})


def test_a_shrink_without_a_narrower_refresh_is_reported_but_not_learnt() -> None:
    machine = logged_in()
    default = start(machine.request_token(T0 + HOUR))  # expired: refresh
    machine.refresh_succeeded(T0 + HOUR, default.refresh_id, "at-1", T0 + 2 * HOUR,
                              scope=["openid", "email"])
    status = machine.status(T0 + HOUR + 1)
    assert status.missing_scopes == ("offline_access", "profile")
    assert not machine.scopes.narrows_chains  # the provider's policy, not our downscope


def test_an_answer_without_scope_holds_the_grant() -> None:
    machine = logged_in()
    default = start(machine.request_token(T0 + HOUR))
    machine.refresh_succeeded(T0 + HOUR, default.refresh_id, "at-1", T0 + 2 * HOUR)
    assert machine.status(T0 + HOUR + 1).missing_scopes == ()
    assert machine.scopes.holds == frozenset(GRANTED)


# --------------------------------------------------------------------------
# The driver on the fake clock, against a provider that narrows chains.


@asynccontextmanager
async def narrowing_agent(
    fake: FakeProvider, state_dir: Path, config: Callable[[], Config] = Config,
) -> AsyncIterator[tuple[SessionManager, FakeClock, Session]]:
    """A manager on a fake clock holding one session at a provider that narrows chains."""
    fake.narrows_chains = True
    fake.live_access_tokens.add("login-at")
    fake.access_of_refresh["rt-0"] = "login-at"
    clock = FakeClock()
    store = SessionStore(str(state_dir), MemorySecrets())
    provider = ProviderClient(now=clock.now)
    manager = SessionManager(store, provider, clock=clock, config_loader=config)
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            now = clock.now()
            meta = StoredSession(token_id="s1", profile="default", kind="oidc",
                                 issuer=fake.issuer, client_id="cli", scopes=GRANTED,
                                 created_at=now)
            await manager.store.put_secret("s1", "refresh_token", "rt-0")
            session = Session(meta, SessionLifecycle(
                now, refresh_token="rt-0", granted_scopes=GRANTED,
                access_token=AccessToken(Secret("login-at"), now, now + HOUR)))
            await manager.logins.adopt(session)
            yield manager, clock, session
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


async def userinfo_status(fake: FakeProvider, token: str) -> int:
    async with httpx.AsyncClient() as client:
        answer = await client.get(fake.url(USERINFO), headers={"Authorization": f"Bearer {token}"})
    return answer.status_code


def ask(**fields: object) -> p.Token:
    return p.Token(id=1, **fields)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_narrower_then_default_then_force_new_at_a_provider_that_narrows_chains(
    fake_provider: FakeProvider, tmp_path: Path,
) -> None:
    async with narrowing_agent(fake_provider, tmp_path) as (manager, clock, _session):
        narrower = await manager.token(ask(scope=["openid"]), PEER)
        await settle(manager)
        assert narrower.scope == ["openid"]
        assert await userinfo_status(fake_provider, narrower.access_token) == 200

        # The provider revoked login-at when rt-0 was spent: it is not handed out.
        default = await manager.token(ask(), PEER)
        await settle(manager)
        assert default.access_token != "login-at"
        assert await userinfo_status(fake_provider, default.access_token) == 200
        # The session shrank, and says so, with the way back.
        assert default.scope == ["openid"]
        (info,) = await manager.sessions(None)
        assert info.missing_scopes == ["email", "offline_access", "profile"]
        warning = " ".join(manager.warnings())
        assert "no longer grants" in warning and "compozy login" in warning

        clock.advance(10)  # later than the token just issued (lifecycle rules 6, 7)
        forced = await manager.token(ask(force_new=True), PEER)
        await settle(manager)
        assert forced.access_token != default.access_token
        assert await userinfo_status(fake_provider, forced.access_token) == 200
        assert any("compozy login" in w for w in manager.warnings())

        # Learnt for the profile, in the state file: no more narrowing by refresh.
        state = json.loads((tmp_path / "sessions.json").read_text())
        assert state["narrows_chains"]["default"]["issuer"] == fake_provider.issuer
        refreshes = len(fake_provider.refresh_requests())
        again = await manager.token(ask(scope=["openid"]), PEER)
        assert again.access_token == forced.access_token
        assert len(fake_provider.refresh_requests()) == refreshes
        # A scope the provider dropped is refused before any refresh, with the way back.
        with pytest.raises(OpError) as refused:
            await manager.token(ask(scope=["email"]), PEER)
        assert refused.value.code == "bad_request"
        assert "compozy login" in refused.value.message
        assert len(fake_provider.refresh_requests()) == refreshes


@pytest.mark.anyio
async def test_downscope_never_in_the_config_hands_out_the_full_token(
    fake_provider: FakeProvider, tmp_path: Path,
) -> None:
    def config() -> Config:
        return Config(profiles={"default": ProfileConfig(downscope="never")})

    async with narrowing_agent(fake_provider, tmp_path, config) as (manager, _clock, _session):
        result = await manager.token(ask(scope=["openid"]), PEER)
        assert result.access_token == "login-at"
        assert result.scope == GRANTED  # wider than asked, and it says so
        assert fake_provider.refresh_requests() == []
        assert (await manager.sessions(None))[0].missing_scopes == []


@pytest.mark.anyio
async def test_downscope_refresh_in_the_config_overrides_what_was_learnt(
    fake_provider: FakeProvider, tmp_path: Path,
) -> None:
    def config() -> Config:
        return Config(profiles={"default": ProfileConfig(downscope="refresh")})

    async with narrowing_agent(fake_provider, tmp_path, config) as (manager, _clock, session):
        manager.driver._narrows_chains["default"] = LearnedDownscope(
            issuer=fake_provider.issuer, learned_at=T0)
        assert manager.driver.narrows_chains(session.meta)
        result = await manager.token(ask(scope=["openid"]), PEER)
        assert result.access_token != "login-at" and result.scope == ["openid"]
        assert len(fake_provider.refresh_requests()) == 1


@pytest.mark.anyio
async def test_what_was_learnt_survives_a_restart_and_holds_for_the_same_issuer_only(
    fake_provider: FakeProvider, tmp_path: Path,
) -> None:
    async with narrowing_agent(fake_provider, tmp_path) as (manager, _clock, _session):
        await manager.token(ask(scope=["openid"]), PEER)
        await settle(manager)
        await manager.token(ask(), PEER)
        await settle(manager)
    store = SessionStore(str(tmp_path), MemorySecrets())
    restarted = SessionManager(store, ProviderClient(now=FakeClock().now), clock=FakeClock())
    await restarted.restore()
    same = StoredSession(token_id="s2", profile="default", kind="oidc",
                         issuer=fake_provider.issuer)
    other_issuer = StoredSession(token_id="s3", profile="default", kind="oidc",
                                 issuer="https://other.example")
    assert restarted.driver.narrows_chains(same)
    assert not restarted.driver.narrows_chains(other_issuer)
    # A logout (forgetting the session) keeps what was learnt.
    store.save([])
    assert "default" in store.load_narrows_chains()


@pytest.mark.anyio
async def test_the_agent_refuses_a_config_with_an_unknown_key_as_the_cli_does(
    fake_provider: FakeProvider, tmp_path: Path,
) -> None:
    """Where the agent reads the config (a login, a narrower token), it validates it with
    the CLI's own load_config: the same message, and nothing done."""
    config = tmp_path / "config.yaml"
    config.write_text("profiles:\n  default:\n    downscop: never\n")
    config.chmod(0o600)
    with pytest.raises(ConfigError) as cli_error:
        load_config(str(config))
    async with narrowing_agent(fake_provider, tmp_path / "state",
                               lambda: load_config(str(config))) as (manager, _clock, _s):
        with pytest.raises(OpError) as narrower:
            await manager.token(ask(scope=["openid"]), PEER)
        with pytest.raises(OpError) as login:
            await manager.login_start(p.LoginStart(id=1, flow="device"))
    for refused in (narrower.value, login.value):
        assert (refused.code, refused.message) == ("config_error", str(cli_error.value))
    assert fake_provider.refresh_requests() == []
    assert fake_provider.requests_to(DEVICE_AUTHORIZATION) == []
