"""``compozy_client.requests.CompozyAuth``: Compozy tokens for requests.

    >>> import requests
    >>> from compozy_client.requests import CompozyAuth
    >>> session = requests.Session()
    >>> session.auth = CompozyAuth(profile="prod")

Each request carries the profile's current token; a 401 makes the agent
replace it (once, for all concurrent callers) and the request is sent again
once, from a response hook, the way requests' own ``HTTPDigestAuth`` answers
its challenge (the rule is in :mod:`compozy_client.httpauth`). Safe to share
between threads: it keeps no state between requests.

A request is sent again only when its body can be: none, bytes or text, or a
file whose position could be read before sending (it is rewound). A generator
or a pipe is not, so its 401 is returned, though the agent has still been told
and the next request gets a new token.

Needs requests (``pip install 'compozy-agent[requests]'``); importing
:mod:`compozy_client` alone never loads it.
"""

from __future__ import annotations

import functools
from typing import Any

try:
    import requests
    from requests.auth import AuthBase
    from requests.cookies import extract_cookies_to_jar
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError("compozy_client.requests needs requests: "
                              "pip install 'compozy-agent[requests]'", name="requests") from missing

from compozy_client.connection import DEFAULT_TIMEOUT
from compozy_client.httpauth import (
    Presented,
    TokenSource,
    check_transport,
    token_source,
)


class CompozyAuth(AuthBase):
    """A ``requests`` auth presenting the agent's token for ``profile``.

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

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        check_transport(request.url or "", self.source.https_only)
        presented = self.source.present(request.method or "GET", request.url or "")
        _authorize(request, presented)
        # Everything the hook needs travels with this request, not in self:
        # concurrent requests through one CompozyAuth never see each other's.
        request.register_hook("response", functools.partial(
            self._retry_once_on_401, presented=presented,
            body_position=_body_position(request.body)))
        return request

    def _retry_once_on_401(
        self, response: requests.Response, *, presented: Presented,
        body_position: int | None, **send_options: Any,
    ) -> requests.Response:
        method = response.request.method or "GET"
        url = response.request.url or ""
        sent = presented.headers["Authorization"]
        nonce = self.source.nonce_demanded(presented, url, response.status_code,
                                           response.headers)
        if nonce is not None:  # RFC 9449 section 9: once, with the nonce the server sent
            if not _can_send_again(response, body_position):
                return response
            presented = self.source.present(method, url, nonce=nonce)
            sent = presented.headers["Authorization"]
            response = _send_again(response, presented, send_options)
            nonce = self.source.nonce_demanded(presented, url, response.status_code,
                                               response.headers)
        # A redirect to another host drops the header (requests' rebuild_auth), and the
        # retried request carries another: neither 401 says anything about this token.
        if nonce is not None or response.status_code != 401 \
                or response.request.headers.get("Authorization") != sent:
            return response
        replacement = self.source.replacement(presented, method, url)
        if replacement is None or not _can_send_again(response, body_position):
            return response
        return _send_again(response, replacement, send_options)


def _can_send_again(response: requests.Response, body_position: int | None) -> bool:
    """Whether the request can go out again: a transport adapter to send it through (a
    test double may leave it unset) and a body that can be sent again (rewound here)."""
    return getattr(response, "connection", None) is not None \
        and _rewind(response.request.body, body_position)


def _send_again(response: requests.Response, presented: Presented,
                send_options: dict[str, Any]) -> requests.Response:
    """``response``'s request once more, with ``presented``'s headers."""
    adapter = response.connection
    response.content  # noqa: B018 (read it, so its connection goes back to the pool)
    response.close()
    retry = response.request.copy()
    if retry._cookies is not None:  # cookies the 401 set go along, as HTTPDigestAuth does
        extract_cookies_to_jar(retry._cookies, response.request, response.raw)
        retry.prepare_cookies(retry._cookies)
    _authorize(retry, presented)
    # Sent through the adapter, not the session: the session's hooks (this one
    # included) do not run again, so there is no further retry.
    second: requests.Response = adapter.send(retry, **send_options)
    second.history.append(response)
    second.request = retry
    return second


def _authorize(request: requests.PreparedRequest, presented: Presented) -> None:
    """Put ``presented``'s headers on ``request``."""
    if not presented.dpop:
        request.headers.pop("DPoP", None)
    request.headers.update(presented.headers)


def _body_position(body: object) -> int | None:
    """Where a file body starts, so it can be sent again; None for a body that is not a file
    or cannot tell (a pipe)."""
    tell = getattr(body, "tell", None)
    if body is None or isinstance(body, bytes | str) or tell is None:
        return None
    try:
        position = tell()
    except OSError:
        return None
    return position if isinstance(position, int) else None


def _rewind(body: object, position: int | None) -> bool:
    """Make ``body`` ready to be sent again; False when it cannot be."""
    if body is None or isinstance(body, bytes | str):
        return True
    seek = getattr(body, "seek", None)
    if position is None or seek is None:
        return False
    try:
        seek(position)
    except OSError:
        return False
    return True


__all__ = ["CompozyAuth"]
