"""A real registry client (skopeo) reads ``credHelpers`` written by `compozy auth
setup-docker` and authenticates through `docker-credential-compozy`, from a real
agent logged in at the real test provider.

The registry is a small stand-in (tests/support/resource_servers.py) speaking
just enough of the Docker registry v2 API for ``skopeo inspect``, behind basic
auth whose password must be a token the provider's introspection calls active.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compozy_client.dockercred import MIN_VALID, NOT_FOUND, USERNAME
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.login import configure, login_browser
from support.provider import OidcTestProvider
from support.real_parts import require_tools
from support.resource_servers import (
    MANIFEST_DIGEST,
    RegistryStandIn,
    active_at_provider,
    serving,
)

pytestmark = pytest.mark.real_provider

BINDIR = Path(sys.executable).parent
HELPER = str(BINDIR / "docker-credential-compozy")
#: What was in the person's Docker config before setup-docker: it must all stay.
EARLIER_CONFIG = {
    "auths": {"other.example": {"auth": "dXNlcjpwYXNz"}},
    "credHelpers": {"gcr.io": "gcloud"},
    "psFormat": "table {{.ID}}",
}


@pytest.fixture
def skopeo() -> str:
    return require_tools(("skopeo",), "skopeo", "to pull through the registry helper")[0]


@pytest.fixture
def registry(oidc_provider: OidcTestProvider) -> Iterator[RegistryStandIn]:
    with serving(RegistryStandIn(oidc_provider)) as server:
        assert isinstance(server, RegistryStandIn)
        yield server


@pytest.fixture
def logged_in(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[AgentProcess]:
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        result = login_browser(agent_env)
        assert result.returncode == 0, result.stderr + agent.log()
        yield agent
    finally:
        agent.stop()


def tool_env(agent_env: AgentEnv) -> dict[str, str]:
    """skopeo's environment: our bin directory on PATH, no other auth file in the way."""
    return agent_env.env(PATH=f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}",
                         REGISTRY_AUTH_FILE="", DOCKER_CONFIG="")


def docker_config(agent_env: AgentEnv) -> Path:
    return agent_env.home / ".docker" / "config.json"


def inspect(agent_env: AgentEnv, skopeo: str, registry: RegistryStandIn
            ) -> subprocess.CompletedProcess[str]:
    image = f"docker://127.0.0.1:{registry.port}/{registry.REPOSITORY}:{registry.TAG}"
    env = {k: v for k, v in tool_env(agent_env).items()
           if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    result = subprocess.run([skopeo, "inspect", "--tls-verify=false", image],
                            capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env=env)
    agent_env.outputs.append(("skopeo inspect", result.stdout + result.stderr))
    return result


def helper(agent_env: AgentEnv, action: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELPER, action], input=stdin, capture_output=True, text=True,
                          timeout=60, env=tool_env(agent_env))


