"""The loopback redirect listener: 127.0.0.1 only, one valid callback from our own user,
then closed; the response's issuer checked (RFC 9207)."""

from __future__ import annotations

import os
import socket
import time

import anyio
import httpx
import pytest

from compozy_agent import oidc
from compozy_agent.loopback import LoopbackRedirect, _proc_address, tcp_peer_uid
from support.login import get_as_another_user, run_python_as_another_user

pytestmark = pytest.mark.anyio
ISSUER = "https://id.example.test"
OTHER_ISSUER = "https://attacker.example.test"


async def test_accepts_the_callback_with_the_right_state_then_closes() -> None:
    listener = LoopbackRedirect("s-123")
    await listener.start()
    try:
        assert listener.redirect_uri == f"http://127.0.0.1:{listener.port}/callback"
        async with httpx.AsyncClient() as client:
            forged = await client.get(listener.redirect_uri, params={"code": "evil", "state": "x"})
            assert forged.status_code == 400
            missing = await client.get(listener.redirect_uri, params={"code": "evil"})
            assert missing.status_code == 400
            twice = await client.get(f"{listener.redirect_uri}?code=evil&state=s-123&state=x")
            assert twice.status_code == 400
            other = await client.get(f"http://127.0.0.1:{listener.port}/favicon.ico")
            assert other.status_code == 404
            good = await client.get(listener.redirect_uri,
                                    params={"code": "c0de", "state": "s-123"})
            assert good.status_code == 200 and "You can close this tab" in good.text
            assert good.headers["cache-control"] == "no-store"
            assert "c0de" not in good.text
            again = await client.get(listener.redirect_uri, params={"code": "c2", "state": "s-123"})
            assert again.status_code == 409
        assert await listener.wait() == "c0de"
    finally:
        await listener.close()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(listener.redirect_uri)


async def test_provider_error_completes_the_login_with_the_error() -> None:
    listener = LoopbackRedirect("st")
    await listener.start()
    try:
        async with httpx.AsyncClient() as client:
            page = await client.get(listener.redirect_uri,
                                    params={"error": "access_denied", "state": "st"})
        assert page.status_code == 200 and "access_denied" in page.text
        with pytest.raises(oidc.OAuthError) as caught:
            await listener.wait()
        assert caught.value.error == "access_denied"
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("params", "required"),
    [
        ({"iss": OTHER_ISSUER}, True),  # the honest provider's response, through a mix-up
        ({"iss": OTHER_ISSUER}, False),  # compared whenever present
        ({}, True),  # advertised, yet missing
    ],
    ids=["another-issuer", "another-issuer-not-advertised", "missing-but-advertised"],
)
async def test_a_response_from_another_issuer_ends_the_login_without_a_code(
    params: dict[str, str], required: bool
) -> None:
    """RFC 9207 section 2.4: the response is refused, so no code is ever exchanged."""
    listener = LoopbackRedirect("st", issuer=ISSUER, issuer_required=required)
    await listener.start()
    try:
        async with httpx.AsyncClient() as client:
            page = await client.get(listener.redirect_uri,
                                    params={"code": "honest-code", "state": "st", **params})
        assert page.status_code == 400 and "Login refused" in page.text
        with pytest.raises(oidc.CallbackError, match="another issuer"):
            await listener.wait()
    finally:
        await listener.close()


async def test_the_issuer_is_accepted_when_it_matches_or_is_absent_and_not_advertised() -> None:
    for params, required in (({"iss": ISSUER}, True), ({"iss": ISSUER + "/"}, True),
                             ({}, False)):
        listener = LoopbackRedirect("st", issuer=ISSUER, issuer_required=required)
        await listener.start()
        try:
            async with httpx.AsyncClient() as client:
                page = await client.get(listener.redirect_uri,
                                        params={"code": "c0de", "state": "st", **params})
            assert page.status_code == 200
            assert await listener.wait() == "c0de"
        finally:
            await listener.close()


