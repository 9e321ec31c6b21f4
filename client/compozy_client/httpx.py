"""``compozy_client.httpx.CompozyAuth``: Compozy tokens for httpx clients.

    >>> import httpx
    >>> from compozy_client.httpx import CompozyAuth
    >>> client = httpx.Client(auth=CompozyAuth(profile="prod"))

Each request carries the profile's current token (for a DPoP-bound profile,
``Authorization: DPoP`` and a fresh proof from the agent); a 401 makes the
agent replace it (once, for all concurrent callers) and the request is sent
again once, after at most one retry with a DPoP nonce the server demanded
(the rules are in :mod:`compozy_client.httpauth`). The sync flow blocks on
the agent's socket; the async flow uses asyncio (httpx's AsyncClient under
asyncio, or anyio on asyncio; not trio).

A request is sent again only when its body was read: bytes, text, JSON and
form bodies are; a streamed body (an iterator or async iterator, a multipart
upload) is not, so its 401 is returned, though the agent has still been told
and the next request gets a new token. ``request.read()`` (or
``await request.aread()``) before sending makes a streamed body replayable.

Needs httpx (``pip install 'compozy-agent[httpx]'``); importing
:mod:`compozy_client` alone never loads it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

try:
    import httpx
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError("compozy_client.httpx needs httpx: "
                              "pip install 'compozy-agent[httpx]'", name="httpx") from missing

from compozy_client.connection import DEFAULT_TIMEOUT
from compozy_client.httpauth import (
    Presented,
    TokenSource,
    check_transport,
    token_source,
)


class CompozyAuth(httpx.Auth):
    """An ``httpx.Auth`` presenting the agent's token for ``profile``.

    ``scope`` (a list, or one space-separated string) and ``audience`` ask for
    a narrower token, ``min_valid`` for one valid that many more seconds,
    ``timeout`` bounds each call to the agent: as in
    :func:`~compozy_client.get_token`, which raises
    :class:`~compozy_client.errors.NotLoggedIn` (and the other
    :class:`~compozy_client.errors.CompozyError`\\ s) out of the request.
    A token is sent over https, or plain http to a loopback address; any other
    URL raises :class:`~compozy_client.errors.UsageError` before a token is
    asked for, unless ``https_only=False``.
    """

    def __init__(
        self,
        profile: str | None = None,
        *,
        scope: str | list[str] | tuple[str, ...] | None = None,
        audience: str | None = None,
        min_valid: float = 0.0,
        timeout: float = DEFAULT_TIMEOUT,
        https_only: bool = True,
    ) -> None:
        self.source: TokenSource = token_source(profile, scope, audience, min_valid, timeout,
                                                https_only)

    def __repr__(self) -> str:
        return f"CompozyAuth({self.source!r})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        check_transport(str(request.url), self.source.https_only)
        method, url = request.method, str(request.url)
        presented = self.source.present(method, url)
        sent = _authorize(request, presented)
        response = yield request
        nonce = self.source.nonce_demanded(presented, url, response.status_code,
                                           response.headers)
        if nonce is not None and _body_was_read(request):  # RFC 9449 section 9: once
            presented = self.source.present(method, url, nonce=nonce)
            sent = _authorize(request, presented)
            response = yield request
            nonce = self.source.nonce_demanded(presented, url, response.status_code,
                                               response.headers)
        if nonce is not None or not _rejected(response, sent):
            return
        replacement = self.source.replacement(presented, method, url)
        if replacement is not None and _body_was_read(request):
            _authorize(request, replacement)
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        check_transport(str(request.url), self.source.https_only)
        method, url = request.method, str(request.url)
        presented = await self.source.async_present(method, url)
        sent = _authorize(request, presented)
        response = yield request
        nonce = self.source.nonce_demanded(presented, url, response.status_code,
                                           response.headers)
        if nonce is not None and _body_was_read(request):
            presented = await self.source.async_present(method, url, nonce=nonce)
            sent = _authorize(request, presented)
            response = yield request
            nonce = self.source.nonce_demanded(presented, url, response.status_code,
                                               response.headers)
        if nonce is not None or not _rejected(response, sent):
            return
        replacement = await self.source.async_replacement(presented, method, url)
        if replacement is not None and _body_was_read(request):
            _authorize(request, replacement)
            yield request


def _authorize(request: httpx.Request, presented: Presented) -> str:
    """Put ``presented``'s headers on ``request``; the Authorization value sent."""
    if not presented.dpop:
        request.headers.pop("DPoP", None)
    request.headers.update(presented.headers)
    return presented.headers["Authorization"]


def _rejected(response: httpx.Response, sent: str) -> bool:
    """A 401 to a request that carried our token (after a redirect to another origin httpx
    drops the header: that host's 401 says nothing about the token)."""
    return response.status_code == 401 \
        and response.request.headers.get("Authorization") == sent


def _body_was_read(request: httpx.Request) -> bool:
    """Whether the body is in memory, so the request can be sent again as it was."""
    try:
        request.content  # noqa: B018 (raises RequestNotRead for a body not read)
    except httpx.RequestNotRead:
        return False
    return True


__all__ = ["CompozyAuth"]
