"""The real kubectl gets its token through `compozy auth kube-token`, set up by
`compozy auth setup-kube`, from a real agent logged in at the real test provider.

The API server is a small HTTPS stand-in (tests/support/resource_servers.py)
with a certificate made for the test; it accepts a bearer token only when the
provider's introspection endpoint says it is active.
"""

from __future__ import annotations

import calendar
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.login import configure, login_browser
from support.provider import OidcTestProvider
from support.real_parts import require_tools
from support.resource_servers import KubeApiStandIn, self_signed_certificate, serving

pytestmark = pytest.mark.real_provider

BINDIR = Path(sys.executable).parent
CLUSTER = "stand-in"


@pytest.fixture
def kubectl() -> str:
    return require_tools(("kubectl",), "kubernetes-client",
                         "to run kubectl's exec credential plugin")[0]


@pytest.fixture
def browser_marker(agent_env: AgentEnv) -> Path:
    """A BROWSER that only leaves a mark: no test here may open one."""
    marker = agent_env.root / "browser-opened"
    script = agent_env.root / "browser"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n")
    script.chmod(0o755)
    agent_env.extra["BROWSER"] = str(script)
    return marker


@pytest.fixture
def api(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[KubeApiStandIn]:
    certificate, key = self_signed_certificate(agent_env.root)
    with serving(KubeApiStandIn(oidc_provider), tls=(certificate, key)) as server:
        assert isinstance(server, KubeApiStandIn)
        server.certificate = certificate
        yield server


def kube_env(agent_env: AgentEnv) -> dict[str, str]:
    return {"KUBECONFIG": str(agent_env.root / "kubeconfig"),
            "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"}


def kube(agent_env: AgentEnv, kubectl: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([kubectl, *args], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, env=agent_env.env(**kube_env(agent_env)))
    agent_env.outputs.append((f"kubectl {' '.join(args)}", result.stdout + result.stderr))
    return result


def set_up_cluster(agent_env: AgentEnv, kubectl: str, api: KubeApiStandIn) -> None:
    """The cluster entry, as an admin hands it out; then `compozy auth setup-kube`."""
    result = kube(agent_env, kubectl, "config", "set-cluster", CLUSTER,
                  f"--server=https://127.0.0.1:{api.port}",
                  f"--certificate-authority={api.certificate}")
    assert result.returncode == 0, result.stderr
    setup = run_cli(agent_env, "auth", "setup-kube", "--cluster", CLUSTER,
                    **kube_env(agent_env))
    assert setup.returncode == 0, setup.stderr


@pytest.fixture
def agent(agent_env: AgentEnv, oidc_provider: OidcTestProvider,
          browser_marker: Path) -> Iterator[AgentProcess]:
    configure(agent_env, oidc_provider)
    process = start_agent(agent_env)
    yield process
    process.stop()


def test_setup_kube_writes_an_exec_user_that_never_gets_the_terminal(
    agent_env: AgentEnv, agent: AgentProcess, kubectl: str, api: KubeApiStandIn
) -> None:
    set_up_cluster(agent_env, kubectl, api)
    view = kube(agent_env, kubectl, "config", "view", "-o", "json")
    config = json.loads(view.stdout)
    (user,) = config["users"]
    assert user["name"] == f"compozy-{CLUSTER}"
    plugin = user["user"]["exec"]
    assert plugin["apiVersion"] == "client.authentication.k8s.io/v1"
    assert plugin["interactiveMode"] == "Never"
    assert os.path.isabs(plugin["command"]) and plugin["command"].endswith("/compozy")
    assert plugin["args"] == ["auth", "kube-token"]
    assert plugin["provideClusterInfo"] is True  # the server URL, for rules:
    (context,) = config["contexts"]
    assert context["name"] == CLUSTER
    assert context["context"] == {"cluster": CLUSTER, "user": f"compozy-{CLUSTER}"}
    kubeconfig = Path(kube_env(agent_env)["KUBECONFIG"])
    assert stat.S_IMODE(kubeconfig.stat().st_mode) & 0o077 == 0  # kubectl writes it 0600


def test_kubectl_get_raw_api_authenticates_through_kube_token(
    agent_env: AgentEnv, agent: AgentProcess, kubectl: str, api: KubeApiStandIn,
    oidc_provider: OidcTestProvider, browser_marker: Path,
) -> None:
    login = login_browser(agent_env)
    assert login.returncode == 0, login.stderr
    set_up_cluster(agent_env, kubectl, api)
    result = kube(agent_env, kubectl, "--context", CLUSTER, "get", "--raw", "/api")
    assert result.returncode == 0, result.stderr + agent.log()
    assert json.loads(result.stdout)["kind"] == "APIVersions"
    assert api.seen.accepted == 1 and api.seen.refused == 0, api.seen.refusals
    assert not browser_marker.exists()


def revoke_the_grant(agent_env: AgentEnv, provider: OidcTestProvider) -> None:
    """Revoke the session's grant at the provider (revoking an access token there revokes
    its whole grant), then let the agent find out by refreshing: login_required."""
    token = run_cli(agent_env, "auth", "token")
    assert token.returncode == 0, token.stderr
    revoked = httpx.post(provider.revocation_endpoint, timeout=30, data={
        "client_id": provider.client_id, "token": token.stdout.strip(),
        "token_type_hint": "access_token"})
    assert revoked.status_code == 200
    refresh = run_cli(agent_env, "auth", "refresh")
    assert refresh.returncode != 0
    status = run_cli(agent_env, "auth", "status", "--json")
    assert '"login_required"' in status.stdout, status.stdout


@pytest.mark.parametrize("session", ["never logged in", "refresh token revoked"])
def test_kubectl_fails_fast_naming_compozy_login_and_opens_no_browser(
    agent_env: AgentEnv, agent: AgentProcess, kubectl: str, api: KubeApiStandIn,
    oidc_provider: OidcTestProvider, browser_marker: Path, session: str,
) -> None:
    """interactiveMode Never (kubectl says ``interactive: false``), stdin not a terminal."""
    if session == "refresh token revoked":
        login = login_browser(agent_env)
        assert login.returncode == 0, login.stderr
        revoke_the_grant(agent_env, oidc_provider)
    set_up_cluster(agent_env, kubectl, api)
    started = time.monotonic()
    result = kube(agent_env, kubectl, "--context", CLUSTER, "get", "--raw", "/api")
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    # One line per run of the plugin (kubectl may run it again before giving up).
    plugin_lines = {line for line in result.stderr.splitlines() if line.startswith("compozy:")}
    assert len(plugin_lines) == 1, result.stderr
    (line,) = plugin_lines
    assert line.endswith("; run: compozy login"), line
    assert elapsed < 15, elapsed  # no login was waited for
    assert api.seen.accepted == 0
    assert not browser_marker.exists()


def test_kube_token_answers_in_the_api_version_kubectl_asks_for(
    agent_env: AgentEnv, agent: AgentProcess, browser_marker: Path,
) -> None:
    """v1beta1 for an older kubectl, v1 otherwise; the expiry a margin before the real one."""
    login = login_browser(agent_env)
    assert login.returncode == 0, login.stderr
    launcher = str(BINDIR / "compozy")
    for version in ("client.authentication.k8s.io/v1beta1", "client.authentication.k8s.io/v1"):
        info = json.dumps({"kind": "ExecCredential", "apiVersion": version,
                           "spec": {"interactive": False}}, separators=(",", ":"))
        result = subprocess.run([launcher, "auth", "kube-token"], capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL,
                                env=agent_env.env(KUBERNETES_EXEC_INFO=info))
        assert result.returncode == 0, result.stderr
        credential = json.loads(result.stdout)
        assert credential["apiVersion"] == version and credential["kind"] == "ExecCredential"
        status = json.loads(run_cli(agent_env, "auth", "status", "--json").stdout)
        expires_at = status["session"]["expires_at"]
        reported = calendar.timegm(time.strptime(credential["status"]["expirationTimestamp"],
                                                 "%Y-%m-%dT%H:%M:%SZ"))
        assert expires_at - 61 <= reported <= expires_at - 59


def test_a_rule_for_the_cluster_url_picks_the_profile(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, kubectl: str, api: KubeApiStandIn,
    browser_marker: Path,
) -> None:
    """Only profile ``ops`` is signed in; a ``url_prefix`` rule for the cluster's server
    sends kubectl there, with no --profile in the kubeconfig."""
    configure(agent_env, oidc_provider, "default", "ops")
    with agent_env.config.open("a") as config:
        config.write(f"rules:\n  - match: {{url_prefix: 'https://127.0.0.1:{api.port}'}}\n"
                     "    profile: ops\n")
    process = start_agent(agent_env)
    try:
        login = login_browser(agent_env, "--profile", "ops")
        assert login.returncode == 0, login.stderr
        set_up_cluster(agent_env, kubectl, api)
        result = kube(agent_env, kubectl, "--context", CLUSTER, "get", "--raw", "/api")
        assert result.returncode == 0, result.stderr + process.log()
        assert api.seen.accepted == 1
    finally:
        process.stop()


def test_setup_kube_for_a_cluster_not_in_the_kubeconfig_changes_nothing(
    agent_env: AgentEnv, kubectl: str, api: KubeApiStandIn,
) -> None:
    result = kube(agent_env, kubectl, "config", "set-cluster", CLUSTER,
                  f"--server=https://127.0.0.1:{api.port}")
    assert result.returncode == 0, result.stderr
    before = Path(kube_env(agent_env)["KUBECONFIG"]).read_text()
    setup = run_cli(agent_env, "auth", "setup-kube", "--cluster", "typo",
                    **kube_env(agent_env))
    assert setup.returncode == 2
    assert f"no cluster 'typo' in the kubeconfig (it has: {CLUSTER})" in setup.stderr
    assert Path(kube_env(agent_env)["KUBECONFIG"]).read_text() == before


def test_kubectl_with_a_v1beta1_exec_entry_gets_a_v1beta1_credential(
    agent_env: AgentEnv, agent: AgentProcess, kubectl: str, api: KubeApiStandIn,
) -> None:
    """An exec entry written for an older kubectl (v1beta1, no interactiveMode): kubectl
    asks for v1beta1 and accepts the answer."""
    login = login_browser(agent_env)
    assert login.returncode == 0, login.stderr
    set_up_cluster(agent_env, kubectl, api)
    rewrite = kube(agent_env, kubectl, "config", "set-credentials", f"compozy-{CLUSTER}",
                   "--exec-api-version=client.authentication.k8s.io/v1beta1")
    assert rewrite.returncode == 0, rewrite.stderr
    plugin = json.loads(kube(agent_env, kubectl, "config", "view", "-o", "json").stdout)[
        "users"][0]["user"]["exec"]
    assert plugin["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    result = kube(agent_env, kubectl, "--context", CLUSTER, "get", "--raw", "/api")
    assert result.returncode == 0, result.stderr
    assert api.seen.accepted == 1
