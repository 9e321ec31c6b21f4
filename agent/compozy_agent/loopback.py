"""The loopback redirect listener of the browser login (RFC 8252 section 7.3).

One listener per login, on ``127.0.0.1`` and a port the kernel picks (never
``localhost``, which may resolve elsewhere; RFC 8252 section 8.3). It serves
``/callback`` only, and accepts exactly one callback, checked in this order:

1. On Linux (with /proc), the TCP peer must be a socket of our own uid, found in
   ``/proc/net/tcp`` (and ``tcp6``, for a client that reaches 127.0.0.1 through
   an IPv4-mapped address). Another user on the machine can reach 127.0.0.1
   too; if they learn the ``state`` they could otherwise finish the login with
   a code of their own account (login CSRF). Refused with 403, as is a peer
   socket no process holds any more: a closed connection's TIME_WAIT entry is
   listed as uid 0 whoever closed it (which would pass for a root agent).
2. Exactly one ``state``, equal to the login's (constant-time compare,
   RFC 6749 section 10.12). Refused with 400.

A refused request does not end the login (it may be forged, RFC 9700 section
4.7). The first request that passes both *is* the authorization response of
this login: it completes the listener, whatever it carries, and the listener
answers every later request with 409. Its outcome is
:func:`compozy_agent.oidc.parse_callback`'s: the code, or the provider's
``error``, or a refusal when the response names another issuer than the one
the login was started with (RFC 9207 mix-up defence) or carries no code.

No query value is logged: the code is a credential; provider text reaches the
page HTML-escaped and nowhere else.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import os
import socket
import struct
import sys
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web

from compozy_agent import oidc
from compozy_client.safetext import one_line

log = logging.getLogger("compozy_agent.loopback")

CALLBACK_PATH: Final = "/callback"
#: Where the kernel lists TCP sockets with their owners' uids (Linux only).
PROC_NET_TCP: Final = ("/proc/net/tcp", "/proc/net/tcp6")
#: Whether callbacks are checked against the peer socket's uid: where the kernel lists
#: sockets with their owners (Linux with /proc). Where it does, a peer it does not list
#: is refused.
CHECKS_PEER_UID: Final = sys.platform.startswith("linux") and os.path.exists(PROC_NET_TCP[0])

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


def _proc_address(ip: str, port: int, *, mapped: bool) -> str:
    """``ip:port`` as /proc/net/tcp{,6} prints it: the address's 32-bit words in host
    byte order, each as 8 hex digits, then the port as 4 (``0100007F:1F90``)."""
    raw = socket.inet_pton(socket.AF_INET6, f"::ffff:{ip}") if mapped else socket.inet_aton(ip)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def tcp_peer_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket at ``peer`` that is connected to our ``local``
    (Linux, IPv4 peers), or None when the kernel lists no such socket, or lists it
    as held by no process (closed; see below)."""
    for path, mapped in zip(PROC_NET_TCP, (False, True), strict=True):
        wanted_local = _proc_address(*peer, mapped=mapped)
        wanted_remote = _proc_address(*local, mapped=mapped)
        try:
            with open(path, encoding="ascii") as table:
                next(table, None)  # the header line
                for line in table:
                    # sl local_address rem_address st queues timer retrnsmt uid timeout inode
                    fields = line.split()
                    if len(fields) > 9 and fields[1] == wanted_local \
                            and fields[2] == wanted_remote:
                        # Inode 0: no process holds the socket any more. Once closed, a
                        # connection soon becomes a TIME_WAIT entry, which the kernel
                        # lists as uid 0 whoever owned it: it vouches for nobody.
                        return None if fields[9] == "0" else int(fields[7])
        except (OSError, ValueError):
            continue
    return None


class LoopbackRedirect:
    """Listens for one authorization response on ``http://127.0.0.1:<port>/callback``.

    ``issuer`` is the issuer the login was started with; the response's RFC 9207
    ``iss`` must equal it when present, and be present when ``issuer_required``
    (the provider's metadata says it sends one).
    """

    def __init__(self, expected_state: str, *, issuer: str | None = None,
                 issuer_required: bool = False) -> None:
        self._expected_state = expected_state
        self._issuer = issuer
        self._issuer_required = issuer_required
        self._result: asyncio.Future[str | oidc.OAuthFailure] | None = None
        self._runner: web.AppRunner | None = None
        self._uid = os.getuid()
        self.port: int = 0
        #: Requests refused because they came from another user (for tests and logs).
        self.refused_peers = 0

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

    async def wait(self) -> str:
        """The authorization code of the one accepted callback.

        Raises :class:`~compozy_agent.oidc.OAuthError` when the provider sent an
        ``error`` (``access_denied``...), :class:`~compozy_agent.oidc.CallbackError`
        when the response cannot be used (another issuer, no code).
        """
        assert self._result is not None, "start() first"
        outcome = await asyncio.shield(self._result)
        if isinstance(outcome, oidc.OAuthFailure):
            raise outcome
        return outcome

    async def close(self) -> None:
        """Stop listening (the port is closed when this returns)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._result is not None and not self._result.done():
            self._result.cancel()

    def _peer_is_ours(self, request: web.Request) -> bool:
        if not CHECKS_PEER_UID:
            return True  # no /proc/net/tcp: other systems are not checked (docs/security.md)
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        if not peer or not local:
            return False
        uid = tcp_peer_uid((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))
        if uid == self._uid:
            return True
        self.refused_peers += 1
        log.warning("refused a login callback from a socket of uid %s: not our user",
                    "unknown" if uid is None else uid)
        return False

    def _state_matches(self, query: list[tuple[str, str]]) -> bool:
        states = [value for key, value in query if key == "state"]
        return len(states) == 1 and hmac.compare_digest(
            states[0].encode(), self._expected_state.encode())

    async def _callback(self, request: web.Request) -> web.Response:
        assert self._result is not None
        if not self._peer_is_ours(request):
            return _page("Login refused",
                         "This response did not come from a program of the user who started "
                         "the login.", 403)
        if self._result.done():
            return _page("Login already finished", "You can close this tab.", 409)
        query = parse_qsl(request.query_string, keep_blank_values=True)
        if not self._state_matches(query):
            log.warning("refused a login callback whose state does not match")
            return _page("Login refused",
                         "This response does not belong to the login in progress.", 400)
        try:
            code: str | oidc.OAuthFailure = oidc.parse_callback(
                request.query_string, self._expected_state, issuer=self._issuer,
                issuer_required=self._issuer_required)
        except oidc.OAuthError as exc:
            self._result.set_result(exc)
            return _page("Login not completed",
                         f"The provider said: {one_line(exc.error, 64)}. "
                         "You can close this tab and return to your terminal.", 200)
        except oidc.OAuthFailure as exc:
            self._result.set_result(exc)
            return _page("Login refused",
                         f"{exc}. Nothing was sent to the provider; you can close this tab "
                         "and start the login again.", 400)
        self._result.set_result(code)
        return _page("Logged in",
                     "You are logged in to Compozy. You can close this tab.", 200)
