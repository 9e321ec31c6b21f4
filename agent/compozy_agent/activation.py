"""Sockets handed to the agent by the service manager: systemd or launchd.

systemd (sd_listen_fds(3)): ``LISTEN_PID`` must be our pid, ``LISTEN_FDS``
sockets start at fd 3, ``LISTEN_FDNAMES`` names them (colon-separated). The
variables are removed afterwards, so children do not think the sockets are
theirs. No libsystemd is needed.

launchd: ``launch_activate_socket(name, &fds, &count)`` from libSystem
(launch(3)), through ctypes, for the plist's ``Sockets`` entry.

Every inherited socket still passes the checks a socket the agent binds
itself would (``server.check_inherited_socket``), and every connection on it
the peer-uid check.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import sys
from typing import Final

SD_LISTEN_FDS_START: Final = 3
#: The fd name (systemd FileDescriptorName=) of the restricted forwarding socket.
FORWARD_NAME: Final = "forward"
#: The Sockets key in the launchd plist.
LAUNCHD_SOCKET_NAME: Final = "Listeners"
_DARWIN: bool = sys.platform == "darwin"


class ActivationError(Exception):
    """The service manager passed something the agent cannot use."""


def systemd_sockets() -> list[tuple[str, socket.socket]]:
    """The (name, socket) pairs passed by systemd socket activation; [] when none."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if not count or pid != str(os.getpid()):
        return []
    try:
        number = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from None
    labels = names.split(":") if names else []
    sockets = []
    for index in range(number):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)  # sd_listen_fds sets FD_CLOEXEC too
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"fd {fd} passed by systemd is not a socket: {exc}") from None
        sockets.append((labels[index] if index < len(labels) else "unknown", sock))
    return sockets


def launchd_sockets(name: str = LAUNCHD_SOCKET_NAME) -> list[socket.socket]:
    """The sockets launchd created for the plist's ``Sockets`` entry ``name``; [] elsewhere."""
    if not _DARWIN:
        return []
    libsystem = ctypes.CDLL(ctypes.util.find_library("System") or "libSystem.dylib",
                            use_errno=True)
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    error = libsystem.launch_activate_socket(name.encode(), ctypes.byref(fds),
                                             ctypes.byref(count))
    if error != 0:  # ESRCH: not started by launchd; ENOENT: no such socket entry
        return []
    try:
        return [socket.socket(fileno=fds[i]) for i in range(count.value)]
    finally:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.free(fds)
