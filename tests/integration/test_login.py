"""Login, token use, refresh, revocation and restart, against the real OpenID provider.

Every test drives the real `compozy` CLI and a real agent process; the person
at the browser is played by plain HTTP following the provider's own pages.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from compozy_agent.oidc import decode_jwt_claims
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.keyring_fixture import SecretService
from support.login import CLI, configure, login_browser, login_device, reaped
from support.provider import OidcTestProvider, approve_device

pytestmark = pytest.mark.real_provider

def status(agent_env: AgentEnv, *args: str) -> dict[str, Any]:
    result = run_cli(agent_env, "auth", "status", "--json", *args)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@pytest.fixture
def logged_in(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[AgentProcess]:
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        result = login_browser(agent_env)  # no polling interval to wait out, unlike --device
        assert result.returncode == 0, result.stderr + agent.log()
        yield agent
    finally:
        agent.stop()


def test_device_login_then_token_status_and_list(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    env = logged_in.agent_env
    document = status(env)
    assert document["authenticated"] is True
    assert document["session"]["account"] == "alice@example.test"
    assert document["session"]["issuer"] == oidc_provider.issuer
    assert document["credential_source"]["type"] == "agent"
    token = run_cli(env, "auth", "token")
    assert token.returncode == 0 and token.stderr == ""
    assert len(token.stdout.strip()) > 20 and token.stdout.count("\n") == 1
    assert run_cli(env, "auth", "token").stdout == token.stdout  # cached, not refreshed
    shown = json.loads(run_cli(env, "auth", "token", "--json").stdout)
    assert shown["token_type"] == "Bearer" and shown["access_token"] == token.stdout.strip()
    assert "token_type" not in document["session"]  # Bearer: the default is left out
    listed = json.loads(run_cli(env, "auth", "list", "--json").stdout)["sessions"]
    assert [s["account"] for s in listed] == ["alice@example.test"]
    assert "access_token" not in json.dumps(listed)


def test_login_prints_who_and_where(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> None:
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        result = login_device(agent_env)
        assert result.returncode == 0
        assert (
            f"Logged in to {oidc_provider.issuer} as alice@example.test (profile default)"
            in result.stderr
        )
        assert "enter the code" in result.stderr
        assert result.stdout == ""
    finally:
        agent.stop()


def test_browser_login_with_pkce_on_a_loopback_redirect(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        result = login_browser(agent_env)
        assert result.returncode == 0, result.stderr + agent.log()
        assert "[callback page 200]" in result.stderr
        url = next(line for line in result.stderr.splitlines() if line.startswith("  http"))
        assert "code_challenge_method=S256" in url and "state=" in url
        assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
        assert status(agent_env)["session"]["account"] == "alice@example.test"
    finally:
        agent.stop()


def test_denied_logins_fail_clearly(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> None:
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        browser = login_browser(agent_env, deny=True)
        assert browser.returncode == 1
        assert "access_denied" in browser.stderr
        device = login_device(agent_env, deny=True)
        assert device.returncode == 1
        assert "denied" in device.stderr
        assert status(agent_env)["authenticated"] is False
    finally:
        agent.stop()


def test_refresh_rotates_and_keeps_working(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    env = logged_in.agent_env
    # The provider serves the whole session: count only what this test causes.
    before = oidc_provider.count("token", grant_type="refresh_token", status=200)
    rejected_before = oidc_provider.count("token", grant_type="refresh_token", status=400)
    first = run_cli(env, "auth", "token").stdout
    # Each spends the refresh token the previous one rotated: a forced refresh of the
    # default token, then the first tokens of two narrower slots. A second forced refresh
    # right after the first is answered with that one's token (forced refreshes are
    # RECENT seconds apart, issue 10 item 8; the timing is tested on the fake clock).
    api = oidc_provider.api
    for args in (["auth", "refresh"], ["auth", "refresh"], ["auth", "token", "--audience", api],
                 ["auth", "token", "--audience", api, "--scope", "compozy:read"]):
        result = run_cli(env, *args)
        assert result.returncode == 0, result.stderr
        if args[1] == "refresh":
            assert "Refreshed session" in result.stderr
    assert oidc_provider.count("token", grant_type="refresh_token", status=200) == before + 3
    rejected = oidc_provider.count("token", grant_type="refresh_token", status=400)
    assert rejected == rejected_before
    assert run_cli(env, "auth", "token").stdout != first


def test_many_callers_rejecting_one_token_cause_one_refresh(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    """Single flight: 40 concurrent callers whose token got a 401 share one refresh."""
    code = (
        "import sys, threading\n"
        "from compozy_client import get_token\n"
        "old = get_token()\n"
        "barrier = threading.Barrier(40)\n"
        "results = []\n"
        "def ask():\n"
        "    barrier.wait()\n"
        "    results.append(get_token(rejected_token=old))\n"
        "threads = [threading.Thread(target=ask) for _ in range(40)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert len(results) == 40 and len(set(results)) == 1 and old not in results\n"
    )
    before = oidc_provider.count("token", grant_type="refresh_token")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=logged_in.agent_env.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert oidc_provider.count("token", grant_type="refresh_token") == before + 1


def test_rejected_token_is_replaced_once(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    code = (
        "from compozy_client import get_token\n"
        "old = get_token()\n"
        "new = get_token(rejected_token=old)\n"
        "again = get_token(rejected_token=old)\n"
        "assert new != old and again == new, 'a 401 must cause exactly one new token'\n"
    )
    before = oidc_provider.count("token", grant_type="refresh_token")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=logged_in.agent_env.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert oidc_provider.count("token", grant_type="refresh_token") == before + 1


def test_narrower_token_for_an_api(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    env = logged_in.agent_env
    result = run_cli(
        env, "auth", "token", "--audience", oidc_provider.api, "--scope", "compozy:read"
    )
    assert result.returncode == 0, result.stderr + logged_in.log()
    claims = decode_jwt_claims(result.stdout.strip())
    assert claims["aud"] == oidc_provider.api
    assert claims["scope"] == "compozy:read"
    again = run_cli(
        env, "auth", "token", "--audience", oidc_provider.api, "--scope", "compozy:read"
    )
    assert again.stdout == result.stdout  # cached
    default = run_cli(env, "auth", "token").stdout
    assert default != result.stdout
    # The provider rotates refresh tokens, so the default token's refresh superseded the
    # narrower one (lifecycle rule 13: some providers revoke it then); asked again, it is
    # fetched again, with the same narrower claims.
    refetched = run_cli(
        env, "auth", "token", "--audience", oidc_provider.api, "--scope", "compozy:read"
    )
    assert refetched.returncode == 0, refetched.stderr
    assert refetched.stdout != result.stdout
    claims = decode_jwt_claims(refetched.stdout.strip())
    assert claims["aud"] == oidc_provider.api and claims["scope"] == "compozy:read"


def test_revoke_unknown_then_known(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    env = logged_in.agent_env
    unknown = run_cli(env, "auth", "revoke", "nope1234")
    assert unknown.returncode == 1 and "no session has token id" in unknown.stderr
    token_id = status(env)["session"]["token_id"]
    revoked_before = oidc_provider.count("revocation", status=200)
    result = run_cli(env, "auth", "revoke", token_id)
    assert result.returncode == 0, result.stderr
    assert f"Session {token_id}: revoked at the provider and removed" in result.stderr
    assert oidc_provider.count("revocation", status=200) >= revoked_before + 1
    assert status(env)["authenticated"] is False
    token = run_cli(env, "auth", "token")
    assert token.returncode == 1 and "compozy login" in token.stderr


def test_profiles_live_side_by_side_and_revoke_all(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider, "dev", "prod")
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env, "--profile", "dev", person="alice").returncode == 0
        assert login_device(agent_env, person="bob", COMPOZY_PROFILE="prod").returncode == 0
        sessions = json.loads(run_cli(agent_env, "auth", "list", "--json").stdout)["sessions"]
        assert {(s["profile"], s["account"]) for s in sessions} == {
            ("dev", "alice@example.test"),
            ("prod", "bob@example.test"),
        }
        dev = run_cli(agent_env, "auth", "token", "--profile", "dev").stdout
        prod = run_cli(agent_env, "auth", "token", COMPOZY_PROFILE="prod").stdout
        assert dev != prod
        assert run_cli(agent_env, "auth", "token").returncode == 1  # no default profile
        result = run_cli(agent_env, "auth", "revoke-all", "--yes")
        assert result.returncode == 0, result.stderr
        assert json.loads(run_cli(agent_env, "auth", "list", "--json").stdout) == {"sessions": []}
    finally:
        agent.stop()


def test_env_key_shadowing_a_login_is_reported(logged_in: AgentProcess) -> None:
    env = logged_in.agent_env
    result = run_cli(env, "auth", "status", FLYZT_API_KEY="ci-key")
    assert result.returncode == 0
    assert "Credential source: API key from FLYZT_API_KEY" in result.stdout
    assert "takes precedence over your login session" in result.stderr
    assert "unset FLYZT_API_KEY" in result.stderr
    assert run_cli(env, "auth", "token", FLYZT_API_KEY="ci-key").stdout == "ci-key\n"


def test_api_key_kept_by_the_agent(agent: AgentProcess) -> None:
    env = agent.agent_env
    stored = run_cli(env, "login", "--with-api-key", "--profile", "ci", input="sk-test-abc\n")
    assert stored.returncode == 0, stored.stderr
    assert "sk-test-abc" not in stored.stderr + stored.stdout
    assert run_cli(env, "auth", "token", "--profile", "ci").stdout == "sk-test-abc\n"
    listed = run_cli(env, "auth", "list").stdout
    assert "api_key" in listed and "sk-test-abc" not in listed


def test_logout_when_the_provider_is_unreachable_needs_force(
    agent_env: AgentEnv, oidc_provider_factory: Any
) -> None:
    provider = oidc_provider_factory()
    configure(agent_env, provider)
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0
        provider.stop()
        refused = run_cli(agent_env, "logout")
        assert refused.returncode == 1
        assert "could not be reached" in refused.stderr and "--force" in refused.stderr
        assert status(agent_env)["authenticated"] is True  # nothing lost
        forced = run_cli(agent_env, "logout", "--force")
        assert forced.returncode == 0, forced.stderr
        assert "was not revoked at the provider" in forced.stderr
        assert status(agent_env)["authenticated"] is False
    finally:
        agent.stop()


def test_invalid_grant_means_login_required(
    agent_env: AgentEnv, oidc_provider_factory: Any
) -> None:
    provider = oidc_provider_factory()
    configure(agent_env, provider)
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0
        # A provider that lost every grant (its storage is in memory) rejects the refresh token.
        provider.stop()
        fresh = oidc_provider_factory(port=provider.port)
        result = run_cli(agent_env, "auth", "refresh")
        assert result.returncode == 1
        assert "compozy login" in result.stderr
        assert fresh.count("token", grant_type="refresh_token", status=400) == 1
        document = status(agent_env)
        assert document["session"]["state"] == "login_required"
        token = run_cli(agent_env, "auth", "token")
        assert token.returncode == 1 and "run: compozy login" in token.stderr
        assert fresh.count("token", grant_type="refresh_token") == 1  # no retry storm
    finally:
        agent.stop()


def test_proactive_refresh_before_expiry(agent_env: AgentEnv, oidc_provider_factory: Any) -> None:
    provider = oidc_provider_factory(access_token_ttl=4)
    configure(agent_env, provider)
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0
        # Nobody asks for a token: the agent refreshes ahead of expiry by itself.
        assert provider.wait_for("token", 2, grant_type="refresh_token", status=200, timeout=30)
        assert "refresh token rotated" in agent.log()
    finally:
        agent.stop()


@pytest.mark.real_keyring
def test_sessions_survive_a_killed_agent_in_the_real_keyring(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, secret_service: SecretService
) -> None:
    agent_env.extra.update(secret_service.env)
    configure(agent_env, oidc_provider, storage="keyring")
    agent = start_agent(agent_env)
    assert login_device(agent_env).returncode == 0, agent.log()
    assert status(agent_env)["storage"]["backend"] == "keyring"
    token_id = status(agent_env)["session"]["token_id"]
    agent.stop(signal.SIGKILL)

    state = (agent_env.state_dir / "sessions.json").read_text()
    assert token_id in state and "alice@example.test" in state
    assert oct((agent_env.state_dir / "sessions.json").stat().st_mode & 0o777) == "0o600"
    items = [item for item in secret_service.items() if item[0].get("service") == "compozy-agent"]
    assert [item[0]["username"] for item in items] == [f"{token_id}:refresh_token"]
    secret = items[0][2].decode()
    assert secret not in state
    assert "alice" not in json.dumps([i[0] for i in items]) + items[0][1]

    second = start_agent(agent_env)
    try:
        result = run_cli(agent_env, "auth", "token")
        assert result.returncode == 0, result.stderr + second.log()
        assert status(agent_env)["session"]["token_id"] == token_id
        assert secret not in second.log()
    finally:
        second.stop()


def test_memory_storage_is_said_plainly(logged_in: AgentProcess) -> None:
    text = run_cli(logged_in.agent_env, "auth", "status").stdout
    assert "Storage: memory" in text and "sessions live in memory only" in text
    assert "Not saved: this session ends when the agent stops" in text


def test_no_token_in_the_agent_log(logged_in: AgentProcess) -> None:
    token = run_cli(logged_in.agent_env, "auth", "token").stdout.strip()
    run_cli(logged_in.agent_env, "auth", "refresh")
    new = run_cli(logged_in.agent_env, "auth", "token").stdout.strip()
    assert token not in logged_in.log() and new not in logged_in.log()


@pytest.mark.browser
def test_browser_login_completed_in_headless_chromium(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, chromium: Any, tmp_path: Any
) -> None:
    """`compozy login` opens "the default browser" ($BROWSER) on its private launch page;
    a real Chromium follows it to the provider and completes the login."""
    configure(agent_env, oidc_provider)
    opened = tmp_path / "opened-url"
    browser_command = tmp_path / "browser"
    browser_command.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}\n')
    browser_command.chmod(0o755)
    agent = start_agent(agent_env)
    try:
        proc = subprocess.Popen(
            [*CLI, "login"],
            env=agent_env.env(BROWSER=f"{browser_command} %s"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with reaped(proc):
            assert proc.stderr is not None
            shown = []
            for line in proc.stderr:
                shown.append(line)
                if line.startswith("  http"):
                    break
            assert "Opening your browser" in "".join(shown)
            launch_page = opened.read_text()  # what the CLI handed the browser command
            assert launch_page.startswith("file://") and "state=" not in launch_page
            chromium.open(launch_page)
            chromium.type("input[name=login]", "alice")
            chromium.type("input[name=password]", "test")
            chromium.click("button[type=submit]")
            chromium.wait_for_text("Authorize")
            chromium.click("button[type=submit]")
            text = chromium.wait_for_text("You can close this tab")
            chromium.screenshot(str(tmp_path / "logged-in.png"))
            assert "You are logged in to Compozy" in text
            assert chromium.url.startswith("http://127.0.0.1:") and "/callback?" in chromium.url
            _, rest = proc.communicate(timeout=60)
            assert proc.returncode == 0, rest + agent.log()
            assert f"Logged in to {oidc_provider.issuer} as alice@example.test" in rest
    finally:
        agent.stop()


def test_login_without_a_browser_uses_the_device_flow(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    """Over SSH or with no display, plain `compozy login` shows a code instead of failing."""
    configure(agent_env, oidc_provider)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        agent_env.extra[name] = ""
    agent_env.extra["SSH_CONNECTION"] = "10.0.0.1 50000 10.0.0.2 22"
    agent = start_agent(agent_env)
    try:
        proc = subprocess.Popen(
            [*CLI, "login"],
            env=agent_env.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with reaped(proc):
            assert proc.stderr is not None
            for line in proc.stderr:
                found = re.search(r"or open: (\S+)", line)
                if found:
                    approve_device(found.group(1))
                    break
            _, rest = proc.communicate(timeout=60)
            assert proc.returncode == 0, rest
            assert "Logged in to" in rest
            assert oidc_provider.count("device_authorization") >= 1
    finally:
        agent.stop()
