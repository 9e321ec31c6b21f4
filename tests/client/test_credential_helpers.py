"""The client side of the credential helpers: `compozy auth kube-token` and
`docker-credential-compozy`, against a socket standing in for the agent (what they
ask for, what they print), and the ExecCredential document itself.

The real kubectl and skopeo drive them in tests/integration/test_kubectl_plugin.py
and test_registry_helper.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compozy_client import kubetoken
from compozy_client.dockercred import MIN_VALID, NOT_FOUND, registry_host
from support.fake_agent import answering_socket

BIN = Path(__file__).resolve().parents[2] / "client" / "bin"
V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


class FakeAgent:
    """Answers token requests with ``tok-N`` (an hour left), or with ``error``; keeps
    every request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None
        self.extra_result: dict[str, Any] = {}
        self.expires_at = time.time() + 3600

    def answer(self, request: dict[str, Any]) -> bytes:
        self.requests.append(request)
        if self.error is not None:
            return json.dumps({"id": request["id"], "ok": False, "error": self.error}).encode() \
                + b"\n"
        result = {"access_token": f"tok-{len(self.requests)}", "token_type": "Bearer",
                  "expires_at": self.expires_at, **self.extra_result}
        return json.dumps({"id": request["id"], "ok": True, "result": result},
                          separators=(",", ":")).encode() + b"\n"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(str(tmp_path / "agent.sock"))
    with answering_socket(fake.path, fake.answer):
        yield fake


def env_for(agent: FakeAgent, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"COMPOZY_AGENT_SOCK": agent.path, "COMPOZY_AGENT_AUTOSTART": "0",
            "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "NO_COLOR": "1", **extra}


def docker(agent: FakeAgent, tmp_path: Path, action: str, stdin: str = "",
           **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BIN / "docker-credential-compozy"), action],
                          input=stdin, capture_output=True, text=True, timeout=30,
                          env=env_for(agent, tmp_path, **extra))


def kube_token(agent: FakeAgent, tmp_path: Path, *args: str,
               **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BIN / "compozy"), "auth", "kube-token", *args],
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env=env_for(agent, tmp_path, **extra))


def exec_info(api_version: str, interactive: bool = False) -> str:
    return json.dumps({"kind": "ExecCredential", "apiVersion": api_version,
                       "spec": {"interactive": interactive}}, separators=(",", ":"))


# ---------------------------------------------------------------- kube-token

@pytest.mark.parametrize("api_version", [V1, V1BETA1])
def test_kube_token_answers_the_api_version_asked_with_the_expiry_a_margin_early(
    agent: FakeAgent, tmp_path: Path, api_version: str
) -> None:
    result = kube_token(agent, tmp_path, "--profile", "work", "--audience",
                        "https://k8s.example", KUBERNETES_EXEC_INFO=exec_info(api_version))
    assert result.returncode == 0, result.stderr
    credential = json.loads(result.stdout)
    assert credential["apiVersion"] == api_version and credential["kind"] == "ExecCredential"
    assert credential["status"]["token"] == "tok-1"
    stamp = credential["status"]["expirationTimestamp"]
    assert stamp == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                  time.gmtime(agent.expires_at - kubetoken.EXPIRY_MARGIN))
    (request,) = agent.requests
    assert (request["op"], request["profile"], request["audience"]) == (
        "token", "work", "https://k8s.example")
    assert request["min_valid"] == kubetoken.MIN_VALID  # kubectl keeps it until the expiry


