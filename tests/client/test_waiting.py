"""The status line of `compozy login`'s wait (commands/waiting.py), on explicit times.

A terminal gets one line redrawn in place and erased at the end; anything else
(a pipe, NO_COLOR, TERM=dumb) gets one plain line with no carriage return or
escape sequence (issue 15, item 2). The real terminal is in
tests/integration/test_login_wait.py.
"""

from __future__ import annotations

import io
import os
import threading

import pytest

from compozy_client.commands.waiting import ERASE_LINE, WaitDisplay, clock_text


class Screen(io.StringIO):
    """What was written to stderr, as a terminal or not."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def terminal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


def display(screen: Screen, now: list[float], **options: object) -> WaitDisplay:
    return WaitDisplay("Waiting for approval in the browser", 872.0, stream=screen,
                       clock=lambda: now[0], **options)  # type: ignore[arg-type]


def test_clock_text() -> None:
    assert clock_text(872.0) == "14:32"
    assert clock_text(0.4) == "0:01"
    assert clock_text(-3) == "0:00"
    assert clock_text(3723) == "1:02:03"


def test_on_a_terminal_the_line_counts_down_in_place_and_is_erased(terminal_env: None) -> None:
    screen, now = Screen(tty=True), [0.0]
    wait = display(screen, now)
    wait.show()
    assert screen.getvalue() == ERASE_LINE + "Waiting for approval in the browser\u2026 14:32 left"
    now[0] = 1.0
    wait.redraw(now[0])
    assert screen.getvalue().endswith(ERASE_LINE + "Waiting for approval in the browser\u2026 "
                                      "14:31 left")
    assert "\n" not in screen.getvalue()  # one line, redrawn, never a new one
    wait.stop()
    assert screen.getvalue().endswith("14:31 left" + ERASE_LINE)
    written = screen.getvalue()
    wait.redraw(2.0)
    wait.say("late")
    assert screen.getvalue() == written  # nothing after stop


def test_a_message_goes_above_the_line(terminal_env: None) -> None:
    screen, now = Screen(tty=True), [0.0]
    wait = display(screen, now, prompt="Press Enter to open https://x.test/device in your "
                   "browser")
    wait.show()
    wait.say("Opened your browser")
    lines = screen.getvalue().split("\n")
    assert lines[0] == "Press Enter to open https://x.test/device in your browser"
    status = "Waiting for approval in the browser\u2026 14:32 left"
    # The line is erased, the message printed in its place, the line drawn below.
    assert lines[1:] == [ERASE_LINE + status + ERASE_LINE + "Opened your browser", status]


@pytest.mark.parametrize("setting", ["pipe", "NO_COLOR", "TERM=dumb"])
def test_elsewhere_one_plain_line_and_no_control_codes(
    setting: str, terminal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if setting == "NO_COLOR":
        monkeypatch.setenv("NO_COLOR", "1")
    elif setting == "TERM=dumb":
        monkeypatch.setenv("TERM", "dumb")
    screen, now = Screen(tty=setting != "pipe"), [0.0]
    wait = display(screen, now)
    wait.show()
    now[0] = 5.0
    wait.redraw(now[0])
    wait.stop()
    assert screen.getvalue() == "Waiting for approval in the browser (up to 14:32)...\n"


def test_enter_calls_the_opener_once_and_says_what_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    read_end, write_end = os.pipe()
    opened = threading.Event()
    calls: list[int] = []

    def opener() -> str:
        calls.append(1)
        opened.set()
        return "Opened your browser"

    screen = Screen(tty=False)
    with os.fdopen(read_end) as stdin:
        wait = WaitDisplay("Waiting", 60.0, stream=screen, stdin=stdin, clock=lambda: 0.0,
                           prompt="Press Enter to open https://x.test in your browser",
                           open_on_enter=opener)
        wait.start()
        os.write(write_end, b"\n\n")
        assert opened.wait(10)
        assert wait._thread is not None
        wait._thread.join(10)  # it ends once Enter was answered (plain output)
        assert not wait._thread.is_alive()
        wait.stop()
    os.close(write_end)
    assert calls == [1]
    assert screen.getvalue().splitlines() == [
        "Press Enter to open https://x.test in your browser",
        "Waiting (up to 1:00)...",
        "Opened your browser",
    ]


def test_end_of_input_stops_the_offer_without_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    read_end, write_end = os.pipe()
    os.close(write_end)  # stdin at its end: nobody will press Enter
    with os.fdopen(read_end) as stdin:
        wait = WaitDisplay("Waiting", 60.0, stream=Screen(tty=False), stdin=stdin,
                           open_on_enter=lambda: pytest.fail("opened without Enter"))
        wait.start()
        assert wait._thread is not None
        wait._thread.join(10)
        assert not wait._thread.is_alive()
        wait.stop()


def test_the_line_is_cut_to_the_terminal_width(terminal_env: None) -> None:
    # A line that wrapped could not be erased as one: on a 30-column terminal it stays
    # within 29 columns.
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    with os.fdopen(terminal, "w", encoding="utf-8") as stream, os.fdopen(controller,
                                                                          "rb") as screen:
        wait = WaitDisplay("Waiting for approval in the browser", 872.0, stream=stream,
                           clock=lambda: 0.0)
        assert wait.animated
        wait.show()
        drawn = screen.read1(4096).decode()
    assert drawn == ERASE_LINE + "Waiting for approval in the b"
