"""The device flow on providers that do it differently (issue 12, item 3), in-process.

What django-oauth-toolkit does, played by the fake provider so each case can be
produced on demand: user codes without a hyphen and with case that matters,
no ``verification_uri_complete``, ``404 device_not_found`` for a device code it
no longer knows, a device grant answered without an ID token, and a device
code whose ``expires_in`` the provider does not enforce while nobody acts.
Each ends in a working login or a clear message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from compozy_agent.backend import OpError
from compozy_agent.http import ProviderClient
from compozy_agent.manager import SessionManager
from compozy_agent.store import MemorySecrets, SessionStore
from compozy_client import protocol as p
from compozy_client.config import Config, ProfileConfig
from compozy_client.errors import ErrorCode
from support.clock import FakeClock
from support.fake_provider import DEVICE_AUTHORIZATION, TOKEN, Behaviour, FakeProvider

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeProvider]:
    async with FakeProvider(now=clock.now) as provider:
        yield provider


@asynccontextmanager
async def running(tmp_path: Path, clock: FakeClock,
                  config: Config | None = None) -> AsyncIterator[SessionManager]:
    provider = ProviderClient(now=clock.now, timeout=5.0)
    manager = SessionManager(SessionStore(str(tmp_path), MemorySecrets()), provider,
                             clock=clock, config_loader=lambda: config or Config())
    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            yield manager
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


def device_start(issuer: str | None, client_id: str | None = "compozy-cli") -> p.LoginStart:
    return p.LoginStart(id=1, flow="device", issuer=issuer, client_id=client_id,
                        scope=["openid", "offline_access"])


async def finish(manager: SessionManager, clock: FakeClock, login_id: str) -> p.LoginWaitResult:
    """Wait for the login while fake time passes (the poll loop sleeps on the clock)."""
    result: list[p.LoginWaitResult] = []
    failure: list[OpError] = []

    async def wait(scope: anyio.CancelScope) -> None:
        try:
            result.append(await manager.login_wait(p.LoginWait(id=2, login_id=login_id,
                                                               timeout=60)))
        except OpError as exc:
            failure.append(exc)
        scope.cancel()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(wait, group.cancel_scope)
            while True:
                await clock.wait_for_sleepers(2)  # the scheduler and the poll loop
                clock.advance(1.0)
                await anyio.lowlevel.checkpoint()
    if failure:
        raise failure[0]
    return result[0]


async def test_a_code_without_hyphen_and_no_complete_uri_is_shown_verbatim(
    fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    fake.user_code = "0a1B2c3V"  # case matters at this provider: never reformatted
    fake.device_uri_complete = False
    fake.then(Behaviour.oauth_error("authorization_pending"))
    async with running(tmp_path, clock) as manager:
        started = await manager.login_start(device_start(fake.issuer))
        assert started.user_code == "0a1B2c3V"
        assert started.verification_uri == fake.url("/device")
        assert started.verification_uri_complete is None
        done = await finish(manager, clock, started.login_id)
        assert done.state == "done" and done.session is not None


async def test_device_not_found_is_a_clear_message(
    fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    fake.then(Behaviour.oauth_error("device_not_found", status=404))
    async with running(tmp_path, clock) as manager:
        started = await manager.login_start(device_start(fake.issuer))
        with pytest.raises(OpError) as caught:
            await finish(manager, clock, started.login_id)
        assert caught.value.code == ErrorCode.LOGIN_TIMEOUT
        assert "no longer knows this device code (device_not_found)" in caught.value.message
        assert "run the login again" in caught.value.message
        assert len(fake.token_requests()) == 1  # no polling after it


async def test_a_device_grant_without_id_token_takes_the_account_from_userinfo(
    fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    fake.issue_id_tokens = False
    fake.claims = {"sub": "2"}  # stock django-oauth-toolkit: the subject and nothing else
    async with running(tmp_path, clock) as manager:
        started = await manager.login_start(device_start(fake.issuer))
        done = await finish(manager, clock, started.login_id)
        assert done.session is not None and done.session.account == "2"
        status = await manager.sessions(None)
        assert status[0].account == "2"
        assert manager.by_id[status[0].token_id].meta.subject == "2"


async def test_a_device_grant_without_id_token_or_userinfo_still_logs_in(
    fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    fake.issue_id_tokens = False
    fake.on("/me", *[Behaviour.failing(503)] * 3)
    async with running(tmp_path, clock) as manager:
        started = await manager.login_start(device_start(fake.issuer))
        done = await finish(manager, clock, started.login_id)
        assert done.state == "done"  # the tokens work; who it is stays unknown
        assert (await manager.token(p.Token(id=3), None)).access_token.startswith("fake-at-")


async def test_an_expires_in_the_provider_does_not_enforce_is_enforced_here(
    fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    fake.device_expires_in = 30
    # The provider would answer authorization_pending for ever while nobody acts.
    fake.then(*[Behaviour.oauth_error("authorization_pending")] * 100)
    async with running(tmp_path, clock) as manager:
        started = await manager.login_start(device_start(fake.issuer))
        assert started.expires_in == 30
        with pytest.raises(OpError) as caught:
            await finish(manager, clock, started.login_id)
        assert caught.value.code == ErrorCode.LOGIN_TIMEOUT
        assert "expired before the login was approved" in caught.value.message
        assert len(fake.token_requests()) <= 31  # polling stopped at expires_in


async def test_the_profile_device_client_and_endpoint_are_used_for_the_device_flow(
    fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    fake.omitted_metadata = {"device_authorization_endpoint"}
    bare = Config(profiles={"default": ProfileConfig(issuer=fake.issuer)})
    async with running(tmp_path, clock, bare) as manager:
        with pytest.raises(OpError, match="device_authorization_endpoint in the profile"):
            await manager.login_start(device_start(None, client_id=None))
    config = Config(profiles={"default": ProfileConfig(
        issuer=fake.issuer, client_id="compozy-cli", device_client_id="compozy-device",
        device_authorization_endpoint=fake.url(DEVICE_AUTHORIZATION))})
    async with running(tmp_path, clock, config) as manager:
        started = await manager.login_start(device_start(None, client_id=None))
        done = await finish(manager, clock, started.login_id)
        assert done.state == "done"
        assert fake.requests_to(DEVICE_AUTHORIZATION)[-1].form["client_id"] == "compozy-device"
        assert {r.form["client_id"] for r in fake.requests_to(TOKEN)} == {"compozy-device"}
        # Refreshes go with the client the session was granted to.
        clock.advance(3500)  # past the refresh point of the hour-long token
        assert (await manager.token(p.Token(id=4), None)).access_token.startswith("fake-at-")
        with anyio.fail_after(10):
            await fake.arrived(1 + len(fake.token_requests("urn:ietf:params:oauth:"
                                                            "grant-type:device_code")))
        assert fake.refresh_requests()[-1]["client_id"] == "compozy-device"
