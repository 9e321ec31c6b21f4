"""The loopback redirect listener of the browser login (RFC 8252 section 7.3).

One listener per login, on ``127.0.0.1`` and a port the kernel picks (never
``localhost``, which may resolve elsewhere; RFC 8252 section 8.3). It serves
``/callback`` only, and accepts exactly one callback that carries the login's
``state``: that callback's query (a ``code``, or an ``error`` such as
``access_denied``) completes the listener, the browser is told it may close
the tab, and the listener closes. A callback with a wrong or missing state is
refused and does not end the login (it may be a forged request, RFC 9700
section 4.7). No query value is logged: the code is a credential.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
from typing import Final

from aiohttp import web

log = logging.getLogger("compozy_agent.loopback")

CALLBACK_PATH: Final = "/callback"

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em}}</style>
</head><body><h1>{title}</h1><p>{body}</p></body></html>
"""


def _page(title: str, body: str, status: int) -> web.Response:
    text = _PAGE.format(title=html.escape(title), body=html.escape(body))
    response = web.Response(text=text, content_type="text/html", status=status)
    # The page follows a credential-bearing URL: keep it out of caches and referrers.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


class LoopbackRedirect:
    """Listens for one authorization response on ``http://127.0.0.1:<port>/callback``."""

    def __init__(self, expected_state: str) -> None:
        self._expected_state = expected_state
        self._result: asyncio.Future[dict[str, str]] | None = None
        self._runner: web.AppRunner | None = None
        self.port: int = 0

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{CALLBACK_PATH}"

    async def start(self) -> None:
        """Bind 127.0.0.1 on a free port and start serving."""
        self._result = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, self._callback)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, reuse_address=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listener is bound (for tests and logs)."""
        assert self._runner is not None
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    async def wait(self) -> dict[str, str]:
        """The query parameters of the one accepted callback (``code``/``error``...)."""
        assert self._result is not None, "start() first"
        return await asyncio.shield(self._result)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._result is not None and not self._result.done():
            self._result.cancel()

    async def _callback(self, request: web.Request) -> web.Response:
        assert self._result is not None
        query = {key: request.query.getone(key) for key in request.query}
        if self._result.done():
            return _page("Login already finished", "You can close this tab.", 409)
        state = query.get("state", "")
        if not hmac.compare_digest(state.encode(), self._expected_state.encode()):
            log.warning("refused a login callback whose state does not match")
            return _page("Login refused",
                         "This response does not belong to the login in progress.", 400)
        self._result.set_result(query)
        if "error" in query:
            return _page("Login not completed",
                         f"The provider said: {query['error']}. "
                         "You can close this tab and return to your terminal.", 200)
        return _page("Logged in",
                     "You are logged in to Compozy. You can close this tab.", 200)
