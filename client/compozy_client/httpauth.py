"""What the HTTP client adapters share: which token to ask for, and the one retry after a 401.

:mod:`compozy_client.httpx` and :mod:`compozy_client.requests` each plug a
:class:`TokenSource` into their library's auth hook. The rule they both follow
(the same as azure-core's ``BearerTokenCredentialPolicy``):

1. A token goes over https, or plain http to this machine only
   (:func:`check_transport`).
2. Every request asks the agent for a token of the profile given, or else of
   the one the ``rules:`` match for the request's URL (the agent caches it and
   refreshes it ahead of expiry; asking costs one round trip on a Unix
   socket), and carries it in the headers :func:`authorization_headers` builds:
   the only place an ``Authorization`` header is made.
3. A 401 answering a request that carried that token is reported to the agent
   as ``rejected_token`` (:meth:`TokenSource.replacement`): the agent drops the
   token and refreshes once however many callers report it at the same time
   (lifecycle rule 7), so 50 concurrent requests that all get a 401 cost one
   refresh at the provider.
4. The request is sent again once, with the new token, if its body can be sent
   again. The second answer is returned as it is, whatever it is: never a loop.

No lock is held anywhere here: the agent is where concurrent callers meet.
This module imports neither httpx nor requests.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from compozy_client.api import async_get_token, get_token
from compozy_client.connection import DEFAULT_TIMEOUT
from compozy_client.errors import RefreshFailed, UsageError


def authorization_headers(token: str, *, method: str, url: str) -> dict[str, str]:
    """The headers that present ``token`` on a request to ``url`` with ``method``.

    A bearer token (RFC 6750 section 2.1) needs neither ``method`` nor ``url``;
    they are here because a sender-constrained token (DPoP, RFC 9449) is
    presented with a proof bound to both.
    """
    return {"Authorization": f"Bearer {token}"}


def check_transport(url: str, https_only: bool) -> None:
    """Refuse to send a token in the clear beyond this machine (RFC 6750 section 5.3: bearer
    tokens travel over TLS only); plain http to a loopback address stays on the machine.

    Raises :class:`~compozy_client.errors.UsageError` before any token is asked for.
    """
    parts = urlsplit(url)
    if parts.scheme == "http" and _is_loopback(parts.hostname or ""):
        _check_port_owner(parts.hostname or "", parts.port or 80)
        return
    if not https_only or parts.scheme == "https":
        return
    raise UsageError(
        f"refusing to send a Compozy token over {parts.scheme or 'an unknown scheme'} to "
        f"{parts.hostname or 'an unnamed host'}: anyone on the path could read it; use https "
        "(or CompozyAuth(https_only=False) for a network you trust)")


def _check_port_owner(host: str, port: int) -> None:
    """Plain http to this machine: refuse when another user (not root) holds the port."""
    from compozy_client.portowner import foreign_listener

    owner = foreign_listener(port)
    if owner is not None:
        raise UsageError(
            f"refusing to send a Compozy token to http://{host}:{port}: that port is served "
            f"by uid {owner}, not by you (your own server there is not running?)")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True  # RFC 6761 section 6.3
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_token(sent: str, received: str) -> bool:
    """Whether two token strings are equal, compared in constant time."""
    return hmac.compare_digest(sent.encode(), received.encode())


@dataclass(frozen=True)
class TokenSource:
    """Which token an adapter asks for: the arguments of :func:`~compozy_client.get_token`.

    ``timeout`` bounds each call to the agent; ``min_valid`` makes sure a
    token stays valid that many seconds after it is handed out. ``https_only``
    is for the adapters: see :func:`check_transport`.
    """

    profile: str | None = None
    scope: tuple[str, ...] | None = None
    audience: str | None = None
    min_valid: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    https_only: bool = True

    def token(self, url: str) -> str:
        """The token to send to ``url`` (raises :class:`~compozy_client.errors.NotLoggedIn`
        and the other :class:`~compozy_client.errors.CompozyError`\\ s). ``url`` picks the
        profile and audience not given here by the config file's ``rules:``."""
        return get_token(self.profile, scope=self._scope(), audience=self.audience,
                         min_valid=self.min_valid, timeout=self.timeout, url=url)

    async def async_token(self, url: str) -> str:
        """:meth:`token` under asyncio."""
        return await async_get_token(self.profile, scope=self._scope(), audience=self.audience,
                                     min_valid=self.min_valid, timeout=self.timeout, url=url)

    def replacement(self, rejected: str, url: str) -> str | None:
        """Tell the agent a server at ``url`` refused ``rejected`` (401); the token to retry
        with.

        None means "do not retry": the agent refused to replace a token it had
        itself made as a replacement less than 5 s ago (a server that refuses
        every token must not make the agent refresh on every request), or the
        answer is the same credential (an API key from ``FLYZT_API_KEY`` or the
        config file cannot be replaced). Every other error is raised: a session
        that needs ``compozy login`` must say so.
        """
        try:
            new = get_token(self.profile, scope=self._scope(), audience=self.audience,
                            min_valid=self.min_valid, rejected_token=rejected,
                            timeout=self.timeout, url=url)
        except RefreshFailed:
            return None
        return None if same_token(rejected, new) else new

    async def async_replacement(self, rejected: str, url: str) -> str | None:
        """:meth:`replacement` under asyncio."""
        try:
            new = await async_get_token(self.profile, scope=self._scope(),
                                        audience=self.audience, min_valid=self.min_valid,
                                        rejected_token=rejected, timeout=self.timeout,
                                        url=url)
        except RefreshFailed:
            return None
        return None if same_token(rejected, new) else new

    def _scope(self) -> list[str] | None:
        return None if self.scope is None else list(self.scope)


def token_source(
    profile: str | None,
    scope: str | list[str] | tuple[str, ...] | None,
    audience: str | None,
    min_valid: float,
    timeout: float,
    https_only: bool,
) -> TokenSource:
    """A :class:`TokenSource` from an adapter's arguments; ``scope`` may be one string,
    space-separated as in OAuth (RFC 6749 section 3.3)."""
    scopes = tuple(scope.split()) if isinstance(scope, str) else \
        None if scope is None else tuple(scope)
    return TokenSource(profile=profile, scope=scopes, audience=audience,
                       min_valid=min_valid, timeout=timeout, https_only=https_only)


__all__ = ["TokenSource", "authorization_headers", "check_transport", "same_token",
           "token_source"]