def test_kube_token_refuses_an_api_version_it_does_not_speak(
    agent: FakeAgent, tmp_path: Path
) -> None:
    result = kube_token(agent, tmp_path,
                        KUBERNETES_EXEC_INFO=exec_info("client.authentication.k8s.io/v1alpha1"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "v1alpha1" in result.stderr
    assert agent.requests == []


def test_exec_info_in_any_json_layout_is_understood() -> None:
    spaced = json.dumps({"apiVersion": V1BETA1, "kind": "ExecCredential",
                         "spec": {"interactive": True}}, indent=2)
    info = kubetoken.exec_info(spaced)
    assert not isinstance(info, str)
    assert (info.api_version, info.interactive) == (V1BETA1, True)
    assert kubetoken.exec_info("{not json") == \
        "compozy: KUBERNETES_EXEC_INFO is not a JSON ExecCredential"
    by_hand = kubetoken.exec_info("")
    assert not isinstance(by_hand, str) and by_hand.api_version == V1


def test_the_reported_expiry_keeps_a_margin_even_for_short_tokens() -> None:
    now = 1_000_000.0
    assert kubetoken.reported_expiry(now + 3600, now) == now + 3600 - kubetoken.EXPIRY_MARGIN
    assert kubetoken.reported_expiry(now + 30, now) == now + 15  # half of what is left
    assert kubetoken.reported_expiry(now - 5, now) == now - 5


def test_kube_token_with_an_api_key_reports_no_expiry(agent: FakeAgent, tmp_path: Path) -> None:
    result = kube_token(agent, tmp_path, FLYZT_API_KEY="key-from-ci")
    assert result.returncode == 0
    assert json.loads(result.stdout)["status"] == {"token": "key-from-ci"}
    assert agent.requests == []


@pytest.mark.parametrize("helper", ["kube-token", "docker get"])
def test_a_login_required_is_one_line_naming_compozy_login(
    agent: FakeAgent, tmp_path: Path, helper: str
) -> None:
    """Provider text in the agent's message cannot forge lines or drive the terminal."""
    agent.error = {"code": "login_required", "message": "needs a new login (\x1b[2Jgone\nx)",
                   "details": {"command": "compozy login --profile work"}}
    if helper == "kube-token":
        # Even where kubectl says the terminal is there: the plugin never logs in.
        result = kube_token(agent, tmp_path, "--profile", "work",
                            KUBERNETES_EXEC_INFO=exec_info(V1, interactive=True))
        lines = result.stderr
    else:
        result = docker(agent, tmp_path, "get", "registry.example", COMPOZY_PROFILE="work")
        lines = result.stdout
        assert result.stderr == result.stdout
    assert result.returncode == 1
    assert lines.count("\n") == 1 and "\x1b" not in lines
    assert lines.startswith("compozy: needs a new login (")
    assert lines.endswith("; run: compozy login --profile work\n")


def test_helpers_print_only_the_access_token(agent: FakeAgent, tmp_path: Path) -> None:
    """Whatever else an answer carries (a confused agent sending its refresh token)."""
    agent.extra_result = {"refresh_token": "rt-must-stay-in-the-agent",
                          "id_token": "id-must-stay-too"}
    outputs = [kube_token(agent, tmp_path), docker(agent, tmp_path, "get", "r.example")]
    for result in outputs:
        assert result.returncode == 0, result.stderr
        assert "must-stay" not in result.stdout + result.stderr


# ---------------------------------------------------------------- docker-credential-compozy

def test_docker_get_asks_for_a_token_valid_55_minutes(agent: FakeAgent, tmp_path: Path) -> None:
    result = docker(agent, tmp_path, "get", "https://registry.example:5000/v2/\n")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout) == {"ServerURL": "https://registry.example:5000/v2/",
                                         "Username": "compozy", "Secret": "tok-1"}
    (request,) = agent.requests
    assert request["min_valid"] == MIN_VALID == 3300 and request["profile"] == "default"


def test_docker_erase_reports_the_current_token_rejected_and_never_logs_out(
    agent: FakeAgent, tmp_path: Path
) -> None:
    result = docker(agent, tmp_path, "erase", "registry.example")
    assert result.returncode == 0 and result.stdout == ""
    first, second = agent.requests
    assert first["op"] == second["op"] == "token"
    assert "rejected_token" not in first and second["rejected_token"] == "tok-1"


def test_docker_store_answers_without_storing_or_asking(agent: FakeAgent, tmp_path: Path) -> None:
    stored = docker(agent, tmp_path, "store", json.dumps(
        {"ServerURL": "r.example", "Username": "u", "Secret": "s3cret-to-forget"}))
    assert (stored.returncode, stored.stdout, stored.stderr) == (0, "", "")
    assert agent.requests == []
    assert not any("s3cret" in p.read_text(errors="replace")
                   for p in tmp_path.rglob("*") if p.is_file())


def test_docker_answers_docker_credential_helpers_texts(agent: FakeAgent, tmp_path: Path) -> None:
    docker_dir = tmp_path / ".docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps(
        {"credsStore": "compozy", "credHelpers": {"registry.example": "compozy"}}))
    not_ours = docker(agent, tmp_path, "get", "https://index.docker.io/v1/")
    assert (not_ours.returncode, not_ours.stdout) == (1, NOT_FOUND + "\n")
    assert NOT_FOUND == "credentials not found in native keychain"  # what clients match
    missing = docker(agent, tmp_path, "get", "")
    assert (missing.returncode, missing.stdout) == (1, "no credentials server URL\n")
    listed = docker(agent, tmp_path, "list")
    assert json.loads(listed.stdout) == {"registry.example": "compozy"}
    version = docker(agent, tmp_path, "version")
    assert version.stdout.startswith("docker-credential-compozy ")
    unknown = docker(agent, tmp_path, "frobnicate")
    assert unknown.returncode == 1 and "usage:" in unknown.stderr
    assert agent.requests == []


@pytest.mark.parametrize(("url", "host"), [
    ("https://index.docker.io/v1/", "index.docker.io"),
    ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("Registry.Example/team", "registry.example"),
    ("http://[::1]:5000", "[::1]:5000"),
])
def test_registry_host_from_the_server_urls_clients_pass(url: str, host: str) -> None:
    assert registry_host(url) == host


