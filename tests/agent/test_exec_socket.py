"""The sockets the agent binds for `compozy exec` children, in-process on real Unix sockets.

What each serves (one profile, at most its scope and audience), where it lives
and with which modes, that it is gone when the connection that asked for it
closes, that this connection is never closed for idleness or to make room, and
the cap on how many one process may hold. The CLI and the real agent are in
tests/integration/test_exec.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
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

from compozy_agent.backend import EmptyBackend
from compozy_agent.peer import Peer
from compozy_agent.server import (
    MAX_EXEC_SOCKETS_PER_PROCESS,
    AgentServer,
    BoundSocket,
    bind_socket,
)
from compozy_client import protocol as p

pytestmark = pytest.mark.anyio

#: Every wait here is on a condition; this only bounds a failure.
DEADLINE = 10.0


class EchoBackend(EmptyBackend):
    """Hands out a token that says what it was asked for (no secret: nothing is real)."""

    def __init__(self) -> None:
        self.asked: list[p.Token] = []

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult:
        self.asked.append(request)
        return p.TokenResult(access_token="echo", profile=request.profile,
                             scope=request.scope, audience=request.audience)

    async def sessions(self, profile: str | None) -> list[p.SessionInfo]:
        return [p.SessionInfo(token_id=name, profile=name, kind="api_key", state="fresh")
                for name in ("dev", "prod") if profile in (None, name)]


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the server's tasks until ``condition`` holds (bounded by DEADLINE)."""
    with anyio.fail_after(DEADLINE):
        while not condition():
            await anyio.lowlevel.checkpoint()


class LineClient:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    @classmethod
    async def connect(cls, path: str) -> LineClient:
        return cls(await anyio.connect_unix(path))

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
        await self.stream.send(json.dumps({"id": 1, **request}).encode() + b"\n")
        answer = await self.read()
        assert answer is not None, f"closed instead of answering {request}"
        return answer

    async def exec_socket(self, **fields: Any) -> str:
        answer = await self.ask({"op": "exec_socket", **fields})
        assert answer["ok"], answer
        path: str = answer["result"]["path"]
        return path


class Served:
    def __init__(self, server: AgentServer, main: str, forward: str) -> None:
        self.server = server
        self.main = main
        self.forward = forward
        self.clients: list[LineClient] = []

    async def connect(self, path: str | None = None) -> LineClient:
        client = await LineClient.connect(path or self.main)
        self.clients.append(client)
        return client


@asynccontextmanager
async def serving(max_connections: int = 16, idle_timeout: float = 300.0
                  ) -> AsyncIterator[Served]:
    root = Path(tempfile.mkdtemp(prefix="cze-", dir="/tmp"))  # AF_UNIX paths are short
    bound: list[BoundSocket] = [
        bind_socket(str(root / "run" / "agent.sock")),
        bind_socket(str(root / "fwd" / "forward.sock"), kind="forward")]
    server = AgentServer(EchoBackend(), socket_path=bound[0].path,
                         max_connections=max_connections, idle_timeout=idle_timeout)
    served = Served(server, bound[0].path, bound[1].path)
    try:
        async with anyio.create_task_group() as group:
            ready = anyio.Event()
            group.start_soon(server.serve, bound, ready)
            await ready.wait()
            try:
                yield served
            finally:
                group.cancel_scope.cancel()
        for client in served.clients:
            await client.stream.aclose()
    finally:
        for item in bound:
            item.cleanup()
            item.sock.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_an_exec_socket_serves_only_its_profile_scope_and_audience() -> None:
    async with serving() as served:
        owner = await served.connect()
        path = await owner.exec_socket(profile="dev", scope=["a", "b"],
                                       audience="https://api.example")
        child = await served.connect(path)
        hello = await child.ask({"op": "hello"})
        assert hello["result"]["socket_kind"] == "exec"
        assert hello["result"]["ops"] == ["dpop_proof", "hello", "status", "token"]

        # Naming neither scope nor audience gets the socket's; less scope is fine.
        token = await child.ask({"op": "token", "profile": "dev"})
        assert token["ok"] and token["result"]["scope"] == ["a", "b"]
        assert token["result"]["audience"] == "https://api.example"
        narrower = await child.ask({"op": "token", "profile": "dev", "scope": ["a"],
                                    "audience": "https://api.example"})
        assert narrower["ok"] and narrower["result"]["scope"] == ["a"]
        status = await child.ask({"op": "status"})
        assert [s["profile"] for s in status["result"]["sessions"]] == ["dev"]

        refused: list[dict[str, Any]] = [
            {"op": "token", "profile": "prod"},
            {"op": "token"},  # "default", not this socket's profile
            {"op": "token", "profile": "dev", "token_id": "prod"},
            {"op": "token", "profile": "dev", "scope": ["a", "c"]},
            {"op": "token", "profile": "dev", "audience": "https://other.example"},
            {"op": "status", "profile": "prod"},
            {"op": "list"},
            {"op": "logout", "all": True},
            {"op": "exec_socket", "profile": "prod"},
            {"op": "audit_log"},
            # A DPoP proof hands out a token too (RFC 9449): the same rules.
            {"op": "dpop_proof", "profile": "prod", "htm": "GET", "htu": "https://api.example/"},
            {"op": "dpop_proof", "profile": "dev", "token_id": "prod", "htm": "GET",
             "htu": "https://api.example/"},
            {"op": "dpop_proof", "profile": "dev", "audience": "https://other.example",
             "htm": "GET", "htu": "https://api.example/"},
        ]
        for request in refused:
            answer = await child.ask(request)
            assert answer["ok"] is False and answer["error"]["code"] == "forbidden", request
        assert len(served.server.backend.asked) == 2  # type: ignore[attr-defined]


