"""The fault-injecting proxy does each fault it claims, against a plain local HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from support.fault_proxy import FaultProxy

BODY = b"0123456789" * 4


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several exchanges on one connection
    served = 0

    def do_GET(self) -> None:
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the proxy resets connections on purpose: no tracebacks for those


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    _Handler.served = 0
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream: ThreadingHTTPServer) -> Iterator[FaultProxy]:
    with FaultProxy(seed=7) as started:
        started.forward_to(upstream.server_address[1])
        yield started


def get(proxy: FaultProxy, timeout: float = 5.0) -> httpx.Response:
    return httpx.get(f"{proxy.url}/x", timeout=timeout)


def test_pass_and_keep_alive(proxy: FaultProxy) -> None:
    with httpx.Client(timeout=5) as client:
        for _ in range(3):
            assert client.get(f"{proxy.url}/x").content == BODY
    assert proxy.count("pass") == 3 and _Handler.served == 3


def test_refuse_stops_listening_and_comes_back_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.set("refuse")
    with pytest.raises(httpx.ConnectError):
        get(proxy)
    proxy.set("pass")
    assert proxy.port == port and get(proxy).content == BODY


def test_reset_before_forwarding_never_reaches_the_server(proxy: FaultProxy) -> None:
    proxy.set("reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        get(proxy)
    assert _Handler.served == 0 and proxy.count("reset") == 1


def test_reset_after_forwarding_reaches_the_server_and_loses_the_answer(
    proxy: FaultProxy,
) -> None:
    proxy.set("reset_after", exchanges=1)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        get(proxy)
    assert _Handler.served == 1
    assert get(proxy).content == BODY  # only the one exchange


def test_stall_never_answers(proxy: FaultProxy) -> None:
    proxy.set("stall")
    with pytest.raises(httpx.ReadTimeout):
        get(proxy, timeout=0.5)
    assert _Handler.served == 0


def test_delay_and_drip_hold_the_answer(proxy: FaultProxy) -> None:
    proxy.set("delay", delay=0.5)
    started = time.monotonic()
    assert get(proxy).content == BODY
    assert time.monotonic() - started >= 0.5
    proxy.set("drip", drip_interval=0.005)
    started = time.monotonic()
    assert get(proxy).content == BODY
    # Headers and body, one byte at a time: well over 100 bytes.
    assert time.monotonic() - started >= 100 * 0.005


def test_flap_is_random_per_exchange_and_repeatable(upstream: ThreadingHTTPServer) -> None:
    outcomes = []
    for _ in range(2):
        with FaultProxy(seed=3) as proxy:
            proxy.forward_to(upstream.server_address[1])
            proxy.set("flap", flap_rate=0.5)
            run = []
            for _ in range(20):
                try:
                    run.append(get(proxy).status_code == 200)
                except httpx.TransportError:
                    run.append(False)
            outcomes.append(run)
    assert outcomes[0] == outcomes[1]
    assert 4 <= outcomes[0].count(False) <= 16
