"""The audit log: every token request, who asked and what they got.

Who asked is bound when the caller *connects*, not when it asks
(:func:`capture`, called at accept, before any line is read):

* The kernel vouches for the peer's uid and pid (``SO_PEERCRED``, from
  ``peer.py``) and, on Linux, for the executable (``/proc/<pid>/exe``) and the
  process's start time (``/proc/<pid>/stat`` field 22, clock ticks since
  boot). They are read through one directory fd on ``/proc/<pid>``, so all
  from one process. Where the kernel has ``SO_PEERPIDFD`` (Linux 6.5+) the
  agent holds a pidfd of the connecting process meanwhile and then checks it
  is still alive, so a pid reused between connect and accept is never read;
  without it (older kernels) that window, between connect and accept, is
  open. A process that had already exited is recorded as gone.
* The command line is what the program says about itself: a process can
  rewrite its own argv. It is kept apart (``self_reported_argv``) and never
  used to decide anything.
* The ``/proc/<pid>`` fd is kept for the connection's life. It stands for the
  process, not the number: at each token request the agent looks through it
  (:meth:`ConnectedProcess.at_request`, one ``readlinkat``) and records
  whether the connecting process still runs what it ran (``same``), has
  exec'd another executable (``exec``, with ``exe_at_request``), or has
  exited (``gone``: a process that inherited or was passed the connection
  asked; the pid may belong to someone else by now and is never read again).
  The entry keeps what connected. An exec of the same executable is not seen
  (nothing the kernel shows changes but argv), nor is anything about a
  process that made itself non-dumpable (the kernel hides its executable).

On macOS the executable comes from ``proc_pidpath`` at connect; start time,
argv and the later look are not available there.

No token is ever written: an entry holds the profile, the token id, scope and
audience, and the outcome (``issued`` or the error code).

A flood must not erase what matters:

* Identical requests (same caller process, same request, same outcome) within
  :data:`COLLAPSE_WINDOW` seconds of the first are counted into one more entry
  (``count``, ``time`` .. ``last_time``), written when the window ends; the
  first is written at once.
* One caller process gets at most :data:`FAILURES_PER_CALLER` distinct failed
  entries per window; its further failures, whatever they ask, are counted
  into one ``more_failures`` entry (profile ``*``). A forwarded host's
  requests all come from one ssh daemon, so this bounds what it can write.
* Issued tokens and failed requests are kept apart, in memory (the newest
  :data:`MEMORY_ENTRIES` of each) and on disk: ``audit.log`` holds issued
  tokens, ``audit-failed.log`` the rest, each rotated past
  :data:`MAX_FILE_BYTES` through :data:`ROTATIONS` older files. No number of
  failed requests can rotate an issued entry away.

Files are JSON Lines, opened ``O_NOFOLLOW`` (a symbolic link is refused, never
followed), refused when another uid owns them, and set to 0600 whatever their
mode was. Characters JSON leaves raw (DEL, C1, bidi overrides) are escaped
too, so ``cat``-ing the file cannot drive a terminal. A failing write is
logged once, shown in ``status``, and never fails a token request; the
entries stay in memory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections import OrderedDict, deque
from typing import Final

import anyio
import msgspec

from compozy_agent.clock import Clock
from compozy_agent.peer import Peer
from compozy_client import protocol as p
from compozy_client.safetext import json_bytes

log = logging.getLogger("compozy_agent.audit")

AUDIT_FILE: Final = "audit.log"
FAILED_FILE: Final = "audit-failed.log"
#: Entries kept in memory for ``compozy auth log``, of issued and of failed requests each.
MEMORY_ENTRIES: Final = 1000
MAX_FILE_BYTES: Final = 1024 * 1024
#: Older files kept per log: ``audit.log.1`` ... ``audit.log.4``.
ROTATIONS: Final = 4
#: Seconds during which identical requests are counted into one entry.
COLLAPSE_WINDOW: Final = 60.0
#: Distinct failed entries one caller process may add per window; the rest are counted.
FAILURES_PER_CALLER: Final = 10
#: The outcome of the entry counting a caller's failures past its budget.
MORE_FAILURES: Final = "more_failures"
#: Windows open at once; past this the oldest is closed (and written) early.
MAX_OPEN_WINDOWS: Final = 1024
#: Longest command line kept, in characters over all arguments.
MAX_CMDLINE_CHARS: Final = 1024
#: ``SO_PEERPIDFD`` from <asm-generic/socket.h> (Linux 6.5); Python 3.11 does not name it.
SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)
_encoder = msgspec.json.Encoder()
#: Typed as a plain str so both branches below are checked on every platform.
_PLATFORM: str = sys.platform


class ProcessInfo(msgspec.Struct, frozen=True):
    """The connecting process, as read when it connected."""

    #: Kernel-vouched: the executable it ran.
    exe: str | None = None
    #: Self-reported: its argv, which a program may rewrite.
    cmdline: list[str] | None = None
    #: Kernel-vouched: its start time (clock ticks since boot), which tells a reused pid apart.
    start_time: int | None = None
    #: It had exited before the agent could look: nothing about it is known.
    gone: bool = False


# --------------------------------------------------------------------------
# Who connected.


class ConnectedProcess:
    """Who connected on one connection: what was read then, and a handle to look again.

    The handle is a directory fd on ``/proc/<pid>``, opened at accept. It stands
    for that process, not for the number: once the process is gone, reads
    through it fail (``ESRCH``) even when the pid has been given to another.
    """

    __slots__ = ("_procfd", "info")

    def __init__(self, info: ProcessInfo, procfd: int | None = None) -> None:
        self.info = info
        self._procfd = procfd

    def __repr__(self) -> str:
        return f"ConnectedProcess({self.info!r})"

    def at_request(self) -> tuple[str | None, str | None]:
        """``(process_at_request, exe_at_request)``: is the connecting process still the one
        that connected, running what it ran?

        ``same``; ``exec`` with the executable it runs now; ``gone`` (exited, its pid
        is never read again); ``None`` when it cannot be told (no ``/proc``, or a
        process that made itself non-dumpable hides its executable).
        """
        if self.info.gone:
            return "gone", None
        if self._procfd is None:
            return None, None
        try:
            exe = os.readlink("exe", dir_fd=self._procfd)
        except (FileNotFoundError, ProcessLookupError):  # a zombie; reaped
            return "gone", None
        except OSError:
            try:
                os.stat("stat", dir_fd=self._procfd)
            except ProcessLookupError:
                return "gone", None
            except OSError:
                pass
            return None, None
        return ("same", None) if exe == self.info.exe else ("exec", exe)

    def close(self) -> None:
        if self._procfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._procfd)
            self._procfd = None


def capture(sock: socket.socket, pid: int | None) -> ConnectedProcess:
    """Who is connected on ``sock`` (whose peer pid is ``pid``), read now; never raises.

    Close the result when the connection ends.
    """
    if pid is None:
        return ConnectedProcess(ProcessInfo())
    if _PLATFORM == "darwin":
        return ConnectedProcess(ProcessInfo(exe=_darwin_exe(pid)))
    if not _PLATFORM.startswith("linux"):
        return ConnectedProcess(ProcessInfo())
    try:
        pidfd: int | None = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return ConnectedProcess(ProcessInfo(gone=True))
        pidfd = None  # ENOPROTOOPT: a kernel before 6.5
    try:
        connected = _open_process(pid)
        if pidfd is not None and not connected.info.gone and not _alive(pidfd):
            # The connector exited after the pid was opened: the pid may be another's.
            connected.close()
            return ConnectedProcess(ProcessInfo(gone=True))
        return connected
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _alive(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has not been reaped (its pid is still its own)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM and the like: it exists
    return True


def process_info(pid: int | None) -> ProcessInfo:
    """What the kernel says about ``pid`` now (Linux, macOS); gone when there is no such
    process or it has exited."""
    if pid is None:
        return ProcessInfo()
    if _PLATFORM == "darwin":
        return ProcessInfo(exe=_darwin_exe(pid))
    if not _PLATFORM.startswith("linux"):
        return ProcessInfo()
    connected = _open_process(pid)
    connected.close()
    return connected.info


def _open_process(pid: int) -> ConnectedProcess:
    """``/proc/<pid>`` opened, and read through that one handle (so all from one process)."""
    try:
        procfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return ConnectedProcess(ProcessInfo(gone=True))
    except OSError as exc:  # out of descriptors, say: unknown, which is not the same as gone
        log.debug("cannot look at pid %d: %s", pid, exc.strerror)
        return ConnectedProcess(ProcessInfo())
    info = _linux_process(procfd)
    if info.gone:
        os.close(procfd)
        return ConnectedProcess(info)
    return ConnectedProcess(info, procfd)


def _linux_process(procfd: int) -> ProcessInfo:
    exe: str | None = None
    cmdline: list[str] | None = None
    with contextlib.suppress(OSError):
        exe = os.readlink("exe", dir_fd=procfd)
    with contextlib.suppress(OSError):
        fd = os.open("cmdline", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
        with open(fd, "rb") as file:
            raw = file.read(MAX_CMDLINE_CHARS * 4)
        cmdline = _cap([arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]])
    try:
        start_time = _start_time(procfd)
    except OSError:  # out of descriptors, say: what was read stands, the start time is unknown
        return ProcessInfo(exe=exe, cmdline=cmdline)
    if start_time is None:
        return ProcessInfo(gone=True)
    return ProcessInfo(exe=exe, cmdline=cmdline, start_time=start_time)


def _start_time(procfd: int) -> int | None:
    """Field 22 of ``stat``: when the process started, in clock ticks since boot.

    None when the process has exited (reaped, or a zombie not yet reaped); other
    failures (out of descriptors) raise ``OSError``.
    """
    try:
        fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')'.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        state, start_time = fields[0], int(fields[22 - 3])
    except (IndexError, ValueError):
        return None
    return None if state in (b"Z", b"X") else start_time


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
    import ctypes  # macOS only; ctypes.util alone costs Linux's agent start about 5 ms
    import ctypes.util

    name = ctypes.util.find_library("proc")
    if name is None:
        return None
    buffer = ctypes.create_string_buffer(4096)  # PROC_PIDPATHINFO_MAXSIZE
    try:
        length = ctypes.CDLL(name).proc_pidpath(pid, buffer, len(buffer))
    except (OSError, AttributeError):
        return None
    return buffer.raw[:length].decode(errors="replace") if length > 0 else None


# --------------------------------------------------------------------------
# Private files.


class UnsafeLogFile(OSError):
    """A log file that must not be written: a symbolic link, not a file, or another user's."""