def set_up(agent_env: AgentEnv, registry: RegistryStandIn) -> str:
    host = f"127.0.0.1:{registry.port}"
    path = docker_config(agent_env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(EARLIER_CONFIG))
    setup = run_cli(agent_env, "auth", "setup-docker", "--registry", host,
                    **{"PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert setup.returncode == 0, setup.stderr
    return host


def test_skopeo_inspects_an_image_with_a_password_from_the_agent(
    agent_env: AgentEnv, logged_in: AgentProcess, skopeo: str, registry: RegistryStandIn,
) -> None:
    host = set_up(agent_env, registry)
    written = json.loads(docker_config(agent_env).read_text())
    assert written == {**EARLIER_CONFIG,
                       "credHelpers": {"gcr.io": "gcloud", host: "compozy"}}
    assert stat.S_IMODE(docker_config(agent_env).stat().st_mode) == 0o600
    result = inspect(agent_env, skopeo, registry)
    assert result.returncode == 0, result.stderr + logged_in.log()
    assert json.loads(result.stdout)["Digest"] == MANIFEST_DIGEST
    assert registry.seen.accepted >= 1 and registry.seen.usernames == {USERNAME}


def test_get_hands_out_an_access_token_valid_55_minutes_never_an_identity_token(
    agent_env: AgentEnv, logged_in: AgentProcess, registry: RegistryStandIn,
) -> None:
    host = set_up(agent_env, registry)
    result = helper(agent_env, "get", host + "\n")
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"ServerURL", "Username", "Secret"}
    # "<token>" as the username would make Docker keep the secret as an identity token.
    assert answer["ServerURL"] == host and answer["Username"] == USERNAME != "<token>"
    assert active_at_provider(registry.provider, answer["Secret"])
    status = json.loads(run_cli(agent_env, "auth", "status", "--json").stdout)
    # The provider's tokens live an hour; the helper asked for MIN_VALID (the request
    # itself: tests/client/test_credential_helpers.py).
    assert status["session"]["expires_at"] - time.time() >= MIN_VALID


def test_store_keeps_nothing_and_erase_makes_the_next_get_a_new_token(
    agent_env: AgentEnv, logged_in: AgentProcess, registry: RegistryStandIn,
    oidc_provider: OidcTestProvider,
) -> None:
    host = set_up(agent_env, registry)
    before = json.loads(helper(agent_env, "get", host).stdout)["Secret"]
    stored = helper(agent_env, "store", json.dumps(
        {"ServerURL": host, "Username": "someone", "Secret": "a-password-to-forget"}))
    assert stored.returncode == 0 and stored.stdout == ""
    assert "a-password-to-forget" not in docker_config(agent_env).read_text()
    refreshes = oidc_provider.count_token_calls("refresh_token")
    erased = helper(agent_env, "erase", host)
    assert erased.returncode == 0, erased.stdout + erased.stderr
    after = json.loads(helper(agent_env, "get", host).stdout)["Secret"]
    assert after != before
    assert oidc_provider.count_token_calls("refresh_token") == refreshes + 1
    status = run_cli(agent_env, "auth", "status", "--json")
    assert json.loads(status.stdout)["authenticated"] is True  # erase never logs out
    listed = helper(agent_env, "list", "")
    assert json.loads(listed.stdout) == {host: USERNAME}


def test_without_a_session_skopeo_fails_with_one_line_naming_compozy_login(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, skopeo: str,
    registry: RegistryStandIn,
) -> None:
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        host = set_up(agent_env, registry)
        got = helper(agent_env, "get", host)
        assert got.returncode == 1
        assert got.stdout == "compozy: not logged in (profile 'default'); run: compozy login\n"
        result = inspect(agent_env, skopeo, registry)
        assert result.returncode != 0
        assert "run: compozy login" in result.stderr, result.stderr
        assert registry.seen.accepted == 0
    finally:
        agent.stop()


def test_as_the_default_store_it_answers_not_found_for_other_registries(
    agent_env: AgentEnv, logged_in: AgentProcess, registry: RegistryStandIn,
) -> None:
    """``credsStore: compozy`` sends every registry here: only credHelpers' are ours."""
    host = set_up(agent_env, registry)
    document = json.loads(docker_config(agent_env).read_text())
    docker_config(agent_env).write_text(json.dumps({**document, "credsStore": "compozy"}))
    other = helper(agent_env, "get", "https://index.docker.io/v1/")
    assert (other.returncode, other.stdout) == (1, NOT_FOUND + "\n")
    ours = helper(agent_env, "get", host)
    assert ours.returncode == 0 and json.loads(ours.stdout)["ServerURL"] == host


def test_a_rule_for_the_registry_host_picks_the_profile(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, skopeo: str,
    registry: RegistryStandIn,
) -> None:
    """Only profile ``ci`` is signed in; a ``host`` rule sends the registry's requests there."""
    configure(agent_env, oidc_provider, "default", "ci")
    with agent_env.config.open("a") as config:
        config.write(f"rules:\n  - match: {{host: '127.0.0.1:{registry.port}'}}\n"
                     "    profile: ci\n")
    agent = start_agent(agent_env)
    try:
        login = login_browser(agent_env, "--profile", "ci")
        assert login.returncode == 0, login.stderr
        set_up(agent_env, registry)
        result = inspect(agent_env, skopeo, registry)
        assert result.returncode == 0, result.stderr + agent.log()
        assert registry.seen.accepted >= 1
    finally:
        agent.stop()


def test_skopeo_logout_makes_the_next_pull_use_a_new_token_and_keeps_the_session(
    agent_env: AgentEnv, logged_in: AgentProcess, skopeo: str, registry: RegistryStandIn,
    oidc_provider: OidcTestProvider,
) -> None:
    host = set_up(agent_env, registry)
    assert inspect(agent_env, skopeo, registry).returncode == 0
    refreshes = oidc_provider.count_token_calls("refresh_token")
    env = {k: v for k, v in tool_env(agent_env).items()
           if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    # skopeo writes its own auth file unless told; --authfile names the Docker config.
    logout = subprocess.run(
        [skopeo, "logout", "--authfile", str(docker_config(agent_env)), host],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert logout.returncode == 0, logout.stderr
    assert oidc_provider.count_token_calls("refresh_token") == refreshes + 1
    assert inspect(agent_env, skopeo, registry).returncode == 0
    first, *_, last = registry.seen.token_digests
    assert first != last
    assert json.loads(docker_config(agent_env).read_text())["credHelpers"][host] == "compozy"
    status = run_cli(agent_env, "auth", "status", "--json")
    assert json.loads(status.stdout)["authenticated"] is True
