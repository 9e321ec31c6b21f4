"""A real terminal for tests: one command in a private tmux server, its output streamed.

The command runs in a tmux pane (a real pseudo-terminal: ``isatty()`` is true,
Ctrl-C sent with ``send-keys C-c`` reaches it through the line discipline as
SIGINT, as when a person presses it). Everything the command writes is piped
(``pipe-pane``) into a FIFO read by a thread, so tests wait on a condition with
a deadline rather than poll or sleep. The command starts only once the pipe is
in place, and the shell around it prints ``exit status N`` when it ends.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import threading
from pathlib import Path
from types import TracebackType

import pytest

#: The line the shell around the command prints when the command has ended.
EXIT_MARK = "exit status "
_EXIT = re.compile(rb"exit status (\d+)\r?\n")


class Terminal:
    """``argv`` with ``env`` in a tmux pane of ``columns`` x ``rows``; use as a context
    manager (the tmux server is killed on exit)."""

    def __init__(self, workdir: Path, argv: list[str], env: dict[str, str], *,
                 columns: int = 200, rows: int = 50) -> None:
        tmux = shutil.which("tmux", path="/usr/bin:/bin")
        if tmux is None:
            pytest.skip("needs tmux (Debian package tmux)")
        self.tmux = tmux
        self.socket = str(workdir / "tmux.sock")
        self.fifo = workdir / "pane.fifo"
        os.mkfifo(self.fifo, 0o600)
        script = workdir / "run.sh"
        exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()
                          if name.isidentifier())
        # `trap true INT`: the shell shares the command's process group, so it gets the
        # SIGINT too; trapped (not ignored, which the command would inherit), it lives on
        # to report the command's exit status.
        script.write_text(
            "trap true INT\n"
            f"{exports}"
            f"{shlex.quote(tmux)} wait-for started\n"
            f"{shlex.join(argv)}\n"
            f'echo "{EXIT_MARK}$?"\n'
        )
        self._output = b""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "test", "-x", str(columns),
                   "-y", str(rows), f"sh {shlex.quote(str(script))}")
        self._tmux("set-option", "-t", "test", "remain-on-exit", "on")
        self._tmux("pipe-pane", "-O", "-t", "test", f"cat > {shlex.quote(str(self.fifo))}")
        self._tmux("wait-for", "-S", "started")

    def _tmux(self, *args: str) -> str:
        result = subprocess.run([self.tmux, "-S", self.socket, *args], capture_output=True,
                                text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                             "TERM": "xterm-256color"})
        assert result.returncode == 0, f"tmux {args[0]}: {result.stderr}"
        return result.stdout

    def _read(self) -> None:
        with open(self.fifo, "rb") as pipe:
            while chunk := pipe.read1(65536):
                with self._changed:
                    self._output += chunk
                    self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the command (and the shell around it) wrote so far, raw."""
        with self._changed:
            return self._output.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 30.0) -> bool:
        """Whether ``text`` appeared in the output within ``timeout`` seconds."""
        wanted = text.encode()
        with self._changed:
            return self._changed.wait_for(lambda: wanted in self._output, timeout)

    def exit_status(self, timeout: float = 30.0) -> int | None:
        """The command's exit status, once it has ended (None if not within ``timeout``)."""
        with self._changed:
            if not self._changed.wait_for(lambda: _EXIT.search(self._output) is not None,
                                          timeout):
                return None
            found = _EXIT.search(self._output)
            assert found is not None
            return int(found.group(1))

    def send_keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "test", *keys)

    def screen(self, *, scrolled_off: bool = False) -> str:
        """What the terminal shows now; with ``scrolled_off``, the lines that scrolled
        off its top as well (tmux's note that the pane is dead can scroll one off)."""
        history = ["-S", "-"] if scrolled_off else []
        return self._tmux("capture-pane", "-p", *history, "-t", "test")

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=30)
        self._reader.join(10)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