async def test_an_exec_socket_without_scope_or_audience_serves_its_profile_as_asked() -> None:
    async with serving() as served:
        owner = await served.connect()
        child = await served.connect(await owner.exec_socket(profile="dev"))
        answer = await child.ask({"op": "token", "profile": "dev", "scope": ["x"],
                                  "audience": "https://any.example"})
        assert answer["ok"] and answer["result"]["scope"] == ["x"]
        assert (await child.ask({"op": "token", "profile": "prod"}))["ok"] is False


async def test_an_exec_socket_is_private_and_gone_when_its_connection_closes() -> None:
    async with serving() as served:
        owner = await served.connect()
        path = await owner.exec_socket(profile="dev")
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        directory = os.path.dirname(path)
        assert directory == os.path.join(os.path.dirname(served.main), "exec")
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
        assert len(os.path.basename(path)) >= 16 + len(".sock")  # 64 random bits
        child = await served.connect(path)
        assert (await child.ask({"op": "hello"}))["ok"]

        await owner.stream.aclose()  # the CLI ended (or was killed)
        await until(lambda: not os.path.lexists(path))
        assert await child.read() is None  # its connections are closed too
        with pytest.raises(FileNotFoundError):
            await anyio.connect_unix(path)
        # The agent goes on serving.
        again = await served.connect()
        assert (await again.ask({"op": "hello"}))["ok"]


async def test_the_connection_holding_an_exec_socket_is_never_closed_for_idleness() -> None:
    async with serving(idle_timeout=0.05) as served:
        owner = await served.connect()
        path = await owner.exec_socket(profile="dev")
        bystander = await served.connect()
        assert (await bystander.ask({"op": "hello"}))["ok"]
        assert await bystander.read() is None  # idle past the timeout: closed
        assert os.path.lexists(path)
        assert (await owner.ask({"op": "hello"}))["ok"]  # the owner was left open


async def test_a_full_pool_never_closes_the_connection_holding_an_exec_socket() -> None:
    async with serving(max_connections=2) as served:
        owner = await served.connect()
        path = await owner.exec_socket(profile="dev")
        idle = await served.connect()
        assert (await idle.ask({"op": "hello"}))["ok"]
        newcomer = await served.connect()
        assert (await newcomer.ask({"op": "hello"}))["ok"]
        assert await idle.read() is None  # made room; the owner, idle longer, did not
        assert os.path.lexists(path) and (await owner.ask({"op": "hello"}))["ok"]


async def test_one_process_holds_a_bounded_number_of_exec_sockets() -> None:
    async with serving() as served:
        owner = await served.connect()
        paths = [await owner.exec_socket(profile="dev")
                 for _ in range(MAX_EXEC_SOCKETS_PER_PROCESS)]
        assert len(set(paths)) == MAX_EXEC_SOCKETS_PER_PROCESS
        # Another connection of the same process counts too.
        other = await served.connect()
        answer = await other.ask({"op": "exec_socket", "profile": "dev"})
        assert answer["ok"] is False and answer["error"]["code"] == "busy"
        await owner.stream.aclose()
        await until(lambda: not any(os.path.lexists(path) for path in paths))
        assert await other.exec_socket(profile="dev")


async def test_exec_sockets_are_refused_on_the_forwarding_socket() -> None:
    async with serving() as served:
        forwarded = await served.connect(served.forward)
        answer = await forwarded.ask({"op": "exec_socket", "profile": "dev"})
        assert answer["ok"] is False and answer["error"]["code"] == "forbidden"


def test_exec_socket_names_cannot_be_told_in_advance() -> None:
    """Two sockets never share a name (names are random, not counters)."""
    from compozy_agent.server import bind_exec_socket

    root = tempfile.mkdtemp(prefix="czn-", dir="/tmp")
    try:
        made = [bind_exec_socket(os.path.join(root, "exec")) for _ in range(2)]
        assert made[0][1] != made[1][1]
        for sock, _ in made:
            assert isinstance(sock, socket.socket)
            sock.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
