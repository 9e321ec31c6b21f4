"""The visible wait of `compozy login`: one status line while the person logs in.

On a terminal (stderr a tty, ``NO_COLOR`` unset, ``TERM`` not ``dumb``) the line
is redrawn in place once a second (``Waiting for approval in the browser… 14:32
left``), below what was printed before it (the device code stays visible), and
erased when the wait ends so the result takes its place. Anywhere else (a pipe,
a log file, ``NO_COLOR``, ``TERM=dumb``) it is one plain line, printed once: no
carriage return, no escape sequence, nothing to animate.

The line is drawn by a thread of its own, because the main thread is blocked
reading the agent's answer to ``login_wait``; Ctrl-C still reaches the main
thread (Python runs signal handlers there), which stops the display before it
says anything. The same thread answers "Press Enter to open ... in your
browser" when the login offers it: the login goes on whether or not the person
presses Enter (they may approve on another device), so nothing blocks on stdin.

Time is read through ``clock`` (``time.monotonic`` by default) and the thread
waits through ``select``/an event, so tests drive :meth:`WaitDisplay.redraw`
with explicit times. Imports only os, sys and time at load time.
"""

from __future__ import annotations

import os
import sys
import time

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TextIO

#: Back to the line's start and erase it (ECMA-48: CR, then EL with 2 = whole line).
ERASE_LINE = "\r\033[2K"


def animated(stream: Any) -> bool:
    """Whether ``stream`` gets the in-place status line: a terminal, and neither
    ``NO_COLOR`` (https://no-color.org) nor ``TERM=dumb`` asks for plain output."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def clock_text(seconds: float) -> str:
    """``14:32`` (minutes:seconds), ``1:02:03`` past an hour; never negative."""
    whole = max(0, int(seconds + 0.999))  # 0.4 s left still shows 0:01, not 0:00
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class WaitDisplay:
    """The status line of one wait that ends by ``ends`` (``clock()`` time).

    ``start()`` shows it (and starts the redrawing thread on a terminal),
    ``stop()`` erases it; after ``stop()`` nothing more is written. With
    ``open_on_enter`` (a callable opening the browser) and a ``prompt``, the
    prompt is printed above the line and Enter on ``stdin`` calls it once.
    """

    def __init__(self, what: str, ends: float, *, stream: TextIO | None = None,
                 stdin: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 prompt: str | None = None,
                 open_on_enter: Callable[[], str] | None = None) -> None:
        import threading

        self.what = what
        self.ends = ends
        self.stream = stream if stream is not None else sys.stderr
        self.stdin = stdin if stdin is not None else sys.stdin
        self.clock = clock
        self.prompt = prompt
        self.open_on_enter = open_on_enter
        self.animated = animated(self.stream)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def text(self, now: float) -> str:
        """The status line at ``now``."""
        if self.animated:
            return f"{self.what}\u2026 {clock_text(self.ends - now)} left"
        return f"{self.what} (up to {clock_text(self.ends - now)})..."

    def start(self) -> None:
        """Show the prompt and the line, then keep the line current (and listen for
        Enter) in a thread of its own, where there is anything to keep or listen for."""
        import threading

        self.show()
        if self.animated or self.open_on_enter is not None:
            self._thread = threading.Thread(target=self._run, name="compozy-wait",
                                            daemon=True)
            self._thread.start()

    def show(self) -> None:
        """Print the prompt (if any) and draw the line once."""
        if self.prompt is not None:
            self._write(self.prompt + "\n")
        if self.animated:
            self.redraw(self.clock())
        else:
            self._write(self.text(self.clock()) + "\n")

    def redraw(self, now: float) -> None:
        """Draw the line for ``now`` in place (on a terminal; elsewhere nothing)."""
        if self.animated:
            self._write(ERASE_LINE + self._fitted(self.text(now)))

    def _fitted(self, text: str) -> str:
        """``text`` cut to the terminal's width: a line that wrapped could no longer be
        erased as one."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return text
        return text if len(text) < columns else text[:max(columns - 1, 0)]

    def say(self, message: str) -> None:
        """Print ``message`` as a line of its own above the status line."""
        if self.animated:
            self._write(ERASE_LINE + message + "\n" + self._fitted(self.text(self.clock())))
        else:
            self._write(message + "\n")

    def stop(self) -> None:
        """Erase the line; nothing is written after this returns."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            if self.animated:
                self._write_locked(ERASE_LINE)

    def _write(self, text: str) -> None:
        with self._lock:
            if not self._stopped.is_set():
                self._write_locked(text)

    def _write_locked(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal: the login itself goes on

    def _run(self) -> None:
        """The thread: redraw at each whole second left, and answer Enter."""
        while not self._stopped.is_set():
            now = self.clock()
            # Wake just after the shown time changes (at most a second from now).
            until_next = (self.ends - now) % 1.0 or 1.0
            if self.open_on_enter is not None and self._enter_pressed(until_next + 0.01):
                opener, self.open_on_enter = self.open_on_enter, None
                self.say(opener())
            elif self.open_on_enter is None:
                self._stopped.wait(until_next + 0.01)
            if not self.animated and self.open_on_enter is None:
                return  # the plain line was printed once; only Enter needed this thread
            self.redraw(self.clock())

    def _enter_pressed(self, timeout: float) -> bool:
        """Whether a line (Enter) arrived on stdin within ``timeout`` seconds; reads it."""
        import select

        try:
            ready, _, _ = select.select([self.stdin], [], [], timeout)
            if not ready or self._stopped.is_set():
                return False
            if self.stdin.readline():
                return True
            self.open_on_enter = None  # end of input: nobody will press Enter
            return False
        except (OSError, ValueError):
            self.open_on_enter = None  # stdin went away: stop offering
            return False
