"""A fault-injecting fake OAuth provider (aiohttp), for what a real one won't do on demand.

Its token endpoint answers each request with the next scripted behaviour:
success (with a chosen ``expires_in`` shape, rotation, a custom Date header),
a hang, a connection reset, a 5xx, a 429 with Retry-After, a malformed body,
a form-encoded body, or an OAuth error. Every request is recorded. It is used
beside the real provider (tests/provider), never instead of it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


@dataclass
class Behaviour:
    kind: str = "ok"  # ok | hang | reset | status | error | malformed | form
    status: int = 200
    expires_in: Any = 3600  # a number, a string, or None to leave it out
    rotate: bool = True
    retry_after: str | None = None
    error: str = "invalid_grant"
    date: str | None = None


@dataclass
class FakeProvider:
    base_url: str = ""
    script: list[Behaviour] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def issuer(self) -> str:
        return self.base_url

    def then(self, *behaviours: Behaviour) -> FakeProvider:
        self.script.extend(behaviours)
        return self

    def refresh_requests(self) -> list[dict[str, str]]:
        return [r for r in self.requests if r.get("grant_type") == "refresh_token"]

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.base_url,
                "authorization_endpoint": f"{self.base_url}/auth",
                "token_endpoint": f"{self.base_url}/token",
                "device_authorization_endpoint": f"{self.base_url}/device/auth",
                "revocation_endpoint": f"{self.base_url}/revoke",
            }
        )

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post())
        self.requests.append({k: str(v) for k, v in form.items()})
        behaviour = self.script.pop(0) if self.script else Behaviour()
        headers = {"Date": behaviour.date} if behaviour.date else {}
        match behaviour.kind:
            case "hang":
                await asyncio.sleep(3600)
            case "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            case "status":
                if behaviour.retry_after:
                    headers["Retry-After"] = behaviour.retry_after
                return web.Response(
                    status=behaviour.status, text="upstream trouble", headers=headers
                )
            case "error":
                return web.json_response({"error": behaviour.error}, status=400, headers=headers)
            case "malformed":
                return web.Response(
                    text="{not json", content_type="application/json", headers=headers
                )
        number = next(self.counter)
        body: dict[str, Any] = {"access_token": f"fake-at-{number}", "token_type": "bearer"}
        if behaviour.expires_in is not None:
            body["expires_in"] = behaviour.expires_in
        if behaviour.rotate:
            body["refresh_token"] = f"fake-rt-{number}"
        if behaviour.kind == "form":
            text = "&".join(f"{k}={v}" for k, v in body.items())
            return web.Response(
                text=text, content_type="application/x-www-form-urlencoded", headers=headers
            )
        return web.json_response(body, headers=headers)

    async def revoke(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.requests.append({"revoke": str(form.get("token_type_hint"))})
        return web.Response()


@pytest.fixture
async def fake_provider() -> AsyncIterator[FakeProvider]:
    """A fake provider on 127.0.0.1 in the test's event loop (anyio tests, asyncio backend)."""
    fake = FakeProvider()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", fake.discovery)
    app.router.add_post("/token", fake.token)
    app.router.add_post("/revoke", fake.revoke)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()