def test_the_helpers_hot_paths_import_what_the_token_fast_path_does(
    agent: FakeAgent, tmp_path: Path
) -> None:
    """As light as `compozy auth token` (tests/client/test_imports.py): the whole
    process's imports, against an answering agent."""
    expensive = {"re", "enum", "typing", "json", "argparse", "socket", "msgspec", "yaml",
                 "pathlib", "subprocess", "compozy_client.cli"}
    for command in ([str(BIN / "compozy"), "auth", "kube-token"],
                    [str(BIN / "docker-credential-compozy"), "get"]):
        result = subprocess.run([sys.executable, "-X", "importtime", *command],
                                input="r.example", capture_output=True, text=True, timeout=30,
                                env=env_for(agent, tmp_path, KUBERNETES_EXEC_INFO=exec_info(V1)))
        assert result.returncode == 0 and "tok-" in result.stdout, result.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert imported & expensive == set(), command
        assert {"compozy_client.helpertoken", "_socket"} <= imported


# ---------------------------------------------------------------- compozy auth setup-docker

def setup_docker(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "docker"),
           "PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COMPOZY_AGENT_AUTOSTART": "0"}
    return subprocess.run([sys.executable, str(BIN / "compozy"), "auth", "setup-docker", *args],
                          capture_output=True, text=True, timeout=30, env=env)


def test_setup_docker_writes_only_its_registry_and_unset_removes_only_that(
    tmp_path: Path,
) -> None:
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    earlier = {"auths": {"r.example": {"auth": "dTpw"}}, "credHelpers": {"gcr.io": "gcloud"},
               "currentContext": "desktop"}
    config.write_text(json.dumps(earlier))
    config.chmod(0o644)
    done = setup_docker(tmp_path, "--registry", "https://Registry.Compozy.dev/")
    assert done.returncode == 0, done.stderr
    assert json.loads(config.read_text()) == {
        **earlier, "credHelpers": {"gcr.io": "gcloud", "registry.compozy.dev": "compozy"}}
    assert config.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in config.parent.iterdir()] == ["config.json"]  # no temporary left
    assert "not on PATH" in done.stderr  # PATH here holds no docker-credential-compozy
    undone = setup_docker(tmp_path, "--registry", "registry.compozy.dev", "--unset")
    assert undone.returncode == 0, undone.stderr
    assert json.loads(config.read_text()) == earlier


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"credHelpers": "compozy"}'])
def test_setup_docker_leaves_a_config_it_cannot_read_alone(tmp_path: Path, text: str) -> None:
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(text)
    done = setup_docker(tmp_path, "--registry", "registry.compozy.dev")
    assert done.returncode == 2 and "nothing was changed" in done.stderr
    assert done.stderr.count("\n") == 1
    assert config.read_text() == text


def test_setup_docker_creates_a_private_config(tmp_path: Path) -> None:
    done = setup_docker(tmp_path, "--registry", "127.0.0.1:5000")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "docker" / "config.json"
    assert json.loads(config.read_text()) == {"credHelpers": {"127.0.0.1:5000": "compozy"}}
    assert config.stat().st_mode & 0o777 == 0o600
    assert config.parent.stat().st_mode & 0o777 == 0o700


def test_setup_kube_options_for_new_and_old_kubectl() -> None:
    from compozy_client.commands.auth_setup_kube import exec_options

    new = exec_options("/opt/bin/compozy", "work", "https://k8s.example", interactive_mode=True)
    assert new == ["--exec-command=/opt/bin/compozy", f"--exec-api-version={V1}",
                   "--exec-arg=auth", "--exec-arg=kube-token", "--exec-arg=--profile",
                   "--exec-arg=work", "--exec-arg=--audience", "--exec-arg=https://k8s.example",
                   "--exec-interactive-mode=Never", "--exec-provide-cluster-info=true"]
    old = exec_options("compozy", None, None, interactive_mode=False)
    assert old == ["--exec-command=compozy", f"--exec-api-version={V1BETA1}",
                   "--exec-arg=auth", "--exec-arg=kube-token"]


def test_registry_rules_are_read_once_then_from_the_rules_cache_without_yaml(
    agent: FakeAgent, tmp_path: Path
) -> None:
    """The first `get` parses the config (YAML) and caches its rules beside the socket;
    later ones match the registry's host from the cache, importing no YAML or msgspec."""
    config = tmp_path / "config.yaml"
    config.write_text("rules:\n  - match: {host: 'registry.example:5000'}\n"
                      "    profile: ci\n    audience: https://registry.example\n")
    config.chmod(0o600)
    seen = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", str(BIN / "docker-credential-compozy"), "get"],
            input="https://registry.example:5000", capture_output=True, text=True, timeout=30,
            env=env_for(agent, tmp_path, COMPOZY_CONFIG=str(config)))
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
        seen.append({line.split("|")[-1].strip() for line in result.stderr.splitlines()
                     if line.startswith("import time:")})
    assert "yaml" in seen[0] and (tmp_path / "rules.cache").exists()
    assert not {"yaml", "msgspec", "json", "re"} & seen[1]
    for request in agent.requests:
        assert (request["profile"], request["audience"]) == ("ci", "https://registry.example")
    other = docker(agent, tmp_path, "get", "other.example", COMPOZY_CONFIG=str(config))
    assert other.returncode == 0 and agent.requests[-1]["profile"] == "default"
