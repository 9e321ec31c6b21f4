"""Who is on the other end of a Unix socket, as the kernel reports it.

Linux: ``SO_PEERCRED`` (pid, uid, gid). macOS and the BSDs: ``getpeereid(3)``
through ctypes for uid/gid, and ``LOCAL_PEERPID`` for the pid on macOS. A
client's own claims about itself are never used.
"""

from __future__ import annotations

import socket
import struct
import sys

import msgspec


class Peer(msgspec.Struct, frozen=True):
    """A connected client: kernel-reported credentials (pid may be None on some BSDs)."""

    uid: int
    gid: int
    pid: int | None


class PeerCredentialsUnavailable(Exception):
    """The platform did not tell who the peer is; such a peer is refused."""


_LINUX: bool = sys.platform.startswith("linux")


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process connected to ``sock``."""
    if _LINUX:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return Peer(uid=uid, gid=gid, pid=pid or None)
    return _peer_bsd(sock)


def _peer_bsd(sock: socket.socket) -> Peer:
    # Imported here: ctypes.util alone costs Linux's agent start about 5 ms.
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        raise PeerCredentialsUnavailable("no C library to call getpeereid")
    libc = ctypes.CDLL(libc_name, use_errno=True)
    uid = ctypes.c_uint32()
    gid = ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise PeerCredentialsUnavailable(f"getpeereid failed: errno {ctypes.get_errno()}")
    pid: int | None = None
    if sys.platform == "darwin":
        sol_local, local_peerpid = 0, 0x002  # <sys/un.h>
        try:
            raw = sock.getsockopt(sol_local, local_peerpid, struct.calcsize("i"))
            pid = struct.unpack("i", raw)[0]
        except OSError:
            pid = None
    return Peer(uid=uid.value, gid=gid.value, pid=pid)
