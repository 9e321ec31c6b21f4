"""Taking sockets from the service manager: sd_listen_fds(3) rules, checks, launchd's call."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compozy_agent.activation import (
    LISTEN_VARIABLES,
    ActivationError,
    adopt,
    launchd_fds,
    parse_listen_env,
    systemd_fds,
)

PID = 4242


# --------------------------------------------------------------------------
# sd_listen_fds(3): the environment


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, []),
        ({"LISTEN_FDS": "2"}, []),  # no LISTEN_PID: not for us
        ({"LISTEN_PID": "1", "LISTEN_FDS": "2"}, []),  # another process's
        ({"LISTEN_PID": str(PID)}, []),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2"}, ["unknown", "unknown"]),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "agent"}, ["agent"]),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "agent::forward"},
            ["agent", "", "forward"],
        ),
        # Another process's malformed variables are not ours to judge.
        ({"LISTEN_PID": "1", "LISTEN_FDS": "x", "LISTEN_FDNAMES": "a:b"}, []),
    ],
)
def test_parse_listen_env(environ: dict[str, str], names: list[str]) -> None:
    assert parse_listen_env(environ, PID) == names


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc' is not a process id"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "is not a process id"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, "LISTEN_FDS='0' is not a positive"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "is not a positive"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "two"}, "is not a positive"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "99999999999"}, "is not a positive"),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "agent"},
            "LISTEN_FDNAMES names 1 fds but LISTEN_FDS=2",
        ),
    ],
)
def test_malformed_variables_for_us_are_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_listen_env(environ, PID)


# --------------------------------------------------------------------------
# sd_listen_fds(3): taking the fds


def free_fd_range(count: int) -> int:
    """The first of ``count`` consecutive fds that are not open (fd 3 is pytest's)."""
    first = 100
    while True:
        if all(_closed(first + offset) for offset in range(count)):
            return first
        first += count


def _closed(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


@pytest.fixture
def passed_fds() -> Iterator[tuple[int, list[socket.socket]]]:
    """Two sockets sitting at consecutive fds, inheritable, as systemd leaves them."""
    pairs = [socket.socketpair() for _ in range(2)]
    first = free_fd_range(2)
    for offset, (ours, _) in enumerate(pairs):
        os.dup2(ours.fileno(), first + offset, inheritable=True)
    yield first, [sock for pair in pairs for sock in pair]
    for offset in range(2):
        if not _closed(first + offset):
            os.close(first + offset)
    for pair in pairs:
        for sock in pair:
            sock.close()


def test_systemd_fds_are_named_made_cloexec_and_the_variables_unset(
    passed_fds: tuple[int, list[socket.socket]],
) -> None:
    first, _ = passed_fds
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "agent:forward",
               "OTHER": "kept"}
    assert os.get_inheritable(first)
    assert systemd_fds(environ, pid=PID, first_fd=first) == [(first, "agent"),
                                                             (first + 1, "forward")]
    assert environ == {"OTHER": "kept"}
    assert not os.get_inheritable(first) and not os.get_inheritable(first + 1)


@pytest.mark.parametrize(
    "environ",
    [
        {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "agent"},
        {"LISTEN_FDS": "1"},
        {"LISTEN_FDNAMES": "agent"},
    ],
)
def test_variables_not_for_us_are_unset_too(environ: dict[str, str]) -> None:
    # unset_environment: a child we start must not take them for its own.
    assert systemd_fds(environ, pid=PID) == []
    assert not set(environ) & set(LISTEN_VARIABLES)


def test_malformed_variables_are_unset_and_raise() -> None:
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}
    with pytest.raises(ActivationError):
        systemd_fds(environ, pid=PID)
    assert environ == {}


def test_a_passed_fd_that_is_not_open_is_an_error() -> None:
    first = free_fd_range(1)
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}
    with pytest.raises(ActivationError, match=f"fd {first} named in LISTEN_FDS is not open"):
        systemd_fds(environ, pid=PID, first_fd=first)


def test_the_real_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


# --------------------------------------------------------------------------
# The checks a passed socket must pass


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)
    return directory


