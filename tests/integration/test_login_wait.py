"""The visible wait of `compozy login` (issue 15, item 2), in a real terminal (tmux).

After the device code, a terminal shows one status line that counts down in
place and is replaced by the result; a pipe, ``NO_COLOR`` or ``TERM=dumb`` get
one plain line and no control codes. With a display and a person at the
terminal, Enter opens the device page in the browser (a stub ``$BROWSER``
here: the real one needs a display); a run without a terminal is never asked.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from support.agent import AgentEnv, AgentProcess, start_agent
from support.login import CLI, configure, reaped
from support.provider import OidcTestProvider, approve_device
from support.terminal import Terminal

pytestmark = pytest.mark.real_provider

WAITING = "Waiting for approval in the browser"
ERASE_LINE = "\r\033[2K"


@pytest.fixture
def agent(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[AgentProcess]:
    configure(agent_env, oidc_provider)
    process = start_agent(agent_env)
    try:
        yield process
    finally:
        process.stop()


def terminal_env(agent: AgentProcess, **settings: str) -> dict[str, str]:
    """The agent's client environment for a colour terminal with no display, unless
    ``settings`` say otherwise."""
    env = agent.agent_env.env(TERM="xterm-256color", DISPLAY="", WAYLAND_DISPLAY="",
                              BROWSER="", CI="")
    del env["NO_COLOR"]
    env.update(settings)
    return env


def device_page(output: str) -> str:
    found = re.search(r"or open: (\S+)", output)
    assert found, output
    return found.group(1)


def stub_browser(tmp_path: Path) -> tuple[Path, Path]:
    """A $BROWSER that writes the address it was given to a marker file and says so
    on the terminal; returns (command, marker)."""
    marker = tmp_path / "opened.txt"
    command = tmp_path / "browser.sh"
    command.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {marker}\necho "stub browser ran"\n')
    command.chmod(0o755)
    return command, marker


def test_the_wait_line_counts_down_and_is_replaced_by_the_result(
    agent: AgentProcess, tmp_path: Path
) -> None:
    with Terminal(tmp_path, [*CLI, "login", "--device"], terminal_env(agent)) as terminal:
        assert terminal.wait_for(f"{WAITING}\u2026 "), terminal.output + agent.log()
        screen = terminal.screen()
        # The device code stays visible above the line.
        assert "enter the code" in screen and re.search(rf"{WAITING}\u2026 \d+:\d\d left",
                                                        screen), screen
        assert "Press Enter" not in screen  # no display here: nothing to offer
        # Redrawn in place: a second drawing of the line, on the same line.
        assert terminal.wait_for(f" left{ERASE_LINE}{WAITING}", timeout=10), terminal.output
        approve_device(device_page(terminal.output))
        assert terminal.exit_status() == 0, terminal.output + agent.log()
        screen = terminal.screen(scrolled_off=True)
        output = terminal.output
    assert "Logged in to " in screen
    assert WAITING not in screen, screen  # erased; the result took its place
    assert "enter the code" in screen, repr(output)


def test_enter_opens_the_device_page_in_the_browser(agent: AgentProcess, tmp_path: Path) -> None:
    browser, marker = stub_browser(tmp_path)
    env = terminal_env(agent, DISPLAY=":0", BROWSER=str(browser))
    with Terminal(tmp_path, [*CLI, "login", "--device"], env) as terminal:
        assert terminal.wait_for("in your browser"), terminal.output + agent.log()
        page = device_page(terminal.output)
        assert f"Press Enter to open {page} in your browser" in terminal.screen()
        assert not marker.exists()  # nothing opens before Enter
        terminal.send_keys("Enter")
        assert terminal.wait_for("stub browser ran"), terminal.output
        assert terminal.wait_for("Opened your browser"), terminal.output
        # The browser got a private launch page, never the address (with the code) in argv.
        opened = marker.read_text()
        assert opened.startswith("file://") and "user_code" not in opened, opened
        launch_page = Path(unquote(urlsplit(opened).path))
        assert page.replace("&", "&amp;") in launch_page.read_text()
        approve_device(page)
        assert terminal.exit_status() == 0, terminal.output + agent.log()
        assert "Logged in to " in terminal.screen()
    assert not launch_page.parent.exists()  # removed when the login ended


def test_ctrl_c_while_the_browser_is_offered_cancels_the_login(
    agent: AgentProcess, tmp_path: Path
) -> None:
    browser, marker = stub_browser(tmp_path)
    env = terminal_env(agent, DISPLAY=":0", BROWSER=str(browser))
    with Terminal(tmp_path, [*CLI, "login", "--device"], env) as terminal:
        assert terminal.wait_for("in your browser"), terminal.output + agent.log()
        assert terminal.wait_for(f"{WAITING}\u2026 "), terminal.output
        terminal.send_keys("C-c")
        status = terminal.exit_status(timeout=10)
        screen = terminal.screen(scrolled_off=True)
        output = terminal.output
    assert status == 130, output
    assert "Login cancelled" in screen and WAITING not in screen, repr(output)
    assert "error" not in output and "Traceback" not in output, output
    assert not marker.exists()
    assert agent.wait_for_log("failed: cancelled", timeout=10), agent.log()
    assert not list(Path(env["XDG_RUNTIME_DIR"]).glob("compozy-login-*"))  # page removed


def test_dumb_terminal_gets_plain_lines_only(agent: AgentProcess, tmp_path: Path) -> None:
    env = terminal_env(agent, TERM="dumb")
    with Terminal(tmp_path, [*CLI, "login", "--device"], env) as terminal:
        assert terminal.wait_for(f"{WAITING} (up to "), terminal.output + agent.log()
        approve_device(device_page(terminal.output))
        assert terminal.exit_status() == 0, terminal.output + agent.log()
        output = terminal.output
    assert "\033" not in output, repr(output)
    assert "\r" not in output.replace("\r\n", ""), repr(output)  # the tty's own CR LF only
    assert output.count(WAITING) == 1


def test_without_a_terminal_one_plain_line_and_no_question(
    agent: AgentProcess, tmp_path: Path
) -> None:
    browser, marker = stub_browser(tmp_path)
    env = agent.agent_env.env(DISPLAY=":0", BROWSER=str(browser), TERM="xterm-256color")
    del env["NO_COLOR"]
    proc = subprocess.Popen([*CLI, "login", "--device"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with reaped(proc):
        assert proc.stderr is not None
        shown = b""
        for line in proc.stderr:
            shown += line
            if line.startswith(WAITING.encode()):
                break
        approve_device(device_page(shown.decode()))
        _, rest = proc.communicate(timeout=60)
    stderr = shown + rest
    assert proc.returncode == 0, stderr
    assert b"\033" not in stderr and b"\r" not in stderr, stderr
    assert stderr.count(WAITING.encode()) == 1
    assert b"Press Enter" not in stderr and not marker.exists()  # never asked, never opened
    assert b"Logged in to " in stderr
