"""The agent's socket: a private place to bind, who may connect, framing, dispatch.

Rules, after ssh-agent (``ssh-agent.c``):

* The socket sits in a directory that is ours and 0700 (created so, with the
  umask tight around ``bind``); the socket itself is 0600.
* One agent per socket: an exclusive ``flock`` on ``<socket>.lock`` is held for
  the agent's life. With the lock held, a socket file that still answers
  belongs to someone else (a systemd socket, say) and we refuse; one that does
  not answer is stale and is replaced.
* Every accepted connection's peer uid (from the kernel) must be ours, else it
  is closed at once and logged, with nothing sent. Who connected (executable,
  start time) is read then, before any line (``audit.capture``).
* A ``token`` request is answered only if the agent is still unlocked when
  its token is ready: a lock that came while it waited wins.
* Lines are at most ``MAX_LINE_BYTES``; a longer one gets ``line_too_long``
  and the connection is closed (its framing cannot be trusted any more).
  Malformed requests, whatever they hold, get a typed error and the connection
  stays open. A line the client ends by closing its side for writing, without
  its newline, is not served (it may be cut short) but answered ``bad_request``.
* No input ends the agent: a connection whose handling fails in a way nobody
  foresaw is logged (without its contents) and closed alone, and a failing
  ``accept`` (out of descriptors, say) is retried with backoff.
* A connection is idle while the agent waits for its next request or for it
  to read an answer; blank lines are not requests. A connection idle longer
  than ``idle_timeout`` is closed.
* Every line, blank or not, gives the other connections a turn: a connection
  whose buffer holds many lines cannot keep the event loop to itself.
* Each socket kind (main, forwarding) has its own pool of at most
  ``max_connections``, lowered to fit the open-file limit: a full forwarding
  socket never takes a place on the main one. A new connection to a full pool
  closes that pool's longest-idle connection; only when every connection in it
  has a request in flight does the newcomer get ``busy`` and is closed.
* Requests on a connection are answered in order, one response each.
* ``exec_socket`` (``compozy exec``) binds a socket of its own for a child
  process, 0600 in a 0700 ``exec`` directory beside the main socket, with a
  name nobody can guess. It serves what the forwarding socket serves, for one
  profile and at most the scope and audience asked for (``ExecGrant``); its
  connections have the same peer check. It is removed, and its connections
  closed, when the connection that asked for it closes, which is never closed
  for idleness. One process holds at most ``MAX_EXEC_SOCKETS_PER_PROCESS`` of
  them, the agent at most ``MAX_EXEC_SOCKETS``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import reprlib
import resource
import secrets
import socket
import stat
import time
import traceback
from collections.abc import Iterator
from typing import Any, Final, assert_never

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from compozy_agent.agent_lock import AgentLock
from compozy_agent.audit import (
    AuditLog,
    ConnectedProcess,
    ProcessInfo,
    UnsafeLogFile,
    capture,
    entry_for,
    open_private_log,
)
from compozy_agent.backend import Backend, OpError
from compozy_agent.clock import Clock, SystemClock
from compozy_agent.peer import Peer, PeerCredentialsUnavailable, peer_of
from compozy_client import __version__
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode
from compozy_client.paths import UnsafePathError, check_private_dir, ensure_private_dir

log = logging.getLogger("compozy_agent.server")

DEFAULT_IDLE_TIMEOUT: Final = 300.0
#: Per socket kind; lowered when the open-file limit cannot hold every pool.
DEFAULT_MAX_CONNECTIONS: Final = 256
#: Descriptors kept for the agent itself (logs, keyring bus, provider connections,
#: login listeners, state files) when sizing the pools against RLIMIT_NOFILE.
RESERVED_DESCRIPTORS: Final = 128
#: A connection holds its socket and, on Linux, a ``/proc/<pid>`` fd of who connected (audit).
DESCRIPTORS_PER_CONNECTION: Final = 2
#: Backoff of a failing accept(): the first retry, and the longest wait between two.
ACCEPT_RETRY_FIRST: Final = 0.01
ACCEPT_RETRY_MAX: Final = 1.0
#: accept() errors about one connection that went away before it was taken: no backoff.
_ACCEPT_ERRORS_OF_ONE_PEER: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
#: Ops served on the restricted forwarding socket.
FORWARD_OPS: Final = frozenset({"hello", "status", "token", "dpop_proof"})
#: Child sockets of `compozy exec`: how many one process (by peer pid) may hold, and
#: how many the agent holds at most (each is a listening descriptor).
MAX_EXEC_SOCKETS_PER_PROCESS: Final = 8
MAX_EXEC_SOCKETS: Final = 64
#: Where they are bound: a directory beside the main socket.
EXEC_SOCKET_DIR: Final = "exec"
#: Ops served while the agent is locked (as ssh-agent serves only "unlock").
LOCKED_OPS: Final = frozenset({"hello", "status", "unlock"})


def _readable_id(line: bytes) -> int | str | None:
    """The ``id`` of a request line, when it can be read (for an error about the line)."""
    try:
        return p.decode_request(line).id
    except p.ProtocolError as exc:
        return exc.request_id


#: Room for a listing in a response line: the rest (an id as long as a request line, a
#: path) fits in what is left of MAX_RESPONSE_BYTES.
_LISTING_BYTES: Final = p.MAX_RESPONSE_BYTES - 2 * p.MAX_LINE_BYTES
_entry_encoder = msgspec.json.Encoder()


def _newest_that_fit(entries: list[p.AuditEntry]) -> list[p.AuditEntry]:
    """The newest of ``entries`` that fit in a response line, since a client refuses a
    longer one: each entry holds what a caller asked for (a profile, scopes), and a host
    on the forwarding socket may ask for what it likes."""
    total = 0
    for index in range(len(entries) - 1, -1, -1):
        total += len(_entry_encoder.encode(entries[index])) + 1  # and its comma
        if total > _LISTING_BYTES:
            return entries[index + 1:]
    return entries


class AgentAlreadyRunning(Exception):
    """Another agent holds the lock or already answers on the socket."""


class SocketSetupError(Exception):
    """The socket cannot be created safely at the requested path."""


class BoundSocket(msgspec.Struct):
    """A listening socket we created, with the lock that makes it ours."""

    sock: socket.socket
    path: str
    kind: str = "full"
    lock_fd: int | None = None
    inode: int | None = None

    def cleanup(self) -> None:
        """Remove the socket file if it is still ours, and release the lock."""
        with contextlib.suppress(OSError):
            if self.inode is not None and os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_socket(path: str, kind: str = "full") -> BoundSocket:
    """Create the listening socket at ``path`` under the rules in the module docstring."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        ensure_private_dir(directory)
    except (OSError, UnsafePathError) as exc:
        raise SocketSetupError(f"cannot create socket directory {directory}: {exc}") from None
    lock_path = path + ".lock"
    try:
        # The same rules as a log file: never through a symbolic link, ours, 0600.
        lock_fd = open_private_log(lock_path)
    except OSError as exc:
        message = exc.strerror if isinstance(exc, UnsafeLogFile) else (
            f"cannot use the lock file {lock_path}: {exc.strerror}")
        raise SocketSetupError(message) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise AgentAlreadyRunning(f"an agent is already running on {path}") from None
        raise
    try:
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _umask(0o177):
                sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(socket.SOMAXCONN)  # bursts of CLIs must not find it full
        except OSError as exc:
            sock.close()
            raise SocketSetupError(f"cannot listen on {path}: {exc.strerror}") from None
        return BoundSocket(sock, path, kind, lock_fd, os.lstat(path).st_ino)
    except BaseException:
        os.close(lock_fd)
        raise


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketSetupError(
            f"{path} exists and is not a socket; remove it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        log.info("replacing stale socket %s left by an agent that is gone", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AgentAlreadyRunning(
        f"something already answers on {path} (another agent, or a systemd/launchd socket)"
    )