async def test_binds_loopback_only() -> None:
    listener = LoopbackRedirect("st")
    await listener.start()
    try:
        assert listener.addresses == [("127.0.0.1", listener.port)]
    finally:
        await listener.close()


def test_the_kernel_names_the_owner_of_a_local_tcp_peer() -> None:
    """/proc/net/tcp lookup: our own connected socket is found with our uid."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("Linux only")
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, peer = server.accept()
        with accepted:
            assert peer == client.getsockname()
            assert tcp_peer_uid(peer, accepted.getsockname()) == os.getuid()
            assert tcp_peer_uid((peer[0], peer[1] ^ 1), accepted.getsockname()) is None


async def test_a_callback_from_another_uid_is_refused_and_the_login_goes_on() -> None:
    """Another user on the machine learned the state (say, from a process list):
    their request is refused with 403 and does not end the login."""
    listener = LoopbackRedirect("learned-state")
    await listener.start()
    try:
        url = f"{listener.redirect_uri}?code=attackers-code&state=learned-state"
        status = await anyio.to_thread.run_sync(get_as_another_user, url)
        assert status == 403
        assert listener.refused_peers == 1
        async with httpx.AsyncClient() as client:
            page = await client.get(listener.redirect_uri,
                                    params={"code": "c0de", "state": "learned-state"})
        assert page.status_code == 200
        assert await listener.wait() == "c0de"
    finally:
        await listener.close()


_SEND_AND_CLOSE = (
    "import socket, sys\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "print(s.getsockname()[1], flush=True)\n"
    "s.sendall(('GET /callback?code=attackers-code&state=learned-state HTTP/1.1\\r\\n'\n"
    "           'Host: 127.0.0.1\\r\\n\\r\\n').encode())\n"
    "s.close()\n"
)


def _send_and_close_as_another_user(port: int) -> int:
    """Another user sends the forged callback and closes at once; the port it sent from."""
    return int(run_python_as_another_user(_SEND_AND_CLOSE, str(port)))


def _time_wait_entry(port: int) -> list[str]:
    """The /proc/net/tcp row of our peer at ``port`` once it is a TIME_WAIT entry
    (tw_substate 05 or 06), read while the event loop is blocked on purpose."""
    wanted = _proc_address("127.0.0.1", port, mapped=False)
    deadline = time.monotonic() + 20
    row: list[str] = []
    while not row or row[3] not in ("05", "06"):
        assert time.monotonic() < deadline, f"no TIME_WAIT entry for port {port}: {row}"
        with open("/proc/net/tcp", encoding="ascii") as table:
            row = next((fields for fields in map(str.split, table) if fields[1] == wanted), [])
    return row


async def test_a_callback_from_another_uid_that_closed_its_socket_is_refused() -> None:
    """Another user sends the forged callback and closes the connection before the
    agent looks. The kernel soon lists the closed socket as a TIME_WAIT entry of uid 0,
    whoever owned it: an agent run as root must not take that for its own socket."""
    if os.getuid() != 0 or not os.path.exists("/proc/net/tcp"):
        pytest.skip("the TIME_WAIT entry passes for a socket of uid 0: needs a root agent")
    listener = LoopbackRedirect("learned-state")
    await listener.start()
    try:
        # The event loop is blocked meanwhile: the listener reads the request only after
        # the attacker's socket has turned into a TIME_WAIT entry (tw_substate 05 or 06).
        row = _time_wait_entry(_send_and_close_as_another_user(listener.port))
        assert row[7] == "0"  # what the kernel says of a closed socket's owner
        with anyio.fail_after(10):
            while listener.refused_peers == 0:  # noqa: ASYNC110 - nothing signals a refusal
                await anyio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            page = await client.get(listener.redirect_uri,
                                    params={"code": "c0de", "state": "learned-state"})
        assert page.status_code == 200
        assert await listener.wait() == "c0de"
    finally:
        await listener.close()
