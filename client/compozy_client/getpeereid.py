"""The peer's uid through getpeereid(3), on Unix systems for which
:mod:`compozy_client.peercheck` knows no socket option (its ``_PEER_OPTIONS``).

Imported only there: it loads ctypes.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from compozy_client.peercheck import SupportsGetsockopt


def peer_uid_getpeereid(sock: SupportsGetsockopt) -> int | None:
    """Other Unix systems: getpeereid(3) through ctypes, when libc has it."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True)
    getpeereid = getattr(libc, "getpeereid", None)
    if getpeereid is None:
        return None
    uid = ctypes.c_uint32()
    gid = ctypes.c_uint32()
    if getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return uid.value