def check_inherited_socket(sock: socket.socket) -> str:
    """Check a socket passed by systemd/launchd the way :func:`bind_socket` would make one.

    Returns its path. The socket must be a listening Unix stream socket whose
    directory is private to us and whose file is not accessible by others.
    """
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SocketSetupError("the inherited socket is not a Unix stream socket")
    path = sock.getsockname()
    if not isinstance(path, str) or not path:
        raise SocketSetupError("the inherited socket has no path (abstract sockets are refused)")
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SocketSetupError(
            f"inherited socket {path} is accessible by others (mode "
            f"{stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}); set SocketMode=0600"
        )
    try:
        check_private_dir(os.path.dirname(path))
    except (OSError, UnsafePathError) as exc:
        raise SocketSetupError(str(exc)) from None
    return path


class ExecGrant(msgspec.Struct, eq=False):
    """What one ``compozy exec`` child's socket serves: ``FORWARD_OPS`` for ``profile``;
    tokens of at most ``scope`` and only for ``audience`` when they are set (a request
    that names neither gets them)."""

    profile: str
    scope: frozenset[str] | None
    audience: str | None
    path: str
    #: The listening socket's inode: the path is removed only while it is still ours.
    inode: int
    #: Ends the accept loop of the socket.
    accepting: anyio.CancelScope = msgspec.field(default_factory=anyio.CancelScope)
    #: The connections made to it, closed with it.
    clients: set[Client] = msgspec.field(default_factory=set)

    def refusal(self, request: p.Request, op: str) -> str | None:
        """Why this socket refuses ``request``, or None (filling in its scope and audience)."""
        if op not in FORWARD_OPS:
            return f"op {op!r} is not allowed on a compozy exec socket"
        if isinstance(request, p.Status) and request.profile not in (None, self.profile):
            return f"this socket serves only profile {self.profile!r}"
        if not isinstance(request, p.Token | p.DpopProof):  # a proof hands out a token too
            return None
        if request.token_id is not None or request.profile != self.profile:
            return f"this socket serves only profile {self.profile!r} (ask by its name)"
        if request.scope is None:
            request.scope = sorted(self.scope) if self.scope is not None else None
        elif self.scope is not None and not set(request.scope) <= self.scope:
            return ("this socket serves only the scope " + " ".join(sorted(self.scope))
                    + " (or less)")
        if request.audience is None:
            request.audience = self.audience
        elif self.audience is not None and request.audience != self.audience:
            return f"this socket serves only the audience {self.audience}"
        return None

    def close(self) -> None:
        """Remove the path (if still ours), stop accepting, close every connection."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        self.accepting.cancel()
        for client in self.clients:
            if client.sock is not None:
                with contextlib.suppress(OSError):
                    client.sock.shutdown(socket.SHUT_RDWR)


def bind_exec_socket(directory: str) -> tuple[socket.socket, str]:
    """A listening socket with an unguessable name in ``directory`` (made private, 0700)."""
    try:
        ensure_private_dir(directory)
    except (OSError, UnsafePathError) as exc:
        raise OpError(ErrorCode.INTERNAL, f"cannot use {directory} for exec sockets: "
                      f"{exc}") from None
    path = os.path.join(directory, secrets.token_hex(8) + ".sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask(0o177):
            sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise OpError(ErrorCode.INTERNAL, f"cannot listen on {path}: {exc.strerror}") from None
    return sock, path


class Client(msgspec.Struct, eq=False):
    """One connection: the peer the kernel reported, the socket kind, the process behind it."""

    peer: Peer
    kind: str = "full"
    #: Who connected, read when the connection was accepted (``audit.capture``).
    process: ConnectedProcess = msgspec.field(
        default_factory=lambda: ConnectedProcess(ProcessInfo()))
    #: Since when (time.monotonic()) this connection has been idle: the agent waiting for
    #: its next request, or for it to read an answer. None while a request is in flight.
    waiting_since: float | None = None
    #: The connection's socket, to shut down when it is closed for idleness.
    sock: socket.socket | None = None
    timed_out: bool = False
    #: On a ``compozy exec`` socket: what that socket serves.
    grant: ExecGrant | None = None

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # every field but the socket
        return [("peer", self.peer), ("kind", self.kind), ("process", self.process),
                ("waiting_since", self.waiting_since), ("timed_out", self.timed_out),
                ("grant", self.grant)]

    @reprlib.recursive_repr()  # its grant lists it among its clients
    def __repr__(self) -> str:
        return "Client(" + ", ".join(f"{name}={value!r}"
                                     for name, value in self.__rich_repr__()) + ")"


class ServerStats(msgspec.Struct):
    connections_open: int = 0
    connections_total: int = 0
    refused_peers: int = 0
    requests: int = 0
    errors_by_code: dict[str, int] = msgspec.field(default_factory=dict)


class AgentServer:
    """Serves the protocol on one or more listening sockets."""

    def __init__(
        self,
        backend: Backend,
        *,
        socket_path: str,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        forward_profiles: frozenset[str] | None = None,
        clock: Clock | None = None,
        audit: AuditLog | None = None,
        lock: AgentLock | None = None,
    ) -> None:
        self.backend = backend
        self.clock: Clock = clock if clock is not None else SystemClock()
        #: Kept on disk when given one that was (``AgentLock.load``); else in memory only.
        self.lock = lock if lock is not None else AgentLock(self.clock)
        #: Token requests, who made them and what they got (in memory only unless given).
        self.audit = audit if audit is not None else AuditLog(None)
        #: Profiles the forwarding socket may serve; None: all of them.
        self.forward_profiles = forward_profiles
        self.socket_path = socket_path
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        #: The pool size of each socket kind, set by :meth:`serve`.
        self.connection_caps: dict[str, int] = {}
        self.stats = ServerStats()
        self._uid = os.getuid()
        #: The connections being served, by socket kind.
        self._clients: dict[str, set[Client]] = {}
        self._client_arrived = anyio.Event()
        #: The ``compozy exec`` sockets, by the connection that asked for them.
        self._exec_grants: dict[Client, list[ExecGrant]] = {}
        self._exec_socket_dir = os.path.join(os.path.dirname(os.path.abspath(socket_path)),
                                             EXEC_SOCKET_DIR)
        #: Where the exec sockets' accept loops run; set by :meth:`serve`.
        self._group: anyio.abc.TaskGroup | None = None

    async def serve(self, bound: list[BoundSocket], ready: anyio.Event | None = None) -> None:
        """Accept connections on every socket in ``bound`` until cancelled."""
        self.connection_caps = self._caps_for({item.kind for item in bound})
        async with anyio.create_task_group() as group:
            self._group = group
            group.start_soon(self._close_idle_connections)
            for item in bound:
                listener = await anyio.abc.SocketListener.from_socket(item.sock)
                group.start_soon(self._accept_loop, listener, item.path, item.kind, group)
            if ready is not None:
                ready.set()

    def _caps_for(self, kinds: set[str]) -> dict[str, int]:
        """``max_connections`` per kind, or less where the open-file limit cannot hold them."""
        cap = self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and kinds:
            fitting = max(8, (soft - RESERVED_DESCRIPTORS)
                          // (len(kinds) * DESCRIPTORS_PER_CONNECTION))
            if fitting < cap:
                log.warning("serving at most %d connections per socket: the open-file limit "
                            "is %d", fitting, soft)
                cap = fitting
        return dict.fromkeys(kinds, cap)

    async def _accept_loop(self, listener: anyio.abc.SocketListener, path: str, kind: str,
                           group: anyio.abc.TaskGroup, grant: ExecGrant | None = None) -> None:
        """Accept connections until the listener is closed; accept errors never end it.

        anyio's ``listener.serve`` lets an accept error (EMFILE when the agent is
        out of descriptors, ENOBUFS, ENOMEM) end the task group, and with it the
        agent. Here it waits, 10 ms and doubling up to 1 s, and tries again: the
        pending connections stay queued in the kernel until descriptors are free.
        """
        retry_delay = 0.0
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return
            except (anyio.BrokenResourceError, OSError) as exc:
                cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
                code = cause.errno if isinstance(cause, OSError) else None
                if code in _ACCEPT_ERRORS_OF_ONE_PEER:
                    continue
                if retry_delay == 0.0:  # once per burst, not once per retry
                    log.warning("cannot accept connections on %s (%s); retrying", path,
                                os.strerror(code) if code else type(cause).__name__)
                retry_delay = min(max(retry_delay * 2, ACCEPT_RETRY_FIRST), ACCEPT_RETRY_MAX)
                await anyio.sleep(retry_delay)
                continue
            if retry_delay:
                log.info("accepting connections on %s again", path)
                retry_delay = 0.0
            group.start_soon(self._serve_connection, stream, kind, grant)

    async def _serve_connection(self, stream: anyio.abc.SocketStream, kind: str,
                                grant: ExecGrant | None = None) -> None:
        """Serve one connection; whatever goes wrong in it ends it, never the agent."""
        try:
            async with stream:
                await self.handle_connection(stream, kind, grant)
        except Exception as exc:
            # The last resort. Only the exception's type and where it was raised
            # are logged: its message may quote a request, and requests carry secrets.
            where = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
            log.error("closed a connection after an unexpected %s:\n%s",
                      type(exc).__name__, where)

    async def handle_connection(self, stream: anyio.abc.SocketStream, kind: str = "full",
                                grant: ExecGrant | None = None) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            peer = peer_of(raw)
        except (OSError, PeerCredentialsUnavailable) as exc:
            log.warning("refused a connection: peer credentials unavailable (%s)", exc)
            self.stats.refused_peers += 1
            return
        if peer.uid != self._uid:
            log.warning("refused a connection from uid %d (pid %s): not our user",
                        peer.uid, peer.pid)
            self.stats.refused_peers += 1
            return
        client = Client(peer, kind, grant=grant)
        if grant is not None and grant.accepting.cancel_called:
            return  # accepted just before its socket was closed
        if not self._admit(client, raw):
            await self._send_error(stream, None, ErrorCode.BUSY,
                                   "every connection to the agent has a request in flight; "
                                   "try again")
            return
        if grant is not None:
            grant.clients.add(client)
        # Who connected is read now, before a line is served: what runs later on this
        # connection (after an exec, or in a child that inherited it) is not who connected.
        client.process = capture(raw, peer.pid)
        self.stats.connections_open += 1
        self.stats.connections_total += 1
        try:
            await self._serve_lines(stream, client)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            client.process.close()
            self.stats.connections_open -= 1
            # A login dies with the connection that started it (its loopback listener too).
            self.backend.connection_closed(client)
            # So do the exec sockets it asked for.
            for owned in self._exec_grants.pop(client, []):
                owned.close()
            if grant is not None:
                grant.clients.discard(client)

    def _admit(self, client: Client, sock: socket.socket) -> bool:
        """Give ``client`` a place in its kind's pool, closing the longest-idle one if full.

        False when the pool is full of connections with a request in flight.
        """
        pool = self._clients.setdefault(client.kind, set())
        if len(pool) >= self._cap(client.kind):
            idle = [other for other in pool if other.waiting_since is not None
                    and other not in self._exec_grants]
            if not idle:
                return False
            oldest = min(idle, key=lambda other: other.waiting_since or 0.0)
            log.debug("the %s socket is full: closing the connection idle for %.1f s", client.kind,
                      time.monotonic() - (oldest.waiting_since or 0.0))
            self._close_idle(oldest)
        client.sock = sock
        client.waiting_since = time.monotonic()  # idle from the start: a request is awaited
        pool.add(client)
        self._client_arrived.set()
        return True

    def _cap(self, kind: str) -> int:
        """The pool size of ``kind``; exec sockets share one pool, as large as the smallest."""
        cap = self.connection_caps.get(kind)
        if cap is None:
            cap = min(self.connection_caps.values(), default=self.max_connections)
        return cap

    def _close_idle(self, client: Client) -> None:
        """Close an idle connection: its handler sees the end of the stream and returns.

        A shutdown rather than a cancelled scope: cancelling a read that the
        peer's bytes complete in the same loop iteration makes anyio set the
        result of a cancelled future, which asyncio logs as an error.
        """
        client.timed_out = True
        if client.sock is not None:
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)
        self._clients.get(client.kind, set()).discard(client)

    async def _close_idle_connections(self) -> None:
        """Close connections that sent nothing for ``idle_timeout`` seconds.

        One task for all connections, rather than a timeout around every read:
        a deadline per line costs more than the rest of a token request. It
        sleeps until the earliest connection could time out, and not at all
        while there are none.
        """
        while True:
            if not any(self._clients.values()):
                self._client_arrived = anyio.Event()
                await self._client_arrived.wait()
                continue
            now = time.monotonic()
            next_check = now + self.idle_timeout
            for client in [c for pool in self._clients.values() for c in pool]:
                since = client.waiting_since
                if since is None or client in self._exec_grants:
                    continue  # busy, or holding a compozy exec socket for its child
                if now - since >= self.idle_timeout:
                    log.debug("closing a connection idle for %.0f s", now - since)
                    self._close_idle(client)
                else:
                    next_check = min(next_check, since + self.idle_timeout)
            await anyio.sleep(max(next_check - now, 0.01))

    async def _serve_lines(self, stream: anyio.abc.SocketStream, client: Client) -> None:
        reader = BufferedByteReceiveStream(stream)
        try:
            await self._serve_lines_until_closed(stream, reader, client)
        finally:
            self._clients.get(client.kind, set()).discard(client)

    async def _serve_lines_until_closed(
        self, stream: anyio.abc.SocketStream, reader: BufferedByteReceiveStream, client: Client
    ) -> None:
        while True:
            try:
                line = await reader.receive_until(b"\n", p.MAX_LINE_BYTES)
                if len(line) >= p.MAX_LINE_BYTES:
                    # receive_until checks its limit only while the newline is missing:
                    # a line whose end arrives in one read with its newline passes it.
                    raise anyio.DelimiterNotFound(p.MAX_LINE_BYTES)
            except anyio.DelimiterNotFound:
                await self._send_error(
                    stream, None, ErrorCode.LINE_TOO_LONG,
                    f"request line longer than {p.MAX_LINE_BYTES} bytes; closing",
                )
                return
            except anyio.IncompleteRead:
                # The client left, or shut its side for writing, mid-line. The line may
                # be cut short, so it is not served; a client still reading is told why.
                if reader.buffer.strip() and not client.timed_out:
                    await self._send_error(
                        stream, _readable_id(reader.buffer), ErrorCode.BAD_REQUEST,
                        "the connection was closed for writing in the middle of a request "
                        "line; it was not served (end every request with a newline)",
                    )
                return
            if client.timed_out:
                return  # closed for idleness: lines still buffered are not served
            line = line.rstrip(b"\r")
            if not line.strip():
                # Not a request: the idle timer keeps running. Yield, as answering a request
                # does: skipping a read's worth of newlines (64 Ki of them) at once held the
                # event loop, and a few connections sending nothing else starved every other.
                await anyio.lowlevel.checkpoint()
                continue
            client.waiting_since = None
            self.stats.requests += 1
            response = await self.respond(line, client)
            # Idle again: writing the answer waits on the client reading it, and a
            # client that never reads must not hold its place as if it were busy.
            client.waiting_since = time.monotonic()
            await stream.send(p.encode(response))

    async def respond(self, line: bytes, client: Client) -> p.Response:
        """The response to one request line; never raises for a client's mistake."""
        kind = client.kind
        try:
            request = p.decode_request(line)
        except p.ProtocolError as exc:
            return self._error(exc.request_id, exc.code, str(exc))
        except Exception as exc:  # decode_request promises ProtocolError only; belt and braces
            log.error("a request line could not be decoded (%s)", type(exc).__name__)
            return self._error(None, ErrorCode.BAD_REQUEST, "request could not be decoded")
        op: str = request.__struct_config__.tag  # type: ignore[assignment]
        if kind != "full":
            refusal = (client.grant.refusal(request, op) if client.grant is not None
                       else self._forward_refusal(request, op))
            if refusal is not None:
                return self._error(request.id, ErrorCode.FORBIDDEN, refusal)
        try:
            if self.lock.locked and op not in LOCKED_OPS:
                raise OpError(ErrorCode.LOCKED,
                              "the agent is locked; unlock it with `compozy auth unlock`")
            result = await self.dispatch(request, client)
        except OpError as exc:
            return self._error(request.id, exc.code, exc.message, exc.details)
        except Exception:
            # The traceback is logged for the owner; the client gets no internals.
            log.exception("op %s failed unexpectedly", op)
            return self._error(request.id, ErrorCode.INTERNAL,
                               f"the agent failed to handle {op!r}; see the agent's log")
        return p.Response(id=request.id, ok=True, result=result)

    def _forward_refusal(self, request: p.Request, op: str) -> str | None:
        """Why the forwarding socket refuses ``request``, or None if it may be served."""
        if op not in FORWARD_OPS:
            return f"op {op!r} is not allowed on the forwarding socket"
        allowed = self.forward_profiles
        if allowed is None:
            return None
        if isinstance(request, p.Token | p.DpopProof) \
                and (request.token_id or request.profile not in allowed):
            return "this profile is not forwarded (ask by a forwarded profile's name)"
        if isinstance(request, p.Status) and request.profile is not None \
                and request.profile not in allowed:
            return "this profile is not forwarded"
        return None

    async def dispatch(self, request: p.Request, client: Client) -> Any:
        backend = self.backend
        kind = client.kind
        match request:
            case p.Hello():
                ops = sorted(FORWARD_OPS) if kind != "full" else list(p.OPS)
                return p.HelloResult(protocol=p.PROTOCOL_VERSION, agent_version=__version__,
                                     pid=os.getpid(), ops=ops, socket_kind=kind)
            case p.Status(profile=profile):
                sessions = await backend.sessions(profile)
                if client.grant is not None:
                    sessions = [s for s in sessions if s.profile == client.grant.profile]
                elif kind != "full" and self.forward_profiles is not None:
                    sessions = [s for s in sessions if s.profile in self.forward_profiles]
                return p.StatusResult(
                    agent_version=__version__,
                    pid=os.getpid(),
                    socket=client.grant.path if client.grant is not None else self.socket_path,
                    storage=backend.storage_info(),
                    sessions=sessions,
                    clock_skew_seconds=backend.clock_skew(),
                    warnings=[*backend.warnings(), *self.lock.warnings(),
                              *self.audit.warnings()] if kind == "full" else [],
                    locked=self.lock.locked,
                )
            case p.List():
                return p.ListResult(sessions=await backend.sessions(None))
            case p.Token() | p.DpopProof():
                return await self._token(request, client)
            case p.Refresh():
                return await backend.refresh(request)
            case p.Revoke():
                return await backend.revoke(request)
            case p.RevokeAll():
                return await backend.revoke_all(request)
            case p.Logout():
                return await backend.logout(request)
            case p.LoginStart():
                return await backend.login_start(request, client)
            case p.LoginWait():
                return await backend.login_wait(request)
            case p.LoginCancel():
                return await backend.login_cancel(request)
            case p.StoreApiKey():
                return await backend.store_api_key(request)
            case p.Lock():
                await self.lock.lock(request.passphrase)
                log.info("locked by pid %s", client.peer.pid)
                return p.Empty()
            case p.Unlock():
                try:
                    await self.lock.unlock(request.passphrase)
                except OpError:
                    log.warning("wrong passphrase to unlock, from pid %s", client.peer.pid)
                    raise
                log.info("unlocked by pid %s", client.peer.pid)
                return p.Empty()
            case p.ExecSocket():
                return await self._exec_socket(request, client)
            case p.AuditLog():
                entries = self.audit.recent(min(request.limit, 1000), request.profile,
                                            request.outcome)
                return p.AuditLogResult(entries=_newest_that_fit(entries), path=self.audit.path,
                                        failed_path=self.audit.failed_path)
            case _:
                assert_never(request)

    async def _exec_socket(self, request: p.ExecSocket, client: Client) -> p.ExecSocketResult:
        """Bind a child's socket for ``client`` (module docstring, ``exec_socket``)."""
        group = self._group
        if group is None:
            raise OpError(ErrorCode.NOT_IMPLEMENTED, "this agent serves no exec sockets")
        held = sum(len(grants) for owner, grants in self._exec_grants.items()
                   if owner.peer.pid == client.peer.pid)
        if held >= MAX_EXEC_SOCKETS_PER_PROCESS:
            raise OpError(ErrorCode.BUSY, f"this process already holds {held} exec sockets "
                          f"(at most {MAX_EXEC_SOCKETS_PER_PROCESS})")
        if sum(map(len, self._exec_grants.values())) >= MAX_EXEC_SOCKETS:
            raise OpError(ErrorCode.BUSY, f"the agent already serves {MAX_EXEC_SOCKETS} exec "
                          "sockets; try again when some of their commands have ended")
        sock, path = bind_exec_socket(self._exec_socket_dir)
        grant = ExecGrant(request.profile,
                          frozenset(request.scope) if request.scope is not None else None,
                          request.audience, path, os.lstat(path).st_ino)
        try:
            listener = await anyio.abc.SocketListener.from_socket(sock)
        except BaseException:
            sock.close()
            grant.close()
            raise
        self._exec_grants.setdefault(client, []).append(grant)
        group.start_soon(self._serve_exec_socket, listener, grant, group)
        log.info("exec socket for profile %s opened for pid %s", request.profile,
                 client.peer.pid)
        return p.ExecSocketResult(path=path)

    async def _serve_exec_socket(self, listener: anyio.abc.SocketListener, grant: ExecGrant,
                                 group: anyio.abc.TaskGroup) -> None:
        try:
            with grant.accepting:
                await self._accept_loop(listener, grant.path, "exec", group, grant)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            grant.close()
            log.debug("exec socket for profile %s closed", grant.profile)

    async def _token(self, request: p.Token | p.DpopProof,
                     client: Client) -> p.TokenResult | p.DpopProofResult:
        """Hand out a token (with a DPoP proof, for ``dpop_proof``), and write the audit
        line either way."""
        at_request = client.process.at_request()
        try:
            result: p.TokenResult | p.DpopProofResult
            if isinstance(request, p.Token):
                result = await self.backend.token(request, client.peer)
            else:
                result = await self.backend.dpop_proof(request, client.peer)
            if self.lock.locked:
                # Locked while the token was being fetched (a slow refresh): the lock
                # wins over a request that arrived before it.
                raise OpError(ErrorCode.LOCKED, "the agent was locked while this token was "
                              "being fetched; unlock it with `compozy auth unlock`")
        except OpError as exc:
            self.audit.record(entry_for(request, client.peer, client.process.info, client.kind,
                                        self.clock.now(), error_code=exc.code,
                                        at_request=at_request))
            raise
        self.audit.record(entry_for(request, client.peer, client.process.info, client.kind,
                                    self.clock.now(), result=result, at_request=at_request))
        return result

    def _error(
        self,
        request_id: int | str | None,
        code: str,
        message: str,
        details: dict[str, str] | None = None,
    ) -> p.Response:
        self.stats.errors_by_code[code] = self.stats.errors_by_code.get(code, 0) + 1
        return p.Response(id=request_id, ok=False,
                          error=p.ErrorBody(code=code, message=message, details=details or {}))

    async def _send_error(
        self, stream: anyio.abc.SocketStream, request_id: int | str | None, code: str, message: str
    ) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(p.encode(self._error(request_id, code, message)))
