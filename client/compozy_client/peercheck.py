"""Is the socket we are about to talk to our own agent's? Checked before a byte is sent.

The client sends the agent API keys (``login --with-api-key``), unlock
passphrases and token requests, so it must know who listens. Three checks,
as ssh does for its agent socket and its keys:

1. before connecting, the socket's directory is ours and not writable by group
   or others (else anyone could have put their own socket there);
2. before connecting, the socket file is ours;
3. after connecting, the kernel's word on the listening process
   (``SO_PEERCRED`` on Linux, ``LOCAL_PEERCRED`` on macOS and FreeBSD, their
   equivalents on OpenBSD and NetBSD) says it runs as our uid.

The third is the one that cannot be raced: it is asked of the connected
socket itself. The first two say what is wrong before anything connects, so
the message can say how to fix it.

Each check returns a message saying what is wrong and how to fix it, or None.
This module imports only ``os``, ``stat`` and ``sys`` (already loaded at
interpreter start): ``compozy auth token``'s fast path runs it on every call, and
where bytecode is not cached compiles it every time, so what only other systems
need (:mod:`compozy_client.getpeereid`, through ctypes) is imported where used.
The agent has its own peer check (``compozy_agent.peer``); the client never
imports the agent.
"""

from __future__ import annotations

import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class SupportsGetsockopt(Protocol):
        """A connected socket: ``socket.socket``, ``_socket.socket``, asyncio's wrapper."""

        def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

        def fileno(self) -> int: ...


_FIX_PATH = ("set XDG_RUNTIME_DIR or COMPOZY_AGENT_SOCK to a directory only you can "
             "write (e.g. mkdir -m 700 ~/.compozy-run; "
             "export COMPOZY_AGENT_SOCK=~/.compozy-run/agent.sock)")


def socket_path_problem(path: str) -> str | None:
    """Why the socket at ``path`` must not be connected to, or None.

    None too when the directory or socket does not exist yet: connecting then
    fails on its own, and an agent we start creates them privately.
    Symbolic links are followed: what counts is the directory and the socket
    that ``connect`` reaches.
    """
    directory = os.path.dirname(os.path.abspath(path))
    uid = os.getuid()
    try:
        info = os.stat(directory)
    except OSError:
        return None
    if info.st_uid != uid:
        return (f"the socket directory {directory} belongs to uid {info.st_uid}, not to you "
                f"(uid {uid}): someone else created it first, and controls what listens "
                f"there; {_FIX_PATH}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"the socket directory {directory} is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):o}), so anyone could have put their own "
                f"socket there; run: chmod 700 {directory}")
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return (f"{path} is not a socket; remove it, or set COMPOZY_AGENT_SOCK to your "
                "agent's socket")
    if info.st_uid != uid:
        return (f"the agent socket {path} belongs to uid {info.st_uid}, not to you (uid {uid}); "
                f"remove it (rm {path}) and run the command again")
    return None


def peer_problem(sock: SupportsGetsockopt, path: str) -> str | None:
    """Why the process listening on the connected ``sock`` must not be sent anything, or None."""
    uid = os.getuid()
    try:
        peer = peer_uid(sock)
    except OSError as exc:
        return (f"cannot tell which user listens on {path} "
                f"({exc.strerror or exc.__class__.__name__}); nothing was sent to it")
    if peer is None:
        return (f"cannot tell which user listens on {path}: this platform reports no peer "
                "credentials; nothing was sent to it")
    if peer != uid:
        return (f"the agent socket {path} is served by a process of uid {peer}, not by you "
                f"(uid {uid}): another user is listening there, and was sent nothing; "
                f"stop using this socket: {_FIX_PATH}")
    return None


# (level, option, buffer size, offset of the uid, offset and value of a version field)
# from each system's headers; the uid is a native-endian 32-bit integer everywhere.
#   Linux   SO_PEERCRED    struct ucred        {pid_t pid; uid_t uid; gid_t gid;}
#   OpenBSD SO_PEERCRED    struct sockpeercred {uid_t uid; gid_t gid; pid_t pid;}
#   NetBSD  LOCAL_PEEREID  struct unpcbid      {pid_t unp_pid; uid_t unp_euid; ...}
#   macOS, FreeBSD, DragonFly: LOCAL_PEERCRED  struct xucred {u_int cr_version; uid_t cr_uid; ...}
#     (SOL_LOCAL 0, LOCAL_PEERCRED 1, XUCRED_VERSION 0; the kernel copies at most the buffer)
_PEER_OPTIONS: dict[str, tuple[int, int, int, int, int | None]] = {
    "linux": (1, 17, 12, 4, None),
    "openbsd": (0xFFFF, 0x1022, 12, 0, None),
    "netbsd": (0, 0x0003, 12, 4, None),
    "darwin": (0, 0x001, 128, 4, 0),
    "freebsd": (0, 0x001, 128, 4, 0),
    "dragonfly": (0, 0x001, 128, 4, 0),
}


def peer_uid(sock: SupportsGetsockopt) -> int | None:
    """The uid of the process on the other end of the connected Unix socket ``sock``.

    As the kernel reports it; None where this platform has no way to say.
    """
    platform = next((name for name in _PEER_OPTIONS if sys.platform.startswith(name)), None)
    if platform is None:
        from compozy_client.getpeereid import peer_uid_getpeereid

        return peer_uid_getpeereid(sock)
    level, option, size, uid_at, version = _PEER_OPTIONS[platform]
    raw = sock.getsockopt(level, option, size)
    if len(raw) < uid_at + 4:
        return None
    if version is not None and int.from_bytes(raw[:4], sys.byteorder) != version:
        return None  # a struct layout we do not know
    return int.from_bytes(raw[uid_at:uid_at + 4], sys.byteorder)
