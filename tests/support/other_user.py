"""Connecting to an agent's socket as another user (uid 65534), as an attacker on the machine would.

Needs root (to become another user) and Debian's python3 (an interpreter that
user may run). The socket's directories and the socket itself are loosened on
purpose first: the kernel-checked peer uid must hold even then.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534

_PROBE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10)\n"
    "s.connect(sys.argv[1])\n"
    "try:\n"  # refused: closed before or after our request, never answered
    "    s.sendall(b'{\"id\": 1, \"op\": \"hello\"}\\n')\n"
    "    data = s.recv(65536)\n"
    "except (BrokenPipeError, ConnectionResetError):\n"
    "    data = b''\n"
    "sys.stdout.write(repr(data))\n"
)


def answer_to_another_user(socket_path: str, loosen_up_to: Path) -> str:
    """What uid 65534 reads after sending `hello`: ``"b''"`` when refused."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user (uid 65534, nobody)")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs a system python3 (Debian python3) that uid 65534 may run")
    directory = Path(socket_path).parent
    while True:
        directory.chmod(0o755)
        if directory == loosen_up_to or directory == directory.parent:
            break
        directory = directory.parent
    os.chmod(socket_path, 0o666)
    out = subprocess.run([python, "-c", _PROBE, socket_path], user=NOBODY, group=NOBODY,
                         extra_groups=[], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


_LISTEN = (
    "import socket, sys\n"
    "server = socket.create_server((sys.argv[1], 0), family=socket.AF_INET6 if ':' in "
    "sys.argv[1] else socket.AF_INET)\n"
    "print(server.getsockname()[1], flush=True)\n"
    "sys.stdin.read()\n"  # listen until the test closes our stdin
)


@contextlib.contextmanager
def port_held_by_another_user(address: str) -> Iterator[int]:
    """A TCP port that uid 65534 listens on at ``address`` (as a local user who took the
    port of the person's own server while it was down); skips where that cannot be set up."""
    if os.getuid() != 0 or not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs root (to listen as uid 65534) and Linux's /proc/net/tcp")
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if setpriv is None or python is None:
        pytest.skip("needs setpriv and a system python3")
    with subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
         _LISTEN, address],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
        env={"PATH": "/usr/bin"},
    ) as listener:
        assert listener.stdin is not None and listener.stdout is not None
        try:
            yield int(listener.stdout.readline())
        finally:
            listener.stdin.close()  # the listener ends; the with waits for it
