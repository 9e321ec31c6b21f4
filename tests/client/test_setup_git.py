"""`compozy auth setup-git`: what it writes to the global git config (real git, no agent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.real_parts import require_tools

CLI = [sys.executable, "-c", "from compozy_client.cli import main; main()"]
RULES = """\
rules:
  - match: {host: git.example.com, path: team}
    profile: team
  - match: {host: git.example.com}
    profile: work
  - match: {host: "code.example.org:8443"}
    profile: work
  - match: {url_prefix: "https://api.example.com/"}
    profile: work
"""


class Home:
    def __init__(self, root: Path) -> None:
        require_tools(("git",), "git", "for compozy auth setup-git")
        self.root = root
        self.gitconfig = root / "gitconfig"
        self.config = root / "config.yaml"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOZY_", "GIT_"))}
        env.update(HOME=str(self.root), GIT_CONFIG_GLOBAL=str(self.gitconfig),
                   GIT_CONFIG_NOSYSTEM="1", COMPOZY_CONFIG=str(self.config),
                   COMPOZY_AGENT_AUTOSTART="0")
        return env

    def setup(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "auth", "setup-git", *args], capture_output=True,
                              text=True, env=self.env(), timeout=60)

    def git_config(self, key: str) -> list[str]:
        out = subprocess.run(["git", "config", "--global", "--get-all", key],
                             capture_output=True, text=True, env=self.env(), timeout=30)
        return out.stdout.splitlines() if out.returncode == 0 else []

    def rules(self, text: str) -> None:
        self.config.write_text(text)
        self.config.chmod(0o600)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


def test_a_host_gets_an_empty_helper_then_compozy_and_again_is_the_same(home: Home) -> None:
    for _ in range(2):
        result = home.setup("--host", "git.example.com", "--profile", "work")
        assert result.returncode == 0, result.stderr
    assert home.git_config("credential.https://git.example.com.helper") == [
        "", "compozy --profile work"]
    assert "git now asks compozy for https://git.example.com (profile work)" in result.stderr


def test_without_host_the_rules_hosts_and_their_paths(home: Home) -> None:
    home.rules(RULES)
    result = home.setup()
    assert result.returncode == 0, result.stderr
    for url in ("https://git.example.com", "https://code.example.org:8443"):
        assert home.git_config(f"credential.{url}.helper") == ["", "compozy"]
    # A rule names a path for git.example.com: git must send it (useHttpPath).
    assert home.git_config("credential.https://git.example.com.useHttpPath") == ["true"]
    assert home.git_config("credential.https://code.example.org:8443.useHttpPath") == []
    unset = home.setup("--unset")
    assert unset.returncode == 0, unset.stderr
    assert home.git_config("credential.https://git.example.com.helper") == []
    assert home.git_config("credential.https://git.example.com.useHttpPath") == []


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("http://git.example.com", "the helper sends tokens over https only"),
        ("https://git.example.com/team", "a URL without a path"),
        ("ftp://git.example.com", "give a host name"),
    ],
)
def test_a_host_the_helper_would_not_answer_is_a_usage_error(
    home: Home, host: str, message: str
) -> None:
    result = home.setup("--host", host)
    assert result.returncode == 2 and message in result.stderr
    assert not home.gitconfig.exists()


@pytest.mark.parametrize("profile", ["a b", "x;touch /tmp/pwned", "$(id)", "-x", "dév"])
def test_a_profile_the_shell_would_read_otherwise_is_refused(home: Home, profile: str) -> None:
    """git runs the helper line through the shell."""
    result = home.setup("--host", "git.example.com", f"--profile={profile}")
    assert result.returncode == 2 and "setup-git takes profile names" in result.stderr
    assert not home.gitconfig.exists()


def test_no_host_and_no_rule_is_a_usage_error(home: Home) -> None:
    result = home.setup()
    assert result.returncode == 2 and "name the git host" in result.stderr
    assert not home.gitconfig.exists()


def test_plain_http_to_this_machine_is_allowed(home: Home) -> None:
    assert home.setup("--host", "http://127.0.0.1:8080").returncode == 0
    assert home.git_config("credential.http://127.0.0.1:8080.helper") == ["", "compozy"]
