"""A blocking connection to the agent's socket, with a deadline on every call.

Standard library plus msgspec. One connection carries any number of requests;
each waits at most ``timeout`` seconds for its response line, and never past
the connection's ``deadline`` when it has one: the CLI's one budget, from its
start (and any agent start-up) to its answer (docs/architecture.md, "Deadlines").
A request that timed out is never sent again. Nothing is sent before
:mod:`compozy_client.peercheck` has found the socket to be our own agent's.

An agent started here runs isolated from its caller (see :func:`start_agent`):
it holds every refresh token, so neither the caller's working directory nor
the caller's secrets may reach it.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from types import TracebackType
from typing import Any, Final, TypeVar

from compozy_client import peercheck, protocol
from compozy_client.autostart import (  # noqa: F401  (re-exported: the old home of these)
    AGENT_ENV_NAMES,
    AGENT_ENV_PREFIXES,
    AUTOSTART_ENV,
    AUTOSTART_TIMEOUT,
    SEARCH_PATH_VARIABLES,
    agent_environment,
    autostart_allowed,
    start_agent,
    start_once,
)
from compozy_client.errors import (
    AgentTimedOut,
    AgentUnavailable,
    UnsafeAgentSocket,
    error_from_wire,
)
from compozy_client.paths import socket_path

_T = TypeVar("_T")

#: The CLI's budget for one command, from its start to its answer (seconds); the agent
#: answers token requests well before it (its WAIT_LIMIT is 20 s).
DEFAULT_TIMEOUT: Final = 30.0
#: Overrides DEFAULT_TIMEOUT for the CLI (a number of seconds).
TIMEOUT_ENV: Final = "COMPOZY_TIMEOUT"


def budget() -> float:
    """The CLI's time budget: ``$COMPOZY_TIMEOUT`` seconds when set to a positive number,
    else DEFAULT_TIMEOUT."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if 0 < value < float("inf") else DEFAULT_TIMEOUT


class AgentConnection:
    """One open connection to the agent; use as a context manager.

    ``deadline`` (a ``time.monotonic()`` value), when set, bounds every call.
    """

    def __init__(self, sock: socket.socket, path: str, timeout: float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        self._sock = sock
        self._buffer = b""
        self._ids = itertools.count(1)
        self.path = path
        self.timeout = timeout
        self.deadline = deadline
        #: When the latest call was sent (for the timeout message).
        self._started = time.monotonic()

    @classmethod
    def open(cls, path: str | None = None, timeout: float = DEFAULT_TIMEOUT,
             deadline: float | None = None) -> AgentConnection:
        """Connect to the agent at ``path`` (default: :func:`socket_path`).

        Raises :class:`AgentUnavailable` when nothing answers there, and
        :class:`UnsafeAgentSocket`, before anything is sent, when the socket's
        directory, the socket or the process listening on it is not ours.
        """
        path = path or socket_path()
        problem = peercheck.socket_path_problem(path)
        if problem is not None:
            raise UnsafeAgentSocket(problem)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        limit = min(timeout, 5.0)
        if deadline is not None:
            limit = max(0.001, min(limit, deadline - time.monotonic()))
        sock.settimeout(limit)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(
                f"no agent answers on {path} ({exc.strerror or exc.__class__.__name__})"
            ) from None
        problem = peercheck.peer_problem(sock, path)
        if problem is not None:
            sock.close()
            raise UnsafeAgentSocket(problem)
        return cls(sock, path, timeout, deadline)

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def close_and_wait(self, timeout: float) -> None:
        """Close our side, then wait (at most ``timeout`` s) for the agent to close its:
        by then it has done what it does when a connection ends (``compozy exec``: its
        command's socket is removed)."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(timeout)
            while self._sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self._sock.close()

    def call(self, request: Any, result_type: type[_T], timeout: float | None = None) -> _T:
        """Send ``request`` (a protocol request struct; its ``id`` is set here).

        Returns the decoded result, or raises the :class:`AgentError` subclass
        for the error code the agent sent.
        """
        request.id = next(self._ids)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        self._started = time.monotonic()
        self._send(protocol.encode(request), deadline)
        while True:
            response = protocol.decode_response(self._read_line(deadline))
            if response.id == request.id or response.id is None:
                break
            # A response to an earlier request we gave up on: skip it.
        if not response.ok:
            error = response.error or protocol.ErrorBody(code="internal", message="empty error")
            raise error_from_wire(error.code, error.message, error.details)
        return protocol.decode_result(response.result, result_type)

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out()
        return left

    def _timed_out(self) -> AgentTimedOut:
        waited = time.monotonic() - self._started
        return AgentTimedOut(
            f"the agent on {self.path} took the request but did not answer within "
            f"{waited:.0f} s; it was not asked again")

    def _send(self, data: bytes, deadline: float) -> None:
        self._sock.settimeout(self._remaining(deadline))
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise AgentUnavailable(f"the agent on {self.path} went away: {exc}") from None

    def _read_line(self, deadline: float) -> bytes:
        if b"\n" not in self._buffer:
            self._buffer = self._receive_until_newline(deadline)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _receive_until_newline(self, deadline: float) -> bytes:
        chunks = [self._buffer]
        size = len(self._buffer)
        while True:
            if size > protocol.MAX_RESPONSE_BYTES:
                raise AgentUnavailable("the agent sent a line longer than the protocol allows")
            self._sock.settimeout(self._remaining(deadline))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise self._timed_out() from None
            except OSError as exc:
                raise AgentUnavailable(f"the agent on {self.path} went away: {exc}") from None
            if not chunk:
                raise AgentUnavailable(f"the agent on {self.path} closed the connection")
            chunks.append(chunk)
            size += len(chunk)
            if b"\n" in chunk:  # only the new bytes are searched: long lines stay linear
                return b"".join(chunks)


def connect(
    path: str | None = None, timeout: float = DEFAULT_TIMEOUT, *, autostart: bool = True,
    deadline: float | None = None,
) -> AgentConnection:
    """Connect to the agent, starting one first if none answers and ``autostart``.

    ``deadline`` (``time.monotonic()``), when given, bounds the start-up wait and
    every call on the connection: one budget for the whole command.

    Starting is race-free: every racing CLI may spawn an agent, but the agent
    holds an exclusive lock beside its socket, so exactly one survives and all
    callers connect to it. A socket refused as not ours
    (:class:`UnsafeAgentSocket`) is never a reason to start one: the error
    goes to the caller.
    """
    path = path or socket_path()
    try:
        return AgentConnection.open(path, timeout, deadline)
    except AgentUnavailable:
        if not (autostart and autostart_allowed()):
            raise
    spawned_at = start_once(path)
    started_by = spawned_at + AUTOSTART_TIMEOUT
    if deadline is not None:
        started_by = min(started_by, deadline)
    delay = 0.005
    while True:
        try:
            return AgentConnection.open(path, timeout, deadline)
        except AgentUnavailable:
            if time.monotonic() >= started_by:
                raise AgentUnavailable(
                    f"started an agent for {path}, but it did not answer within "
                    f"{time.monotonic() - spawned_at:.0f} s; run `compozy-agent` in a terminal "
                    "to see why"
                ) from None
            time.sleep(delay)
            # A failed connect costs microseconds; a coarse poll would add up to its
            # interval to every cold start (bench/cold_start.py).
            delay = min(delay * 2, 0.02)