def open_private_log(path: str) -> int:
    """Open ``path`` for appending as a 0600 file of ours; never follows a symbolic link.

    Raises :class:`UnsafeLogFile` (saying what is wrong and what to do) or ``OSError``.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeLogFile(
                exc.errno, f"{path} is a symbolic link; refusing to follow it (remove it if "
                "you did not put it there)") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeLogFile(errno.EINVAL, f"{path} is not a regular file")
        if info.st_uid != os.getuid():
            raise UnsafeLogFile(
                errno.EPERM, f"{path} belongs to uid {info.st_uid}, not to you; refusing to "
                "write to it (remove it)")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)  # a file made 0644 by hand, or by an older agent's umask
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _RotatingFile:
    """A JSON Lines file kept open, rotated past ``max_bytes`` through ``rotations`` files."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problem: str | None = None
        self._fd: int | None = None
        self._size = 0

    def open(self) -> None:
        """Open now (at start), so a refused file is known before any request."""
        self.write(b"")

    def write(self, line: bytes) -> None:
        """Append ``line``; rotate when it would not fit. Never raises."""
        try:
            if self._fd is None:
                self._fd = open_private_log(self.path)
                self._size = os.fstat(self._fd).st_size
            if not line:
                pass
            elif self._size and self._size + len(line) > MAX_FILE_BYTES:
                self._rotate()
                self._fd = open_private_log(self.path)
                self._size = 0
            if line:
                os.write(self._fd, line)
                self._size += len(line)
        except OSError as exc:
            self.close()
            reason = exc.strerror if isinstance(exc, UnsafeLogFile) else (
                f"cannot write {self.path}: {exc.strerror or type(exc).__name__}")
            if self.problem is None:
                log.error("audit log: %s; entries are kept in memory", reason)
            self.problem = reason
        else:
            if self.problem is not None:
                log.info("audit log: writing %s again", self.path)
            self.problem = None

    def _rotate(self) -> None:
        self.close()
        # Renames replace a name, never write through it: a planted link is replaced.
        for n in range(ROTATIONS - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------
# The log.

_Key = tuple[object, ...]


def _caller(entry: p.AuditEntry) -> _Key:
    """Same caller process (a pid with its start time), on the same socket."""
    return ("caller", entry.socket_kind, entry.uid, entry.pid, entry.start_time, entry.exe)


def _key(entry: p.AuditEntry) -> _Key:
    """Same caller process, same request, same outcome."""
    return (*_caller(entry)[1:], entry.process_at_request, entry.exe_at_request,
            entry.profile, entry.outcome, entry.token_id, entry.kind,
            tuple(entry.scope or ()), entry.audience)


class _Window:
    """Requests of one key (or one caller's failures) since ``opened_at``."""

    __slots__ = ("distinct", "opened_at", "repeats")

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        #: The entry counting what is not written one by one; None until there is one.
        self.repeats: p.AuditEntry | None = None
        #: For a caller's window: the distinct failed entries written in it.
        self.distinct = 0


class AuditLog:
    """Recent entries in memory; written to ``<dir>/audit.log`` and ``audit-failed.log``
    when a directory is given."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._issued: deque[p.AuditEntry] = deque(maxlen=MEMORY_ENTRIES)
        self._failed: deque[p.AuditEntry] = deque(maxlen=MEMORY_ENTRIES)
        self._windows: OrderedDict[_Key, _Window] = OrderedDict()
        self._files: dict[bool, _RotatingFile] = {}
        #: Set when a window opens, for :meth:`run` (made there, inside the event loop).
        self._window_opened: anyio.Event | None = None
        if directory is not None:
            self._files = {True: _RotatingFile(os.path.join(directory, AUDIT_FILE)),
                           False: _RotatingFile(os.path.join(directory, FAILED_FILE))}

    def __repr__(self) -> str:
        return f"AuditLog({self.directory!r}, {len(self._issued) + len(self._failed)} recent)"

    @property
    def path(self) -> str | None:
        """The file of issued tokens, if any."""
        file = self._files.get(True)
        return file.path if file is not None else None

    @property
    def failed_path(self) -> str | None:
        """The file of failed requests, if any."""
        file = self._files.get(False)
        return file.path if file is not None else None

    def open(self) -> None:
        """Open the files now, so a refused one is logged and shown before any request."""
        for file in self._files.values():
            file.open()

    def warnings(self) -> list[str]:
        """What ``status`` should say: files that cannot be written."""
        return [f"audit log: {file.problem}; entries are kept in memory only"
                for file in self._files.values() if file.problem is not None]

    def record(self, entry: p.AuditEntry) -> None:
        """Record one request; identical ones within the window are counted instead."""
        self.flush(entry.time)
        key = _key(entry)
        window = self._windows.get(key)
        if window is None:
            if entry.outcome != "issued":
                caller = self._window(_caller(entry), entry.time)
                if caller.distinct >= FAILURES_PER_CALLER:
                    self._count(caller, msgspec.structs.replace(
                        entry, profile="*", outcome=MORE_FAILURES, token_id=None, kind=None,
                        scope=None, audience=None))
                    return
                caller.distinct += 1
            self._window(key, entry.time)
            self._keep(entry)
            self._write(entry)
        else:
            self._count(window, entry)

    def _window(self, key: _Key, now: float) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(now)
            if self._window_opened is not None:
                self._window_opened.set()
            if len(self._windows) > MAX_OPEN_WINDOWS:
                self._close_window(*self._windows.popitem(last=False))
        return window

    def _count(self, window: _Window, entry: p.AuditEntry) -> None:
        if window.repeats is None:
            window.repeats = msgspec.structs.replace(entry, count=1, last_time=entry.time)
            self._keep(window.repeats)
        else:
            window.repeats.count += 1
            window.repeats.last_time = entry.time

    def flush(self, now: float) -> None:
        """Write the repeats of every window that has ended by ``now``."""
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.opened_at < COLLAPSE_WINDOW:
                break
            del self._windows[key]
            self._close_window(key, window)

    def _close_window(self, key: _Key, window: _Window) -> None:
        if window.repeats is not None:
            self._write(window.repeats)

    async def run(self, clock: Clock) -> None:
        """Close windows as they end (so counts reach the file without new requests)."""
        while True:
            if not self._windows:  # idle: no wakeups until a request comes
                self._window_opened = anyio.Event()
                await self._window_opened.wait()
                continue
            oldest = next(iter(self._windows.values()))
            await clock.sleep_until(oldest.opened_at + COLLAPSE_WINDOW)
            self.flush(clock.now())

    def recent(self, limit: int, profile: str | None = None,
               outcome: str | None = None) -> list[p.AuditEntry]:
        """The newest ``limit`` entries (of ``profile``, if given), oldest first.

        Issued and failed entries are each bounded on their own; ``outcome``
        (``issued`` or ``failed``) picks one kind, else both are merged by time.
        """
        if limit <= 0:
            return []
        kept = {"issued": self._issued, "failed": self._failed}.get(outcome or "")
        candidates = kept if kept is not None else (*self._issued, *self._failed)
        matching = [e for e in candidates if profile is None or e.profile == profile]
        matching.sort(key=lambda e: e.time)
        return matching[-limit:]

    def _keep(self, entry: p.AuditEntry) -> None:
        (self._issued if entry.outcome == "issued" else self._failed).append(entry)

    def _write(self, entry: p.AuditEntry) -> None:
        file = self._files.get(entry.outcome == "issued")
        if file is not None:
            # One write per entry to a file kept open (about 3 µs): batching them through
            # a writer task was measured slower, as waking the task costs more.
            file.write(json_bytes(_encoder.encode(entry)) + b"\n")

    def close(self) -> None:
        """Write every open window's repeats and close the files."""
        while self._windows:
            self._close_window(*self._windows.popitem(last=False))
        for file in self._files.values():
            file.close()


def entry_for(
    request: p.Token | p.DpopProof,
    peer: Peer,
    process: ProcessInfo,
    socket_kind: str,
    now: float,
    *,
    result: p.TokenResult | p.DpopProofResult | None = None,
    error_code: str | None = None,
    at_request: tuple[str | None, str | None] = (None, None),
) -> p.AuditEntry:
    """The audit entry for one token request (or DPoP proof, with its token); never holds
    the token or the proof."""
    scope = request.scope if isinstance(request, p.Token) else None
    audience = request.audience if isinstance(request, p.Token) else None
    return p.AuditEntry(
        time=now,
        profile=result.profile if result is not None and result.profile else request.profile,
        outcome="issued" if result is not None else (error_code or "failed"),
        token_id=result.token_id if result is not None else request.token_id,
        kind=("dpop_proof" if isinstance(result, p.DpopProofResult) else result.kind)
        if result is not None else None,
        scope=scope,
        audience=audience,
        socket_kind=socket_kind,
        uid=peer.uid,
        pid=peer.pid,
        exe=process.exe,
        start_time=process.start_time,
        process_at_request=at_request[0],
        exe_at_request=at_request[1],
        self_reported_argv=process.cmdline,
    )
