"""The socket server in-process: connection pools, eviction, busy, last-resort catch, accept.

A real :class:`AgentServer` on real Unix sockets in a private directory, with a
backend whose ``login_wait`` stays in flight until the test releases it, so a
test decides which connections are busy and which are idle.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from compozy_agent import server as server_module
from compozy_agent.backend import EmptyBackend, OpError
from compozy_agent.server import AgentServer, bind_socket
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode

pytestmark = pytest.mark.anyio

#: Every wait of these tests is on a condition; this only bounds a failure.
DEADLINE = 10.0


class HeldBackend(EmptyBackend):
    """``login_wait`` stays in flight until :meth:`release`; counts the waiters."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._changed = anyio.Event()
        self._release = anyio.Event()

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult:
        self.in_flight += 1
        self._changed.set()
        try:
            await self._release.wait()
        finally:
            self.in_flight -= 1
        raise OpError(ErrorCode.UNKNOWN_LOGIN, "released")

    async def until_in_flight(self, count: int) -> None:
        with anyio.fail_after(DEADLINE):
            while self.in_flight < count:
                self._changed = anyio.Event()
                await self._changed.wait()

    def release(self) -> None:
        self._release.set()
        self._release = anyio.Event()


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the server's tasks until ``condition`` holds (bounded by DEADLINE)."""
    with anyio.fail_after(DEADLINE):
        while not condition():
            await anyio.lowlevel.checkpoint()


