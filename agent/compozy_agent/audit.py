"""The audit log: one line for every token request, who asked and what they got.

Who asked is what the kernel says: the peer's uid and pid from the socket
(``peer.py``), and on Linux the executable and command line from
``/proc/<pid>``, read while the client is connected and waiting, so the pid
cannot have been reused. On macOS the executable comes from
``proc_pidpath``; the command line is not read there. Nothing a client says
about itself is used, and no token is ever written: an entry holds the
profile, the token id, scope and audience, and the outcome (``issued`` or the
error code).

Entries are kept in memory (the newest :data:`MEMORY_ENTRIES`, for
``compozy auth log``) and appended as JSON Lines to ``audit.log`` (0600) in
the state directory, which is rotated to ``audit.log.1`` past
:data:`MAX_FILE_BYTES`. A failing write is logged once and never fails the
token request.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections import deque
from typing import Final

import msgspec

from compozy_agent.peer import Peer
from compozy_client import protocol as p

log = logging.getLogger("compozy_agent.audit")

AUDIT_FILE: Final = "audit.log"
MEMORY_ENTRIES: Final = 1000
MAX_FILE_BYTES: Final = 1024 * 1024
#: Longest command line kept, in characters over all arguments.
MAX_CMDLINE_CHARS: Final = 1024
_encoder = msgspec.json.Encoder()
#: Typed as a plain str so both branches below are checked on every platform.
_PLATFORM: str = sys.platform


class ProcessInfo(msgspec.Struct, frozen=True):
    exe: str | None = None
    cmdline: list[str] | None = None


def process_info(pid: int | None) -> ProcessInfo:
    """The executable and command line of ``pid`` as the kernel reports them, if it says."""
    if pid is None:
        return ProcessInfo()
    if _PLATFORM.startswith("linux"):
        return _linux_process(pid)
    if _PLATFORM == "darwin":
        return ProcessInfo(exe=_darwin_exe(pid))
    return ProcessInfo()


def _linux_process(pid: int) -> ProcessInfo:
    exe: str | None = None
    cmdline: list[str] | None = None
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe")
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read(MAX_CMDLINE_CHARS * 4)
        cmdline = _cap([arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]])
    return ProcessInfo(exe=exe, cmdline=cmdline)


def _cap(arguments: list[str]) -> list[str]:
    kept: list[str] = []
    left = MAX_CMDLINE_CHARS
    for argument in arguments:
        if left <= 0:
            kept.append("…")
            break
        kept.append(argument if len(argument) <= left else argument[:left] + "…")
        left -= len(argument)
    return kept


def _darwin_exe(pid: int) -> str | None:
    name = ctypes.util.find_library("proc")
    if name is None:
        return None
    buffer = ctypes.create_string_buffer(4096)  # PROC_PIDPATHINFO_MAXSIZE
    try:
        length = ctypes.CDLL(name).proc_pidpath(pid, buffer, len(buffer))
    except (OSError, AttributeError):
        return None
    return buffer.raw[:length].decode(errors="replace") if length > 0 else None


class AuditLog:
    """Recent entries in memory, all of them appended to ``path`` (when given)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._recent: deque[p.AuditEntry] = deque(maxlen=MEMORY_ENTRIES)
        self._write_failed = False
        #: The file, kept open (opening it per entry cost more than the rest of a request).
        self._fd: int | None = None
        self._size = 0


    def __repr__(self) -> str:
        return f"AuditLog({self.path!r}, {len(self._recent)} recent)"

    def record(self, entry: p.AuditEntry) -> None:
        self._recent.append(entry)
        if self.path is not None:
            # One write per entry to a file kept open (about 3 µs): batching them through
            # a writer task was measured slower, as waking the task costs more.
            self._append(_encoder.encode(entry) + b"\n")

    def recent(self, limit: int, profile: str | None = None) -> list[p.AuditEntry]:
        """The newest ``limit`` entries (of ``profile``, if given), oldest first."""
        if limit <= 0:
            return []
        matching = [e for e in self._recent if profile is None or e.profile == profile]
        return matching[-limit:]

    def _append(self, line: bytes) -> None:
        """Append to the open file; rotate past MAX_FILE_BYTES. Never raises."""
        assert self.path is not None
        try:
            if self._fd is None:
                self._fd = os.open(self.path,
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._size = os.fstat(self._fd).st_size
            if self._size and self._size + len(line) > MAX_FILE_BYTES:
                self.close()
                os.replace(self.path, self.path + ".1")
                self._append(line)
                return
            os.write(self._fd, line)
            self._size += len(line)
        except OSError as exc:
            self.close()
            if not self._write_failed:
                log.error("cannot write the audit log %s: %s; entries are kept in memory",
                          self.path, exc.strerror)
                self._write_failed = True
        else:
            self._write_failed = False

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def entry_for(
    request: p.Token,
    peer: Peer,
    process: ProcessInfo,
    socket_kind: str,
    now: float,
    *,
    result: p.TokenResult | None = None,
    error_code: str | None = None,
) -> p.AuditEntry:
    """The audit entry for one token request; never holds the token."""
    return p.AuditEntry(
        time=now,
        profile=result.profile if result is not None and result.profile else request.profile,
        outcome="issued" if result is not None else (error_code or "failed"),
        token_id=result.token_id if result is not None else request.token_id,
        kind=result.kind if result is not None else None,
        scope=request.scope,
        audience=request.audience,
        socket_kind=socket_kind,
        uid=peer.uid,
        pid=peer.pid,
        exe=process.exe,
        cmdline=process.cmdline,
    )
