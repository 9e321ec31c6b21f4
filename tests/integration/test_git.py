"""Real git (Debian ``git``) through git-credential-compozy, against a real agent and provider.

A smart-HTTP server (``git http-backend``, tests/support/git_server.py) lets in
only tokens the node oidc-provider says are active. The helper is installed
with ``compozy auth setup-git``; a config rule maps the server's host to the
profile ``work`` (the ``default`` profile is never logged in). git never gets
to prompt: ``GIT_TERMINAL_PROMPT=0`` and no terminal.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.git_server import GitServer, git_server
from support.login import configure, login_browser
from support.provider import OidcTestProvider

pytestmark = pytest.mark.real_provider

BINDIR = Path(sys.executable).parent


@dataclass
class GitRig:
    agent_env: AgentEnv
    agent: AgentProcess
    server: GitServer
    provider: OidcTestProvider

    @property
    def work(self) -> Path:
        return self.agent_env.root / "clone"

    def git(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = self.agent_env.env(
            PATH=f"{BINDIR}:/usr/local/bin:/usr/bin:/bin",  # git finds git-credential-compozy
            GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_ASKPASS="", SSH_ASKPASS="",
            GIT_AUTHOR_NAME="Alice", GIT_AUTHOR_EMAIL="alice@example.test",
            GIT_COMMITTER_NAME="Alice", GIT_COMMITTER_EMAIL="alice@example.test",
        )
        result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=120)
        self.agent_env.outputs.append((f"git {' '.join(args)}",
                                       result.stdout + result.stderr))
        return result

    def refreshes(self) -> int:
        return self.provider.count_token_calls("refresh_token", status=200)


def configure_with_rule(agent_env: AgentEnv, provider: OidcTestProvider, host: str) -> None:
    """The repository's path picks the profile: git must send it (credential.useHttpPath,
    which setup-git sets because a rule names a path); the host alone would pick a
    profile that is never logged in."""
    configure(agent_env, provider, "work", storage="memory")
    with agent_env.config.open("a") as config:
        config.write(f"rules:\n"
                     f"  - match: {{host: \"{host}\", path: repo}}\n    profile: work\n"
                     f"  - match: {{host: \"{host}\"}}\n    profile: elsewhere\n")


@pytest.fixture
def rig(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[GitRig]:
    with git_server(agent_env.root / "srv", oidc_provider.introspection_endpoint,
                    oidc_provider.client_id) as server:
        server.create_repository("repo")
        configure_with_rule(agent_env, oidc_provider, f"127.0.0.1:{server.port}")
        agent = start_agent(agent_env)
        try:
            yield GitRig(agent_env, agent, server, oidc_provider)
        finally:
            agent.stop()


def setup_git(rig: GitRig) -> None:
    # A storing helper configured for every host, as many people have.
    assert rig.git("config", "--global", "credential.helper", "store").returncode == 0
    setup = run_cli(rig.agent_env, "auth", "setup-git", "--host", rig.server.url,
                    PATH=f"{BINDIR}:/usr/bin:/bin")
    assert setup.returncode == 0, setup.stderr
    assert f"git now asks compozy for {rig.server.url}" in setup.stderr
    helpers = rig.git("config", "--global", "--get-all", f"credential.{rig.server.url}.helper")
    assert helpers.stdout == "\ncompozy\n"  # an empty helper first, as gh auth setup-git
    http_path = rig.git("config", "--global", f"credential.{rig.server.url}.useHttpPath")
    assert http_path.stdout == "true\n"


def test_clone_push_and_a_refused_token_renewed_through_erase(rig: GitRig) -> None:
    env = rig.agent_env
    login = login_browser(env, "--profile", "work")
    assert login.returncode == 0, login.stderr + rig.agent.log()
    setup_git(rig)

    clone = rig.git("clone", f"{rig.server.url}/repo.git", str(rig.work))
    assert clone.returncode == 0, clone.stderr + rig.agent.log()
    (rig.work / "change").write_text("from alice\n")
    assert rig.git("add", "change", cwd=rig.work).returncode == 0
    assert rig.git("commit", "-qm", "change", cwd=rig.work).returncode == 0
    push = rig.git("push", "origin", "main", cwd=rig.work)
    assert push.returncode == 0, push.stderr
    first = rig.server.accepted
    assert len(first) == 1  # one token for clone and push, over Basic auth
    assert {how for _, _, status, how in rig.server.requests if status == 200} == {"basic"}
    pushed = subprocess.run(["git", "--git-dir", str(rig.server.root / "repo.git"), "log",
                             "--format=%s", "-1", "main"], capture_output=True, text=True)
    assert pushed.stdout == "change\n"

    # The API learns the token was revoked; the provider still holds it active.
    rig.server.refuse(first[0])
    refreshes = rig.refreshes()
    failed = rig.git("fetch", "origin", cwd=rig.work)
    assert failed.returncode != 0
    assert "Authentication failed" in failed.stderr, failed.stderr
    # git ran `erase` with the refused token: the agent dropped it and fetched a new one.
    assert rig.refreshes() == refreshes + 1
    fetched = rig.git("fetch", "origin", cwd=rig.work)
    assert fetched.returncode == 0, fetched.stderr + rig.agent.log()
    assert len(rig.server.accepted) == 2 and rig.server.accepted[1] != first[0]
    assert rig.refreshes() == refreshes + 1  # the new token was cached, not fetched again
    assert "terminal prompts disabled" not in failed.stderr + fetched.stderr

    # The storing helper configured for every host kept nothing: the empty helper= of
    # setup-git cleared it for this host.
    assert not (env.home / ".git-credentials").exists()
    status = run_cli(env, "auth", "status", "--profile", "work")
    assert status.returncode == 0  # never a logout


def test_login_required_is_one_message_and_no_credentials(rig: GitRig) -> None:
    """No login for the rule's profile: git is told to stop, with the command to run."""
    setup_git(rig)
    clone = rig.git("clone", f"{rig.server.url}/repo.git", str(rig.work))
    assert clone.returncode != 0
    lines = [line for line in clone.stderr.splitlines() if line.startswith("compozy: ")]
    assert lines == ["compozy: not logged in (profile 'work'); run: compozy login --profile work"]
    assert "told us to quit" in clone.stderr
    assert "Username for" not in clone.stderr and "terminal prompts disabled" not in clone.stderr
    # Only the first, anonymous request reached the server: no credentials were sent.
    assert [how for _, _, _, how in rig.server.requests] == ["none"]


