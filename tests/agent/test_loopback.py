"""The loopback redirect listener: 127.0.0.1 only, one valid callback, then closed."""

from __future__ import annotations

import httpx
import pytest

from compozy_agent.loopback import LoopbackRedirect

pytestmark = pytest.mark.anyio


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
            other = await client.get(f"http://127.0.0.1:{listener.port}/favicon.ico")
            assert other.status_code == 404
            good = await client.get(listener.redirect_uri,
                                    params={"code": "c0de", "state": "s-123"})
            assert good.status_code == 200 and "You can close this tab" in good.text
            assert good.headers["cache-control"] == "no-store"
            assert "c0de" not in good.text
            again = await client.get(listener.redirect_uri, params={"code": "c2", "state": "s-123"})
            assert again.status_code == 409
        assert await listener.wait() == {"code": "c0de", "state": "s-123"}
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
        assert (await listener.wait())["error"] == "access_denied"
    finally:
        await listener.close()


async def test_binds_loopback_only() -> None:
    listener = LoopbackRedirect("st")
    await listener.start()
    try:
        assert listener.addresses == [("127.0.0.1", listener.port)]
    finally:
        await listener.close()
