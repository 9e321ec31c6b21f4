"""The client's checks of the socket it talks to, and the environment of an agent it starts."""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

import pytest

from compozy_client import peercheck
from compozy_client.connection import agent_environment

NOBODY = 65534


def test_peer_uid_is_what_the_kernel_says() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peercheck.peer_uid(left) == os.getuid()
        assert peercheck.peer_problem(left, "/x/agent.sock") is None
        if sys.platform.startswith("linux"):  # the same field the agent's peer.py reads
            raw = left.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            assert struct.unpack("3i", raw)[1] == peercheck.peer_uid(left)


class _ReportedPeer:
    """A socket whose kernel reports the peer as ``uid``, in this platform's struct layout."""

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
        platform = next(n for n in peercheck._PEER_OPTIONS if sys.platform.startswith(n))
        _, _, _, uid_at, version = peercheck._PEER_OPTIONS[platform]
        raw = bytearray(max(buflen, 12))
        if version is not None:
            raw[:4] = version.to_bytes(4, sys.byteorder)
        raw[uid_at:uid_at + 4] = self.uid.to_bytes(4, sys.byteorder)
        return bytes(raw[:12])

    def fileno(self) -> int:
        return -1


def test_a_peer_of_another_uid_is_a_problem_that_says_so() -> None:
    problem = peercheck.peer_problem(_ReportedPeer(NOBODY), "/run/x/agent.sock")
    assert problem is not None
    assert f"served by a process of uid {NOBODY}, not by you (uid {os.getuid()})" in problem
    assert "COMPOZY_AGENT_SOCK" in problem and "was sent nothing" in problem


def test_socket_directory_and_file_rules(tmp_path: Path) -> None:
    directory = tmp_path / "compozy"
    path = str(directory / "agent.sock")
    assert peercheck.socket_path_problem(path) is None  # nothing there yet: connect will say so
    directory.mkdir(mode=0o700)
    assert peercheck.socket_path_problem(path) is None
    directory.chmod(0o770)
    problem = peercheck.socket_path_problem(path)
    assert problem is not None and "writable by group or others (mode 770)" in problem
    assert f"chmod 700 {directory}" in problem
    directory.chmod(0o700)
    if os.getuid() == 0:
        os.chown(directory, NOBODY, NOBODY)
        problem = peercheck.socket_path_problem(path)
        assert problem is not None and f"belongs to uid {NOBODY}, not to you" in problem
        assert "someone else created it first" in problem and "XDG_RUNTIME_DIR" in problem
        os.chown(directory, 0, 0)
    Path(path).write_text("")
    problem = peercheck.socket_path_problem(path)
    assert problem is not None and "is not a socket" in problem
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        assert peercheck.socket_path_problem(path) is None
        if os.getuid() == 0:
            os.chown(path, NOBODY, NOBODY)
            problem = peercheck.socket_path_problem(path)
            assert problem is not None and f"{path} belongs to uid {NOBODY}" in problem


def test_an_agents_environment_keeps_only_what_it_needs(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    caller = {
        "HOME": "/home/me", "PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_TIME": "C",
        "XDG_RUNTIME_DIR": "/run/user/1000", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x",
        "https_proxy": "http://proxy:3128", "NO_PROXY": "localhost", "SSL_CERT_FILE": "/ca.pem",
        "PYTHON_KEYRING_BACKEND": "k.B", "KEYRING_PROPERTY_FOO": "1",
        "COMPOZY_STATE_DIR": "state", "COMPOZY_CONFIG": "/etc/compozy.yaml",
        "PYTHONPATH": os.pathsep.join(["", "relative/dir", "/abs/dir", "."]),
        "LD_LIBRARY_PATH": os.pathsep.join(["/opt/py/lib", "lib"]),
        "FLYZT_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
        "GITHUB_TOKEN": "g", "SSH_AUTH_SOCK": "/tmp/ssh", "LD_PRELOAD": "/tmp/evil.so",
        "PYTHONSTARTUP": "/tmp/x.py", "LISTEN_FDS": "1", "BROWSER": "evil",
    }
    env = agent_environment(caller, "/run/user/1000/compozy/agent.sock")
    assert env == {
        "HOME": "/home/me", "PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_TIME": "C",
        "XDG_RUNTIME_DIR": "/run/user/1000", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x",
        "https_proxy": "http://proxy:3128", "NO_PROXY": "localhost", "SSL_CERT_FILE": "/ca.pem",
        "PYTHON_KEYRING_BACKEND": "k.B", "KEYRING_PROPERTY_FOO": "1",
        "COMPOZY_STATE_DIR": str(tmp_path / "state"), "COMPOZY_CONFIG": "/etc/compozy.yaml",
        "PYTHONPATH": "/abs/dir", "LD_LIBRARY_PATH": "/opt/py/lib",
        "COMPOZY_AGENT_SOCK": "/run/user/1000/compozy/agent.sock",
    }
    assert "PYTHONPATH" not in agent_environment({"PYTHONPATH": "."}, "/s")
