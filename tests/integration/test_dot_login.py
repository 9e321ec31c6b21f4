"""End to end on the second real provider, django-oauth-toolkit (issue 12).

The real `compozy` CLI and agent against a stock DOT deployment (tests/provider_django):
browser login (headless Chromium, and plain HTTP), device login with the profile's
overrides (DOT's discovery names no device endpoint, and a DOT application holds
one grant type, so the device flow has a client of its own), proactive refresh,
restart from the real keyring, logout and revoke-all revoking at the provider,
proved at DOT's userinfo (the access token) and token endpoint (the refresh token).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.dot_provider import (
    CLIENT_ID,
    DEVICE_CLIENT_ID,
    DotProvider,
    DotProviderFactory,
    approve_device,
    complete_browser_login,
)
from support.keyring_fixture import SecretService
from support.login import CLI, reaped

pytestmark = pytest.mark.real_provider

#: What alice is called: stock DOT's ID token and userinfo carry ``sub`` (her user id) only.
ALICE = "1"


def configure_dot(agent_env: AgentEnv, provider: DotProvider, *profiles: str,
                  storage: str = "auto", device_endpoint: bool = True) -> None:
    """Profiles for DOT as a new user would write them (README's configuration section)."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"storage: {storage}", "profiles:"]
    for profile in profiles or ("default",):
        lines += [
            f"  {profile}:",
            f"    issuer: {provider.issuer}",
            f"    client_id: {CLIENT_ID}",
            f"    device_client_id: {DEVICE_CLIENT_ID}",
            "    scopes: [openid, profile, email, offline_access, compozy:read, compozy:write]",
        ]
        if device_endpoint:
            lines.append(f"    device_authorization_endpoint: "
                         f"{provider.device_authorization_endpoint}")
    agent_env.config.write_text("\n".join(lines) + "\n")


def status(agent_env: AgentEnv, *args: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        run_cli(agent_env, "auth", "status", "--json", *args).stdout)
    return document


def token(agent_env: AgentEnv, *args: str) -> str:
    result = run_cli(agent_env, "auth", "token", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def dot_login_device(agent_env: AgentEnv, *args: str,
                     login: str = "alice") -> subprocess.CompletedProcess[str]:
    """`compozy login --device`; the person types the code shown on DOT's device page."""
    proc = subprocess.Popen([*CLI, "login", "--device", *args], env=agent_env.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        assert proc.stderr is not None
        shown = []
        for line in proc.stderr:
            shown.append(line)
            found = re.search(r"open (\S+) and enter the code (\S+) exactly as shown", line)
            if found:
                approve_device(found.group(1), found.group(2), login=login)
                break
        stdout, rest = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(shown) + rest)


def dot_login_browser(agent_env: AgentEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """`compozy login --no-browser`; the person signs in on Django's page and authorizes."""
    proc = subprocess.Popen([*CLI, "login", "--no-browser", *args], env=agent_env.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        assert proc.stderr is not None
        shown = []
        for line in proc.stderr:
            shown.append(line)
            if line.startswith("  http"):
                callback = complete_browser_login(line.strip())
                shown.append(f"[callback page {httpx.get(callback, timeout=30).status_code}]\n")
                break
        stdout, rest = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(shown) + rest)


def stored_refresh_tokens(agent_env: AgentEnv) -> list[str]:
    """The refresh tokens in the opt-in plaintext store (``storage: file``)."""
    document = json.loads((agent_env.state_dir / "secrets.json").read_text())
    return [value for key, value in document.items() if key.endswith(":refresh_token")]


@pytest.fixture
def dot_logged_in(agent_env: AgentEnv, dot_provider: DotProvider) -> Iterator[AgentProcess]:
    configure_dot(agent_env, dot_provider, storage="file")
    agent = start_agent(agent_env)
    try:
        result = dot_login_browser(agent_env)
        assert result.returncode == 0, result.stderr + agent.log()
        yield agent
    finally:
        agent.stop()


def test_dot_browser_login_then_token_works_at_userinfo(
    dot_logged_in: AgentProcess, dot_provider: DotProvider
) -> None:
    env = dot_logged_in.agent_env
    document = status(env)
    assert document["authenticated"] is True
    assert document["session"]["issuer"] == dot_provider.issuer
    assert document["session"]["account"] == ALICE
    assert dot_provider.userinfo_status(token(env)) == 200


@pytest.mark.browser
def test_dot_browser_login_completed_in_headless_chromium(
    agent_env: AgentEnv, dot_provider: DotProvider, chromium: Any, tmp_path: Any
) -> None:
    """Django's login form, then DOT's consent page, in a real browser."""
    configure_dot(agent_env, dot_provider)
    opened = tmp_path / "opened-url"
    browser_command = tmp_path / "browser"
    browser_command.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}\n')
    browser_command.chmod(0o755)
    agent = start_agent(agent_env)
    try:
        proc = subprocess.Popen([*CLI, "login"],
                                env=agent_env.env(BROWSER=f"{browser_command} %s"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with reaped(proc):
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("  http"):
                    break
            chromium.open(opened.read_text())
            chromium.type("input[name=username]", "alice")
            chromium.type("input[name=password]", "test")
            chromium.click("#sign-in")
            chromium.wait_for_text("Application requires the following permissions")
            chromium.click("input[name=allow]")
            text = chromium.wait_for_text("You can close this tab")
            chromium.screenshot(str(tmp_path / "dot-logged-in.png"))
            assert "You are logged in to Compozy" in text
            _, rest = proc.communicate(timeout=60)
            assert proc.returncode == 0, rest + agent.log()
            assert f"Logged in to {dot_provider.issuer} as {ALICE}" in rest
        assert dot_provider.userinfo_status(token(agent_env)) == 200
    finally:
        agent.stop()


def test_dot_device_login_with_the_profiles_overrides(
    agent_env: AgentEnv, dot_provider: DotProvider
) -> None:
    configure_dot(agent_env, dot_provider, device_endpoint=False)
    agent = start_agent(agent_env)
    try:
        # Neither discovery document names the device endpoint: a clear message.
        refused = run_cli(agent_env, "login", "--device")
        assert refused.returncode == 1
        assert "device_authorization_endpoint in the profile" in refused.stderr
        configure_dot(agent_env, dot_provider)
        # The provider is shared with other tests: count this test's grants only.
        device_grants = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                         "status": 200, "id_token": False}
        before = dot_provider.count("token", **device_grants)
        result = dot_login_device(agent_env, login="bob")
        assert result.returncode == 0, result.stderr + agent.log()
        assert re.search(r"enter the code [0-9A-V]{8} exactly as shown", result.stderr)
        assert "or open:" not in result.stderr  # no verification_uri_complete
        # The device grant came without an ID token: the account is userinfo's sub.
        assert dot_provider.count("token", **device_grants) == before + 1
        assert status(agent_env)["session"]["account"] == "2"
        assert dot_provider.userinfo_status(token(agent_env)) == 200
        refreshed = run_cli(agent_env, "auth", "refresh")
        assert refreshed.returncode == 0, refreshed.stderr + agent.log()
        assert dot_provider.count("token", grant_type="refresh_token", status=200,
                                  client_id=DEVICE_CLIENT_ID) >= 1
        assert dot_provider.userinfo_status(token(agent_env)) == 200
    finally:
        agent.stop()


def test_dot_proactive_refresh_before_expiry(
    agent_env: AgentEnv, dot_provider_factory: DotProviderFactory
) -> None:
    provider = dot_provider_factory(access_token_ttl=4)
    configure_dot(agent_env, provider)
    agent = start_agent(agent_env)
    try:
        assert dot_login_browser(agent_env).returncode == 0, agent.log()
        # Nobody asks for a token: the agent refreshes ahead of expiry by itself.
        assert provider.wait_for("token", 2, grant_type="refresh_token", status=200,
                                 timeout=30), agent.log()
        assert "refresh token rotated" in agent.log()
        assert provider.count("token", grant_type="refresh_token", status=400) == 0
        assert provider.userinfo_status(token(agent_env)) == 200
    finally:
        agent.stop()


@pytest.mark.real_keyring
def test_dot_session_survives_a_restart_from_the_keyring(
    agent_env: AgentEnv, dot_provider: DotProvider, secret_service: SecretService
) -> None:
    agent_env.extra.update(secret_service.env)
    configure_dot(agent_env, dot_provider, storage="keyring")
    agent = start_agent(agent_env)
    assert dot_login_browser(agent_env).returncode == 0, agent.log()
    token_id = status(agent_env)["session"]["token_id"]
    agent.stop(signal.SIGKILL)
    second = start_agent(agent_env)
    try:
        # The restarted agent holds no access token: it refreshes with the keyring's one.
        result = run_cli(agent_env, "auth", "refresh")
        assert result.returncode == 0, result.stderr + second.log()
        assert status(agent_env)["session"]["token_id"] == token_id
        assert dot_provider.userinfo_status(token(agent_env)) == 200
        # The keyring is shared by the test run: leave nothing in it for other tests.
        assert run_cli(agent_env, "logout").returncode == 0
        assert not [item for item in secret_service.items()
                    if item[0].get("username") == f"{token_id}:refresh_token"]
    finally:
        second.stop()


def test_dot_logout_revokes_at_the_provider(
    dot_logged_in: AgentProcess, dot_provider: DotProvider
) -> None:
    env = dot_logged_in.agent_env
    access = token(env)
    (refresh,) = stored_refresh_tokens(env)
    result = run_cli(env, "logout")
    assert result.returncode == 0, result.stderr + dot_logged_in.log()
    assert "revoked at the provider and removed" in result.stderr
    assert status(env)["authenticated"] is False
    assert dot_provider.userinfo_status(access) == 401
    assert not dot_provider.refresh_works(refresh)


def test_dot_revoke_all_revokes_every_session_at_the_provider(
    agent_env: AgentEnv, dot_provider: DotProvider
) -> None:
    configure_dot(agent_env, dot_provider, "default", "staging", storage="file")
    agent = start_agent(agent_env)
    try:
        assert dot_login_browser(agent_env).returncode == 0, agent.log()
        assert dot_login_device(agent_env, "--profile", "staging").returncode == 0, agent.log()
        accesses = [token(agent_env), token(agent_env, "--profile", "staging")]
        refreshes = stored_refresh_tokens(agent_env)
        assert len(refreshes) == 2
        result = run_cli(agent_env, "auth", "revoke-all", "--yes")
        assert result.returncode == 0, result.stderr + agent.log()
        assert json.loads(run_cli(agent_env, "auth", "list", "--json").stdout) == {"sessions": []}
        assert [dot_provider.userinfo_status(a) for a in accesses] == [401, 401]
        assert not dot_provider.refresh_works(refreshes[0], CLIENT_ID)
        assert not dot_provider.refresh_works(refreshes[1], DEVICE_CLIENT_ID)
    finally:
        agent.stop()
