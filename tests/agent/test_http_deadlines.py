"""Issue 16 at the httpx edge: a deadline over each whole exchange, the send time of
each request, and a refused connection said plainly."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from compozy_agent import oidc
from compozy_agent.http import ProviderClient

pytestmark = pytest.mark.anyio

ISSUER = "https://auth.example.test"
META = oidc.ProviderMetadata(issuer=ISSUER, token_endpoint=f"{ISSUER}/token")
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def test_a_dripping_answer_is_cut_at_the_deadline_over_the_whole_exchange() -> None:
    """One byte every 20 ms: each read is quick, so httpx's read timeout never fires;
    only a deadline around the whole exchange ends it."""
    async def drip() -> AsyncIterator[bytes]:
        for byte in b'{"access_token": "' + b"x" * 400 + b'"}':
            await anyio.sleep(0.02)
            yield bytes([byte])

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=drip()))
    async with ProviderClient(now=Clock(), transport=transport, timeout=0.2) as client:
        client.call_deadline = 0.5
        started = anyio.current_time()
        with pytest.raises(oidc.ProviderUnreachable) as caught:
            await client.refresh(META, client_id="cli", refresh_token="rt-secret")
        elapsed = anyio.current_time() - started
    assert elapsed < 2.0, f"the exchange ran {elapsed:.1f} s"
    assert caught.value.host == "auth.example.test"
    assert "no complete answer within" in str(caught.value)
    assert "rt-secret" not in str(caught.value)


async def test_the_send_time_is_recorded_and_the_token_life_counts_from_it() -> None:
    clock = Clock()

    def slow_provider(request: httpx.Request) -> httpx.Response:
        clock.now += 50  # the answer takes 50 s to arrive
        return httpx.Response(200, json={"access_token": "at", "expires_in": 60})

    async with ProviderClient(now=clock, transport=httpx.MockTransport(slow_provider)) as client:
        response = await client.refresh(META, client_id="cli", refresh_token="rt")
        sent = await client.send(oidc.HttpRequest(method="GET", url=f"{ISSUER}/x"))
    assert response.received_at == T0 + 50
    assert response.issued_at == T0
    assert response.expires_at == T0 + 60  # not T0 + 50 + 60
    assert (sent.sent_at, sent.received_at) == (T0 + 50, T0 + 100)


async def test_a_refused_connection_names_the_host_and_port() -> None:
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with ProviderClient(now=Clock()) as client:
        with pytest.raises(oidc.ProviderUnreachable) as caught:
            await client.send(oidc.HttpRequest(method="GET", url=f"http://127.0.0.1:{port}/t"))
    assert str(caught.value) == f"connection refused by 127.0.0.1:{port}"
    assert caught.value.host == f"127.0.0.1:{port}"


async def test_a_refused_connection_without_a_port_in_the_url_names_the_default_port() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    async with ProviderClient(now=Clock(), transport=httpx.MockTransport(refused)) as client:
        with pytest.raises(oidc.ProviderUnreachable) as caught:
            await client.refresh(META, client_id="cli", refresh_token="rt-secret")
    assert str(caught.value) == "connection refused by auth.example.test:443"
    assert "Errno" not in str(caught.value) and "rt-secret" not in str(caught.value)
