"""Ctrl-C during `compozy login`, pressed in a real terminal (tmux), as a person would.

The person chose to stop: the CLI says ``Login cancelled`` and exits 130 at once,
with no error that blames the agent; the agent ends the login at once (its
loopback listener closes), so nothing is left pending (issue 15, item 1).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from support.agent import AgentEnv, AgentProcess, start_agent
from support.login import CLI, configure, login_device
from support.provider import OidcTestProvider
from support.terminal import Terminal

pytestmark = pytest.mark.real_provider


@pytest.fixture
def agent(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[AgentProcess]:
    configure(agent_env, oidc_provider)
    process = start_agent(agent_env)
    try:
        yield process
    finally:
        process.stop()


def cancelled_at_the_agent(agent: AgentProcess) -> bool:
    """Whether the agent logged a login ended by ``login_cancel`` (not by its connection
    closing, which the agent notices only after the login_wait in flight returns)."""
    agent.wait_for_log("failed: cancelled", timeout=10)
    return any(line.endswith(") failed: cancelled") for line in agent.lines)


def interrupt(terminal: Terminal) -> int | None:
    terminal.send_keys("C-c")
    return terminal.exit_status(timeout=10)


def listening(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_ctrl_c_during_a_device_login_cancels_it_and_exits_130(
    agent: AgentProcess, tmp_path: Path
) -> None:
    env = agent.agent_env
    with Terminal(tmp_path, [*CLI, "login", "--device"], env.env()) as terminal:
        assert terminal.wait_for("or open: "), terminal.output + agent.log()
        status = interrupt(terminal)
        screen = terminal.screen()
        output = terminal.output
    assert status == 130, output
    assert "Login cancelled" in screen
    assert "error" not in output and "Traceback" not in output, output
    assert cancelled_at_the_agent(agent), agent.log()
    # Nothing was left pending: a new login for the profile replaces no login.
    again = login_device(env)
    assert again.returncode == 0, again.stderr
    assert not any("replaced this one" in line for line in agent.lines), agent.log()


def test_a_ctrl_c_before_the_wait_is_sent_still_cancels_at_the_agent(
    agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the tmux test above can only hit by chance: Ctrl-C after the login
    started and before its login_wait went out. The CLI cancels on a second
    connection while the login's own is still open; closed first, it would end the
    login at the agent for another reason ("the connection that started it closed")."""
    from compozy_client.cli import main
    from compozy_client.commands.waiting import WaitDisplay

    for name in [n for n in os.environ if n.startswith(("COMPOZY_", "FLYZT_"))]:
        monkeypatch.delenv(name)
    for name, value in agent.agent_env.env().items():
        monkeypatch.setenv(name, value)

    def interrupted(self: WaitDisplay) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WaitDisplay, "start", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["login", "--device"])
    assert exited.value.code == 130
    assert cancelled_at_the_agent(agent), agent.log()


def test_ctrl_c_during_a_browser_login_cancels_it_and_closes_the_listener(
    agent: AgentProcess, tmp_path: Path
) -> None:
    env = agent.agent_env
    with Terminal(tmp_path, [*CLI, "login", "--no-browser"], env.env()) as terminal:
        assert terminal.wait_for("redirect_uri="), terminal.output + agent.log()
        assert terminal.wait_for("\n", 0)
        url = terminal.output.split("  http", 1)[1].split()[0]
        redirect = urlsplit(parse_qs(urlsplit("http" + url).query)["redirect_uri"][0])
        assert redirect.hostname == "127.0.0.1" and redirect.port is not None
        assert listening(redirect.port)
        status = interrupt(terminal)
        screen = terminal.screen()
        output = terminal.output
    assert status == 130, output
    assert "Login cancelled" in screen
    assert "error" not in output and "Traceback" not in output, output
    assert cancelled_at_the_agent(agent), agent.log()
    assert agent.wait_for_log(f"stopped listening on 127.0.0.1:{redirect.port}", timeout=10)
    assert not listening(redirect.port)
