"""A fault-injecting TCP proxy on loopback, between the agent and the test provider.

It forwards bytes both ways, and on request breaks the network the way real
networks break. The mode is read at each *exchange*: the first bytes of a
request on a connection (the client speaks again after the upstream answered),
so a keep-alive connection gets a fresh decision for every HTTP request.

=================  ==========================================================
``pass``           forward everything
``refuse``         nothing listens on the port: connecting fails with
                   ECONNREFUSED (and open connections are reset)
``reset``          reset the connection before forwarding the request: the
                   provider never sees it
``reset_after``    forward the request, then reset the connection when the
                   answer starts: the provider acted (a refresh token was
                   rotated) but the client never hears of it
``stall``          take the request and never answer it (nor forward it)
``delay``          forward the request, hold the whole answer ``delay`` seconds,
                   then deliver it
``drip``           forward the request, deliver the answer one byte every
                   ``drip_interval`` seconds
``flap``           per exchange, ``reset`` with probability ``flap_rate``, else
                   ``pass``; random from ``seed``, so a run can be repeated
=================  ==========================================================

Bounds: it listens on 127.0.0.1 only, connects only to the upstream it is
given (a loopback port), holds at most MAX_CONNECTIONS at once, and
:meth:`FaultProxy.stop` ends every connection it holds (stalls included).

It runs its own asyncio loop in a thread, so synchronous tests that drive
agent and CLI subprocesses can use it; :meth:`FaultProxy.wait_for` waits (with
a deadline) until it has seen a number of exchanges of some outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Mode = Literal["pass", "refuse", "reset", "reset_after", "stall", "delay", "drip", "flap"]
MAX_CONNECTIONS = 64
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Fault:
    """A mode and its parameters."""

    mode: Mode = "pass"
    delay: float = 0.0
    drip_interval: float = 0.05
    flap_rate: float = 0.5
    #: Apply to this many exchanges, then pass (None: until set again).
    exchanges: int | None = None


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN: a reset, as a broken network sends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Start with :meth:`start` (or as a context manager); set faults with :meth:`set`."""

    def __init__(self, seed: int = 1) -> None:
        self._fault = Fault()
        self._left: int | None = None
        self._random = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._upstream: tuple[str, int] | None = None
        self._seen = threading.Condition()
        #: Exchanges so far, by outcome ("pass", "reset", "reset_after", "stall", ...).
        self.outcomes: Counter[str] = Counter()
        self.port = 0

    # -- life ------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close_all())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def forward_to(self, port: int) -> None:
        """Where the bytes go: a port on 127.0.0.1 (the provider's own)."""
        self._upstream = (LOOPBACK, port)

    def set(self, mode: Mode, **parameters: float) -> None:
        """Apply a fault to every exchange from now on (``refuse`` also stops listening),
        or to the next ``exchanges`` of them."""
        fault = Fault(mode, **parameters)  # type: ignore[arg-type]
        assert self._loop is not None, "start() first"
        asyncio.run_coroutine_threadsafe(self._apply(fault), self._loop).result(10)

    def count(self, outcome: str) -> int:
        with self._seen:
            return self.outcomes[outcome]

    def wait_for(self, outcome: str, count: int, timeout: float) -> bool:
        """Block until ``count`` exchanges ended in ``outcome``; False at the deadline."""
        with self._seen:
            return self._seen.wait_for(lambda: self.outcomes[outcome] >= count, timeout)

    # -- the loop's side ---------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, LOOPBACK, self.port, reuse_address=True, backlog=MAX_CONNECTIONS)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, fault: Fault) -> None:
        self._fault = fault
        self._left = fault.exchanges
        if fault.mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
                for writer in list(self._writers):
                    _abort_with_reset(writer)
        elif self._server is None:
            await self._listen()  # the same port again

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    def _record(self, outcome: str) -> None:
        with self._seen:
            self.outcomes[outcome] += 1
            self._seen.notify_all()

    def _decide(self) -> Fault:
        fault = self._fault
        if self._left is not None:
            if self._left <= 0:
                return Fault()
            self._left -= 1
        if fault.mode == "flap":
            mode: Mode = "reset" if self._random.random() < fault.flap_rate else "pass"
            return Fault(mode)
        return fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS or self._upstream is None:
            _abort_with_reset(writer)
            return
        self._writers.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        exchange = _Exchange()
        pump: asyncio.Task[None] | None = None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if exchange.fault is None or exchange.answered:  # a new request
                    fault = self._decide()
                    exchange.start(fault)
                    if fault.mode in ("reset", "refuse"):
                        self._record("reset" if fault.mode == "reset" else "refused")
                        _abort_with_reset(writer)
                        return
                    if fault.mode == "stall":
                        self._record("stall")
                        await reader.read()  # hold it until the client gives up (or stop())
                        return
                if upstream is None:
                    upstream = await asyncio.open_connection(*self._upstream)
                    self._writers.add(upstream[1])
                    pump = asyncio.create_task(self._answers(upstream[0], writer, exchange))
                upstream[1].write(data)
                await upstream[1].drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await pump
            for stream in (writer, upstream[1] if upstream else None):
                if stream is not None:
                    self._writers.discard(stream)
                    stream.transport.abort()

    async def _answers(self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       exchange: _Exchange) -> None:
        """Upstream to client, under the fault decided for the exchange in progress."""
        while True:
            data = await upstream.read(65536)
            if not data:
                writer.transport.abort()
                return
            fault = exchange.fault or Fault()
            first = not exchange.answered
            exchange.answered = True
            if first:
                self._record(fault.mode)
            if fault.mode == "reset_after":
                _abort_with_reset(writer)
                return
            if fault.mode == "delay" and first:
                await asyncio.sleep(fault.delay)
            if fault.mode == "drip":
                for index in range(len(data)):
                    writer.write(data[index:index + 1])
                    await writer.drain()
                    await asyncio.sleep(fault.drip_interval)
            else:
                writer.write(data)
                await writer.drain()


@dataclass
class _Exchange:
    """The request in progress on one connection, and the fault decided for it."""

    fault: Fault | None = None
    #: The upstream has started answering it: the client's next bytes are a new request.
    answered: bool = False

    def start(self, fault: Fault) -> None:
        self.fault = fault
        self.answered = False


@contextlib.contextmanager
def fault_proxy(seed: int = 1) -> Iterator[FaultProxy]:
    with FaultProxy(seed) as proxy:
        yield proxy
