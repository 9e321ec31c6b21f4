"""Every command validates the config file the same way before doing anything (issue 12,
item 4): a file with an unknown key stops each of them with the same error and exit 1,
and nothing reaches the agent (no login started, no token handed out).

The fast path of `compozy auth token` cannot parse YAML cheaply; it goes ahead only
with a file the full CLI validated (compozy_client.configcheck), which these tests
check too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compozy_client.cli import build_parser
from compozy_client.configcheck import RECORD_NAME, was_checked
from support.fake_agent import answering_socket

NOBODY = 65534
LAUNCHER = Path(__file__).resolve().parents[2] / "client" / "bin" / "compozy"
TYPO = "profiles:\n  default:\n    issuer: https://auth.example\n    scops: [openid]\n"
VALID = "profiles:\n  default:\n    issuer: https://auth.example\n    scopes: [openid]\n"

#: Every command, as a person would run it (argv after `compozy`).
COMMANDS: dict[str, list[str]] = {
    "login": ["login", "--no-browser"],
    "login --device": ["login", "--device"],
    "login --with-api-key": ["login", "--with-api-key"],
    "logout": ["logout"],
    "auth status": ["auth", "status"],
    "auth status --json": ["auth", "status", "--json"],
    "auth list": ["auth", "list"],
    "auth refresh": ["auth", "refresh"],
    "auth revoke": ["auth", "revoke", "3f9a1c2e"],
    "auth revoke-all": ["auth", "revoke-all", "--yes"],
    "auth lock": ["auth", "lock", "--passphrase-stdin"],
    "auth unlock": ["auth", "unlock", "--passphrase-stdin"],
    "auth log": ["auth", "log"],
    "auth token": ["auth", "token"],
    "auth token --scope": ["auth", "token", "--scope", "openid"],
    "auth token --force-new": ["auth", "token", "--force-new"],
    "completion": ["completion", "bash"],
    "auth setup-git": ["auth", "setup-git", "--host", "git.example.com"],
    "exec": ["exec", "--", "/bin/true"],
    "auth kube-token": ["auth", "kube-token"],
    "auth setup-kube": ["auth", "setup-kube", "--cluster", "dev"],
    "auth setup-docker": ["auth", "setup-docker", "--registry", "registry.example.com"],
    "auth dpop-proof": ["auth", "dpop-proof", "--method", "GET", "--url",
                        "https://api.example.com/v1/me"],
}


def parser_commands() -> set[str]:
    """The command names the parser knows (`login`, `auth status`, ...)."""
    names: set[str] = set()

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    full = f"{prefix}{name}"
                    before = len(names)
                    walk(sub, full + " ")
                    if len(names) == before:
                        names.add(full)

    walk(build_parser(), "")
    return names


def test_the_list_covers_every_command() -> None:
    covered = {" ".join(word for word in name.split() if not word.startswith("-"))
               for name in COMMANDS}
    assert parser_commands() <= covered


class RecordingAgent:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def answer(self, request: dict[str, Any]) -> bytes:
        self.requests.append(request)
        return (json.dumps({"id": request.get("id", 0), "ok": True,
                            "result": {"access_token": "tok-123"}}) + "\n").encode()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[RecordingAgent, str]]:
    recording = RecordingAgent()
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    with answering_socket(str(socket_dir / "agent.sock"), recording.answer) as path:
        yield recording, path


def run(
    tmp_path: Path, socket: str, argv: list[str], **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {"COMPOZY_AGENT_SOCK": socket, "COMPOZY_CONFIG": str(tmp_path / "config.yaml"),
                   "COMPOZY_AGENT_AUTOSTART": "0", "HOME": str(tmp_path), "PATH": "/usr/bin",
                   "NO_COLOR": "1", **env}
    return subprocess.run([sys.executable, str(LAUNCHER), *argv], env=environment,
                          input="secret-passphrase\n", capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_config_with_an_unknown_key_stops_every_command_alike(
    tmp_path: Path, agent: tuple[RecordingAgent, str], argv: list[str],
) -> None:
    recording, socket = agent
    config = tmp_path / "config.yaml"
    config.write_text(TYPO)
    config.chmod(0o600)
    result = run(tmp_path, socket, argv)
    assert result.returncode == 1, (argv, result.stderr)
    assert result.stdout == ""
    expected = (f"config file {config}: Object contains unknown field `scops` - at "
                "`$.profiles[...]`\n")
    # kubectl's plugin prefixes its messages with its name, as it does every error.
    prefix = "compozy: " if argv[:2] == ["auth", "kube-token"] else "error: "
    assert result.stderr == prefix + expected
    assert recording.requests == []  # nothing done: no login started, no token asked for
    assert config.read_text() == TYPO  # and the file is left as it was
    assert not (tmp_path / ".gitconfig").exists()  # no credential helper set up


def test_the_environment_key_does_not_skip_the_check(
    tmp_path: Path, agent: tuple[RecordingAgent, str],
) -> None:
    recording, socket = agent
    (tmp_path / "config.yaml").write_text(TYPO)
    result = run(tmp_path, socket, ["auth", "token"], FLYZT_API_KEY="env-key")
    assert result.returncode == 1 and result.stdout == ""
    assert "unknown field `scops`" in result.stderr
    assert recording.requests == []


def test_the_fast_path_goes_ahead_only_with_the_file_the_full_cli_validated(
    tmp_path: Path, agent: tuple[RecordingAgent, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A valid file is recorded by the first command; a later edit that breaks it is caught
    by `compozy auth token` at once, though the fast path parses no YAML."""
    recording, socket = agent
    config = tmp_path / "config.yaml"
    config.write_text(VALID)
    assert run(tmp_path, socket, ["auth", "token"]).stdout == "tok-123\n"
    monkeypatch.setenv("COMPOZY_AGENT_SOCK", socket)
    assert was_checked(str(config), VALID.encode())
    assert len(recording.requests) == 1
    # The fast path itself answered, without YAML.
    fast = subprocess.run(
        [sys.executable, "-c", "import sys; from compozy_client import fasttoken; "
         "code = fasttoken.run([]); print(code, 'yaml' in sys.modules)"],
        env={"COMPOZY_AGENT_SOCK": socket, "COMPOZY_CONFIG": str(config), "HOME": str(tmp_path),
             "PATH": "/usr/bin"}, capture_output=True, text=True, timeout=60)
    assert fast.stdout == "tok-123\n0 False\n", fast.stderr
    config.write_text(TYPO)  # an edit that breaks it
    result = run(tmp_path, socket, ["auth", "token"])
    assert result.returncode == 1 and "unknown field `scops`" in result.stderr
    assert len(recording.requests) == 2  # the two answered above, nothing since


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another uid")
def test_a_record_that_is_not_ours_is_not_trusted(
    tmp_path: Path, agent: tuple[RecordingAgent, str],
) -> None:
    recording, socket = agent
    config = tmp_path / "config.yaml"
    config.write_text(VALID)
    assert run(tmp_path, socket, ["auth", "token"]).stdout == "tok-123\n"
    config.write_text(TYPO)
    # Someone else's record claiming the broken bytes were checked.
    record = Path(socket).parent / RECORD_NAME
    record.write_bytes(record.read_bytes().replace(VALID.encode(), TYPO.encode()))
    os.chown(record, NOBODY, NOBODY)
    result = run(tmp_path, socket, ["auth", "token"])
    assert result.returncode == 1 and "unknown field `scops`" in result.stderr
    assert len(recording.requests) == 1


def test_a_config_with_a_key_is_never_recorded(
    tmp_path: Path, agent: tuple[RecordingAgent, str],
) -> None:
    _recording, socket = agent
    config = tmp_path / "config.yaml"
    config.write_text("auth:\n  api_key: file-key\n")
    config.chmod(0o600)
    result = run(tmp_path, socket, ["auth", "status", "--json"])
    assert "file-key" not in result.stdout + result.stderr
    assert not (Path(socket).parent / RECORD_NAME).exists()
