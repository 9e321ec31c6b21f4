"""Sockets handed to the agent by the service manager: systemd or launchd.

systemd, as sd_listen_fds(3) and sd_listen_fds_with_names(3) specify, without
libsystemd:

* ``LISTEN_PID`` must be our pid; otherwise the variables were meant for
  another process (a parent) and nothing was passed to us.
* ``LISTEN_FDS`` sockets are open, starting at fd 3 (``SD_LISTEN_FDS_START``).
* ``LISTEN_FDNAMES`` names them, colon-separated, one name per fd; without it
  every fd is named ``unknown``. A count that does not match is an error.
* The three variables are removed in every case (``unset_environment``), so
  children we start never take the sockets for theirs, and each fd gets
  ``FD_CLOEXEC``.

launchd (macOS): ``launch_activate_socket(name, &fds, &count)`` from libSystem
(launch(3)), through ctypes, for the plist's ``Sockets`` entry ``name``; the
fd array is the caller's to ``free``.

A passed socket is served only when it passes the checks a socket the agent
binds itself would (``server.check_inherited_socket``: a listening Unix
stream socket, ours, mode 0600-or-tighter in a directory private to us); each
connection on it then gets the server's peer-uid check. An fd named
``forward`` is served as the restricted forwarding socket.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Final

from compozy_agent.server import BoundSocket, SocketSetupError, check_inherited_socket

SD_LISTEN_FDS_START: Final = 3
LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: The fd name (systemd ``FileDescriptorName=``) of the restricted forwarding socket.
FORWARD_NAME: Final = "forward"
#: The ``Sockets`` key in the launchd plist.
LAUNCHD_SOCKET_NAME: Final = "Listeners"
_LIBSYSTEM: Final = "/usr/lib/libSystem.B.dylib"
# A plain bool, not a sys.platform test in place: mypy would call the macOS
# branch unreachable on Linux.
_DARWIN: bool = sys.platform == "darwin"

#: ``int launch_activate_socket(const char *name, int **fds, size_t *cnt)``
LaunchActivate = Callable[[bytes, Any, Any], int]


class ActivationError(Exception):
    """The service manager passed something the agent cannot use safely."""


# --------------------------------------------------------------------------
# systemd


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[str]:
    """The names of the fds passed to process ``pid``, in fd order from fd 3.

    Empty when nothing was passed to ``pid``. Raises :class:`ActivationError`
    where libsystemd returns ``-EINVAL``. Pure: reads ``environ`` only.
    """
    raw_pid = environ.get("LISTEN_PID")
    if raw_pid is None:
        return []
    if not raw_pid.isdigit() or int(raw_pid) <= 0:
        raise ActivationError(f"LISTEN_PID={raw_pid!r} is not a process id")
    if int(raw_pid) != pid:
        return []  # meant for another process, e.g. the one that started us
    raw_count = environ.get("LISTEN_FDS")
    if raw_count is None:
        return []
    if not raw_count.isdigit() or not 0 < int(raw_count) <= 0x7FFF_FFFF - SD_LISTEN_FDS_START:
        raise ActivationError(f"LISTEN_FDS={raw_count!r} is not a positive number of fds")
    count = int(raw_count)
    raw_names = environ.get("LISTEN_FDNAMES")
    if raw_names is None:
        return ["unknown"] * count
    names = raw_names.split(":")  # empty names are kept, as libsystemd keeps them
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES names {len(names)} fds but LISTEN_FDS={count}"
        )
    return names


def systemd_fds(
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    first_fd: int = SD_LISTEN_FDS_START,
) -> list[tuple[int, str]]:
    """Take the fds systemd passed us: ``(fd, name)`` pairs, ``[]`` when none.

    ``environ`` (default ``os.environ``) loses the ``LISTEN_*`` variables
    whatever the outcome. ``pid`` and ``first_fd`` exist for tests.
    """
    environ = os.environ if environ is None else environ
    try:
        names = parse_listen_env(environ, os.getpid() if pid is None else pid)
    finally:
        for variable in LISTEN_VARIABLES:
            environ.pop(variable, None)
    passed = list(enumerate(names, start=first_fd))
    for fd, _ in passed:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            raise ActivationError(
                f"fd {fd} named in LISTEN_FDS is not open ({exc.strerror})"
            ) from None
    return passed


# --------------------------------------------------------------------------
# launchd


def launchd_fds(
    name: str = LAUNCHD_SOCKET_NAME,
    *,
    activate: LaunchActivate | None = None,
    free: Callable[[Any], object] | None = None,
) -> list[int]:
    """The fds launchd created for the plist's ``Sockets`` entry ``name``.

    ``activate`` and ``free`` default to libSystem's ``launch_activate_socket``
    and ``free``; tests pass C-callable stand-ins.
    """
    if activate is None or free is None:
        activate, free = _libsystem()
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    # launch(3): returns 0 or an errno value (it does not set errno).
    error = activate(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if error != 0:
        raise ActivationError(_launchd_failure(name, error))
    try:
        return [fds[index] for index in range(count.value)]
    finally:
        if fds:
            free(fds)


def _libsystem() -> tuple[LaunchActivate, Callable[[Any], object]]:
    if not _DARWIN:
        raise ActivationError("--launchd is for macOS: launchd socket activation exists only there")
    library = ctypes.CDLL(_LIBSYSTEM, use_errno=True)
    activate = library.launch_activate_socket
    activate.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
                         ctypes.POINTER(ctypes.c_size_t)]
    activate.restype = ctypes.c_int
    free = library.free
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    return activate, free


def _launchd_failure(name: str, error: int) -> str:
    reason = {
        errno.ESRCH: "this process was not started by launchd (--launchd belongs in "
        "the LaunchAgent plist only)",
        errno.ENOENT: f"the plist has no Sockets entry named {name!r}",
        errno.EALREADY: "the sockets were already taken by this process",
    }.get(error, os.strerror(error))
    return f"launch_activate_socket({name!r}) failed: {reason}"


# --------------------------------------------------------------------------
# Checks


def adopt(fd: int, name: str, manager: str) -> BoundSocket:
    """A passed fd as a :class:`BoundSocket`, after the checks a bound one would pass.

    ``manager`` ("systemd", "launchd") only words the error. The socket is
    the service manager's: no lock, and it is not unlinked at exit.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(
            f"fd {fd} passed by {manager} is not a socket ({exc.strerror})"
        ) from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise SocketSetupError(f"fd {fd} is not a Unix stream socket (ListenStream=<path>)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketSetupError(f"fd {fd} is not a listening socket (Accept=no)")
        path = check_inherited_socket(sock)
    except (SocketSetupError, OSError) as exc:
        sock.close()  # our copy only: the service manager keeps its own
        raise ActivationError(f"refusing the socket passed by {manager}: {exc}") from None
    kind = "forward" if name == FORWARD_NAME else "full"
    return BoundSocket(sock, path, kind)


def inherited_sockets(*, launchd: bool = False) -> list[BoundSocket]:
    """Every socket the service manager passed, checked; ``[]`` when none was.

    systemd's are taken whenever ``LISTEN_PID`` names us; launchd's only when
    ``launchd`` (the plist's ``--launchd``), since asking launchd is an IPC
    that fails for a process it did not start.
    """
    passed = [(fd, name, "systemd") for fd, name in systemd_fds()]
    if launchd:
        for fd in launchd_fds():
            os.set_inheritable(fd, False)  # as sd_listen_fds(3) does with systemd's
            passed.append((fd, "agent", "launchd"))
    bound: list[BoundSocket] = []
    try:
        for fd, name, manager in passed:
            bound.append(adopt(fd, name, manager))
    except BaseException:
        for item in bound:
            item.sock.close()
        raise
    if bound and not any(item.kind == "full" for item in bound):
        for item in bound:
            item.sock.close()
        raise ActivationError(
            "the service manager passed only a forwarding socket; the agent needs its "
            "main socket too"
        )
    return bound