class LineClient:
    """One async connection speaking JSON lines."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    @classmethod
    async def connect(cls, path: str) -> LineClient:
        return cls(await anyio.connect_unix(path))

    async def send(self, request: dict[str, Any]) -> None:
        await self.stream.send(json.dumps(request).encode() + b"\n")

    async def read(self) -> dict[str, Any] | None:
        """The next response, or None when the agent closed the connection."""
        with anyio.fail_after(DEADLINE):
            try:
                line = await self.reader.receive_until(b"\n", p.MAX_RESPONSE_BYTES)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return None
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.send(request)
        answer = await self.read()
        assert answer is not None, f"closed instead of answering {request}"
        return answer

    async def hello(self) -> bool:
        try:
            await self.send({"id": "h", "op": "hello"})
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        answer = await self.read()
        return answer is not None and answer["ok"] is True

    async def aclose(self) -> None:
        await self.stream.aclose()


class Served:
    def __init__(self, server: AgentServer, backend: HeldBackend, main: str, forward: str) -> None:
        self.server = server
        self.backend = backend
        self.main = main
        self.forward = forward
        self.clients: list[LineClient] = []

    async def connect(self, path: str | None = None) -> LineClient:
        client = await LineClient.connect(path or self.main)
        self.clients.append(client)
        return client


@asynccontextmanager
async def serving(max_connections: int, idle_timeout: float = 300.0) -> AsyncIterator[Served]:
    root = Path(tempfile.mkdtemp(prefix="czs-", dir="/tmp"))  # AF_UNIX paths are short
    bound = [bind_socket(str(root / "run" / "agent.sock")),
             bind_socket(str(root / "fwd" / "forward.sock"), kind="forward")]
    backend = HeldBackend()
    server = AgentServer(backend, socket_path=bound[0].path, max_connections=max_connections,
                         idle_timeout=idle_timeout)
    served = Served(server, backend, bound[0].path, bound[1].path)
    try:
        async with anyio.create_task_group() as group:
            ready = anyio.Event()
            group.start_soon(server.serve, bound, ready)
            await ready.wait()
            try:
                yield served
            finally:
                backend.release()
                group.cancel_scope.cancel()
        for client in served.clients:
            await client.aclose()
    finally:
        for item in bound:
            item.cleanup()
            item.sock.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_full_socket_closes_its_longest_idle_connection() -> None:
    async with serving(max_connections=3) as served:
        first, second, third = [await served.connect() for _ in range(3)]
        for client in (first, second, third):
            assert await client.hello()
        fourth = await served.connect()
        assert await fourth.hello()
        assert await first.read() is None  # idle longest: closed to make room
        await until(lambda: served.server.stats.connections_open == 3)  # its handler ended
        # Idle time counts from the last request, not from the connect.
        assert await second.hello() and await third.hello()
        fifth = await served.connect()
        assert await fifth.hello()
        assert await fourth.read() is None
        assert await second.hello() and await third.hello() and await fifth.hello()


async def test_busy_only_when_every_connection_has_a_request_in_flight() -> None:
    async with serving(max_connections=2) as served:
        waiting = [await served.connect() for _ in range(2)]
        for client in waiting:
            await client.send({"id": 1, "op": "login_wait", "login_id": "x"})
        await served.backend.until_in_flight(2)
        refused = await served.connect()
        answer = await refused.read()
        assert answer is not None and answer["error"]["code"] == "busy"
        assert await refused.read() is None
        served.backend.release()
        for client in waiting:  # the requests in flight were never cut short
            answer = await client.read()
            assert answer is not None and answer["error"]["message"] == "released"
        admitted = await served.connect()  # both are idle now: one of them makes room
        assert await admitted.hello()


async def test_a_connection_with_a_request_in_flight_is_never_the_one_closed() -> None:
    async with serving(max_connections=2) as served:
        busy = await served.connect()
        await busy.send({"id": 1, "op": "login_wait", "login_id": "x"})
        await served.backend.until_in_flight(1)
        idle = await served.connect()
        assert await idle.hello()
        newcomer = await served.connect()
        assert await newcomer.hello()
        assert await idle.read() is None
        served.backend.release()
        answer = await busy.read()
        assert answer is not None and answer["id"] == 1


async def test_each_socket_kind_has_its_own_pool() -> None:
    """Found by the issue: idle connections on forward.sock made the CLI get `busy`."""
    async with serving(max_connections=2) as served:
        held = [await served.connect(served.forward) for _ in range(2)]
        for client in held:
            await client.send({"id": 1, "op": "hello"})
            await client.read()
        # The forwarding socket's pool is full of idle connections; the main one is empty.
        owner = [await served.connect() for _ in range(2)]
        for client in owner:
            assert await client.hello()
        for client in held:
            assert await client.hello()  # and no main connection took a forwarding place
        assert served.server.connection_caps == {"full": 2, "forward": 2}


async def test_a_client_that_never_reads_its_answers_is_idle() -> None:
    """Blocked on writing an answer nobody reads is not a request in flight: the idle
    timer runs, so such a client cannot hold its place (or the agent's memory) forever."""
    async with serving(max_connections=4, idle_timeout=0.3) as served:
        flooder = await served.connect()
        refused = anyio.Event()

        async def flood() -> None:
            line = b'{"id": 1, "op": "status"}\n' * 1000
            try:
                while True:
                    await flooder.stream.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                refused.set()

        async with anyio.create_task_group() as group:
            group.start_soon(flood)
            with anyio.fail_after(DEADLINE):
                await refused.wait()
        assert await (await served.connect()).hello()


async def test_blank_lines_do_not_hold_the_event_loop() -> None:
    """Found by red-teaming: a blank line was skipped without yielding, so a connection
    sending only newlines held the agent for a whole read (64 Ki lines) at a time, and
    eight of them on the forwarding socket made each request on the main socket wait
    two seconds. Each blank line now gives the other tasks a turn, as an answer does."""
    blank_lines = 16 * 1024
    async with serving(max_connections=4) as served:
        flooder = await served.connect(served.forward)
        turns = 0
        answered = anyio.Event()

        async def count_turns() -> None:
            nonlocal turns
            while not answered.is_set():
                turns += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as group:
            group.start_soon(count_turns)
            await flooder.stream.send(b"\n" * blank_lines + b'{"id": "after", "op": "hello"}\n')
            answer = await flooder.read()
            answered.set()
        assert answer is not None and answer["id"] == "after"
        # Without a turn per blank line, the other task ran a handful of times in all.
        assert turns >= blank_lines // 2, f"other tasks ran {turns} times in {blank_lines} lines"


async def test_an_unexpected_failure_closes_only_that_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-NEVER-LOGGED"
    async with serving(max_connections=8) as served:
        bystander = await served.connect()
        assert await bystander.hello()
        original = served.server.respond

        async def respond(line: bytes, client: Any) -> p.Response:
            if secret.encode() in line:
                raise RecursionError(f"a message quoting the request: {line!r}")
            return await original(line, client)

        monkeypatch.setattr(served.server, "respond", respond)
        victim = await served.connect()
        with caplog.at_level(logging.ERROR, logger="compozy_agent.server"):
            await victim.send({"id": 1, "op": "store_api_key", "api_key": secret})
            assert await victim.read() is None
        assert "closed a connection after an unexpected RecursionError" in caplog.text
        assert secret not in caplog.text
        assert await bystander.hello()
        assert await (await served.connect()).hello()


class FailingListener(anyio.abc.SocketListener):
    """Fails ``accept`` as scripted, hands out a connection where the script says so,
    and reports itself closed at the end of the script."""

    def __init__(self, script: list[BaseException | None]) -> None:
        self.script = script
        self.accepted: list[socket.socket] = []  # the clients' ends

    async def accept(self) -> anyio.abc.SocketStream:
        await anyio.lowlevel.checkpoint()
        if not self.script:
            raise anyio.ClosedResourceError
        step = self.script.pop(0)
        if step is not None:
            raise step
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.accepted.append(theirs)
        return await anyio.abc.UNIXSocketStream.from_socket(ours)

    async def aclose(self) -> None:
        pass

    @property
    def extra_attributes(self) -> Any:
        return {}


def _broken(code: int) -> anyio.BrokenResourceError:
    """What anyio's accept raises for an OSError: BrokenResourceError from it."""
    error = anyio.BrokenResourceError()
    error.__cause__ = OSError(code, os.strerror(code))
    return error


async def test_accept_errors_are_retried_with_backoff_and_logged_once_per_burst(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """anyio's listener.serve ends on the first accept error, and the agent with it.

    The accept loop runs alone (no idle closer), so every sleep recorded is its backoff.
    """
    delays: list[float] = []

    async def no_real_sleep(delay: float) -> None:
        delays.append(delay)
        await anyio.lowlevel.checkpoint()

    server = AgentServer(HeldBackend(), socket_path="/nonexistent/agent.sock")
    listener = FailingListener([*[_broken(errno.EMFILE) for _ in range(9)],
                                _broken(errno.ECONNABORTED), None,
                                OSError(errno.ENFILE, "raw"), _broken(errno.ENOBUFS), None])
    monkeypatch.setattr(server_module.anyio, "sleep", no_real_sleep)
    with caplog.at_level(logging.INFO, logger="compozy_agent.server"):
        async with anyio.create_task_group() as group:
            with anyio.fail_after(DEADLINE):
                await server._accept_loop(listener, "the-path", "full", group)
            monkeypatch.undo()
            clients = [LineClient(await anyio.abc.UNIXSocketStream.from_socket(theirs))
                       for theirs in listener.accepted]
            for client in clients:  # each connection accepted is served
                assert await client.hello()
            group.cancel_scope.cancel()
        for client in clients:
            await client.aclose()
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 0.01, 0.02]
    assert len(listener.accepted) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"cannot accept connections on the-path ({message}); retrying"
        for message in ("Too many open files", "Too many open files in system")]
    assert caplog.text.count("accepting connections on the-path again") == 2