def test_setup_git_unset_removes_the_helper(rig: GitRig) -> None:
    setup_git(rig)
    unset = run_cli(rig.agent_env, "auth", "setup-git", "--host", rig.server.url, "--unset")
    assert unset.returncode == 0, unset.stderr
    left = rig.git("config", "--global", "--get-all", f"credential.{rig.server.url}.helper")
    assert left.returncode == 1 and left.stdout == ""
    assert rig.git("config", "--global", "credential.helper").stdout == "store\n"


def test_a_submodule_url_climbing_out_of_the_rules_path_gets_no_token(rig: GitRig) -> None:
    """``{url}/repo/%2e%2e/other.git``: git hands the helper the path decoded
    (``repo/../other.git``) while the server is asked for another repository. The rule
    for ``repo`` (profile work, logged in) must not send its token there: the host's
    other rule applies (profile elsewhere, never logged in), and git sends nothing."""
    login = login_browser(rig.agent_env, "--profile", "work")
    assert login.returncode == 0, login.stderr + rig.agent.log()
    setup_git(rig)
    clone = rig.git("clone", f"{rig.server.url}/repo/%2e%2e/other.git", str(rig.work))
    assert clone.returncode != 0
    assert "not logged in (profile 'elsewhere')" in clone.stderr, clone.stderr
    assert [how for _, _, _, how in rig.server.requests] == ["none"]