def listening(path: Path, mode: int = 0o600, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    if listen:
        sock.listen()
    return sock


@pytest.mark.parametrize(("name", "kind"), [("agent", "full"), ("unknown", "full"),
                                            ("forward", "forward")])
def test_a_private_listening_socket_is_adopted(private_dir: Path, name: str, kind: str) -> None:
    path = private_dir / "agent.sock"
    with listening(path) as original:
        bound = adopt(os.dup(original.fileno()), name, "systemd")
        try:
            assert (bound.path, bound.kind) == (str(path), kind)
            assert bound.lock_fd is None and bound.inode is None
            bound.cleanup()
            assert path.exists()  # the service manager's socket stays
        finally:
            bound.sock.close()


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606, 0o666])
def test_a_socket_others_can_reach_is_refused(private_dir: Path, mode: int) -> None:
    path = private_dir / "agent.sock"
    with listening(path, mode) as original:
        fd = os.dup(original.fileno())
        with pytest.raises(ActivationError) as caught:
            adopt(fd, "agent", "systemd")
        assert _closed(fd)
    message = str(caught.value)
    assert message.startswith("refusing the socket passed by systemd:")
    assert f"mode {mode:o}" in message and "SocketMode=0600" in message


def test_a_socket_in_a_shared_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with listening(shared / "agent.sock") as original, \
            pytest.raises(ActivationError, match="writable by group or others"):
        adopt(os.dup(original.fileno()), "agent", "systemd")


def test_a_socket_that_does_not_listen_is_refused(private_dir: Path) -> None:
    with listening(private_dir / "agent.sock", listen=False) as original, \
            pytest.raises(ActivationError, match="not a listening socket"):
        adopt(os.dup(original.fileno()), "agent", "systemd")


def test_a_tcp_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as original:
        original.bind(("127.0.0.1", 0))
        original.listen()
        with pytest.raises(ActivationError, match="not a Unix stream socket"):
            adopt(os.dup(original.fileno()), "agent", "systemd")


def test_an_abstract_socket_is_refused() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as original:
        original.bind(f"\0compozy-test-{os.getpid()}")
        original.listen()
        with pytest.raises(ActivationError, match="abstract sockets are refused"):
            adopt(os.dup(original.fileno()), "agent", "systemd")


def test_a_non_socket_fd_is_refused() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ActivationError, match=f"fd {read_end} passed by launchd is not a"):
            adopt(read_end, "agent", "launchd")
    finally:
        for fd in (read_end, write_end):
            if not _closed(fd):
                os.close(fd)


# --------------------------------------------------------------------------
# launchd: launch_activate_socket(3) through ctypes, with a C-callable stand-in

_LaunchActivate = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
    ctypes.POINTER(ctypes.c_size_t),
)


class FakeLaunchd:
    """Behaves as libSystem's call: a malloc'ed int array the caller must free."""

    def __init__(self, fds: list[int], error: int = 0) -> None:
        self.libc = ctypes.CDLL(None)
        self.libc.malloc.restype = ctypes.c_void_p
        self.libc.malloc.argtypes = [ctypes.c_size_t]
        self.libc.free.restype = None
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.fds = fds
        self.error = error
        self.names: list[bytes] = []
        self.allocated: int | None = None
        self.freed: list[int | None] = []
        self.activate = _LaunchActivate(self._activate)

    def _activate(self, name: bytes, fds_out: Any, count_out: Any) -> int:
        self.names.append(name)
        if self.error:
            return self.error
        if self.fds:
            address = self.libc.malloc(ctypes.sizeof(ctypes.c_int) * len(self.fds))
            array = ctypes.cast(address, ctypes.POINTER(ctypes.c_int))
            for index, fd in enumerate(self.fds):
                array[index] = fd
            fds_out[0] = array
            self.allocated = address
        count_out[0] = len(self.fds)
        return 0

    def free(self, pointer: Any) -> None:
        address = ctypes.cast(pointer, ctypes.c_void_p).value
        self.freed.append(address)
        self.libc.free(address)


def test_launchd_fds_reads_and_frees_the_array() -> None:
    launchd = FakeLaunchd([7, 9, 11])
    assert launchd_fds("Listeners", activate=launchd.activate, free=launchd.free) == [7, 9, 11]
    assert launchd.names == [b"Listeners"]
    assert launchd.allocated is not None and launchd.freed == [launchd.allocated]


def test_launchd_fds_with_no_sockets_frees_nothing() -> None:
    launchd = FakeLaunchd([])
    assert launchd_fds(activate=launchd.activate, free=launchd.free) == []
    assert launchd.freed == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (errno.ESRCH, "not started by launchd"),
        (errno.ENOENT, "no Sockets entry named 'Listeners'"),
        (errno.EALREADY, "already taken"),
        (errno.EPERM, os.strerror(errno.EPERM)),
    ],
)
def test_launchd_errors_are_explained(error: int, message: str) -> None:
    launchd = FakeLaunchd([3], error=error)
    with pytest.raises(ActivationError, match=message):
        launchd_fds(activate=launchd.activate, free=launchd.free)
    assert launchd.freed == []


def test_launchd_is_refused_off_macos() -> None:
    with pytest.raises(ActivationError, match="--launchd is for macOS"):
        launchd_fds()
