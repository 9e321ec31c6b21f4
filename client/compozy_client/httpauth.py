"""What the HTTP client adapters share: which token to ask for, and the one retry after a 401.

:mod:`compozy_client.httpx` and :mod:`compozy_client.requests` each plug a
:class:`TokenSource` into their library's auth hook. The rule they both follow
(the same as azure-core's ``BearerTokenCredentialPolicy``):

1. A token goes over https, or plain http to this machine only
   (:func:`check_transport`).
2. Every request asks the agent for a token of the profile given, or else of
   the one the ``rules:`` match for the request's URL (the agent caches it and
   refreshes it ahead of expiry; asking costs one round trip on a Unix
   socket), and carries it in the headers :meth:`TokenSource.present` builds
   (``_presented``): the only place an ``Authorization`` header is made.
3. A 401 answering a request that carried that token is reported to the agent
   as ``rejected_token`` (:meth:`TokenSource.replacement`): the agent drops the
   token and refreshes once however many callers report it at the same time
   (lifecycle rule 7), so 50 concurrent requests that all get a 401 cost one
   refresh at the provider.
4. The request is sent again once, with the new token, if its body can be sent
   again. The second answer is returned as it is, whatever it is: never a loop.

A profile whose tokens are DPoP-bound (``token_binding: dpop``, RFC 9449) is
served the same way, with a proof per request: :meth:`TokenSource.present`
asks the agent for the token and, for a DPoP token, a proof for this method
and URL (``dpop_proof``; the key never leaves the agent), and the headers are
``Authorization: DPoP <token>`` and ``DPoP: <proof>``. One retry more comes
first: a 401 whose ``DPoP`` challenge asks for a nonce (section 9) is sent
again once with a proof carrying it; the newest nonce of each origin is
remembered for the next request. Then a 401 is a rejected token, as above. A
source learns on its first request whether the profile is DPoP-bound, so a
bearer profile costs one round trip to the agent per request, as before, and
a DPoP one one too (the proof comes with its token).

No lock is held anywhere here: the agent is where concurrent callers meet.
This module imports neither httpx nor requests.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from compozy_client.api import (
    async_get_dpop_proof,
    async_get_token_result,
    get_dpop_proof,
    get_token_result,
)
from compozy_client.connection import DEFAULT_TIMEOUT
from compozy_client.dpop import nonce_challenge, valid_nonce
from compozy_client.errors import RefreshFailed, TokenBindingMismatch, UsageError
from compozy_client.protocol import DpopProofResult, TokenResult


@dataclass(frozen=True, repr=False)
class Presented:
    """What an adapter puts on one request: its headers, and the token they present."""

    token: str
    headers: dict[str, str]
    #: A DPoP-bound token (RFC 9449): the headers carry a proof for one request.
    dpop: bool = False

    def __repr__(self) -> str:
        return f"Presented(dpop={self.dpop}, token=<redacted>)"


def _presented(answer: TokenResult | DpopProofResult) -> Presented:
    if isinstance(answer, DpopProofResult):
        return Presented(answer.access_token, {"Authorization": f"DPoP {answer.access_token}",
                                               "DPoP": answer.proof}, dpop=True)
    return Presented(answer.access_token, {"Authorization": f"Bearer {answer.access_token}"})


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


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
    #: What the source has learnt: whether the profile is DPoP-bound ("dpop"), and the
    #: newest DPoP-Nonce of each origin (RFC 9449 section 9). Shared by the requests of
    #: one adapter; a stale value costs one retry, never a wrong answer.
    _learnt: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------ any token type

    def present(self, method: str, url: str, *, rejected: Presented | None = None,
                nonce: str | None = None) -> Presented:
        """The headers for one request: a bearer token, or a DPoP token with its proof.

        ``rejected``: what a server refused with 401 (the agent replaces it);
        ``nonce``: the server's DPoP-Nonce (else the origin's last one).
        """
        rejected_token = rejected.token if rejected is not None else None
        if self._learnt.get("dpop"):
            try:
                return self._proof(get_dpop_proof(
                    method, url, self.profile, nonce=nonce or self._nonce(url),
                    min_valid=self.min_valid, rejected_token=rejected_token,
                    scope=self._scope(), audience=self.audience, timeout=self.timeout))
            except TokenBindingMismatch:  # logged in again with bearer tokens
                self._learnt["dpop"] = False
        answer = get_token_result(self.profile, scope=self._scope(), audience=self.audience,
                                  min_valid=self.min_valid, rejected_token=rejected_token,
                                  timeout=self.timeout, url=url, accept_dpop=True)
        if answer.token_type != "DPoP":
            return _presented(answer)
        self._learnt["dpop"] = True
        return self._proof(get_dpop_proof(
            method, url, self.profile, nonce=nonce or self._nonce(url), min_valid=self.min_valid,
            scope=self._scope(), audience=self.audience, timeout=self.timeout))

    async def async_present(self, method: str, url: str, *, rejected: Presented | None = None,
                            nonce: str | None = None) -> Presented:
        """:meth:`present` under asyncio."""
        rejected_token = rejected.token if rejected is not None else None
        if self._learnt.get("dpop"):
            try:
                return self._proof(await async_get_dpop_proof(
                    method, url, self.profile, nonce=nonce or self._nonce(url),
                    min_valid=self.min_valid, rejected_token=rejected_token,
                    scope=self._scope(), audience=self.audience, timeout=self.timeout))
            except TokenBindingMismatch:
                self._learnt["dpop"] = False
        answer = await async_get_token_result(
            self.profile, scope=self._scope(), audience=self.audience, min_valid=self.min_valid,
            rejected_token=rejected_token, timeout=self.timeout, url=url, accept_dpop=True)
        if answer.token_type != "DPoP":
            return _presented(answer)
        self._learnt["dpop"] = True
        return self._proof(await async_get_dpop_proof(
            method, url, self.profile, nonce=nonce or self._nonce(url), min_valid=self.min_valid,
            scope=self._scope(), audience=self.audience, timeout=self.timeout))

    def nonce_demanded(self, presented: Presented, url: str, status: int,
                       headers: Mapping[str, str]) -> str | None:
        """The nonce to retry with, when a DPoP request's answer demands one (RFC 9449
        section 9); every DPoP-Nonce a server sends is remembered for its origin."""
        if not presented.dpop:
            return None
        lowered = {name.lower(): value for name, value in headers.items()}
        demanded = nonce_challenge(status, lowered)
        fresh = demanded or lowered.get("dpop-nonce")
        if fresh is not None and valid_nonce(fresh):
            nonces = self._learnt.setdefault("nonces", {})
            assert isinstance(nonces, dict)
            nonces[_origin(url)] = fresh
        return demanded

    def replacement(self, rejected: Presented, method: str, url: str) -> Presented | None:
        """Tell the agent a server refused ``rejected`` (401); the headers to retry with.

        None means "do not retry": the agent refused to replace a token it had
        itself made as a replacement less than 5 s ago (a server that refuses
        every token must not make the agent refresh on every request), or the
        answer is the same credential (an API key from ``FLYZT_API_KEY`` or the
        config file cannot be replaced). Every other error is raised: a session
        that needs ``compozy login`` must say so.
        """
        try:
            new = self.present(method, url, rejected=rejected)
        except RefreshFailed:
            return None
        return None if same_token(rejected.token, new.token) else new

    async def async_replacement(self, rejected: Presented, method: str,
                                    url: str) -> Presented | None:
        """:meth:`replacement` under asyncio."""
        try:
            new = await self.async_present(method, url, rejected=rejected)
        except RefreshFailed:
            return None
        return None if same_token(rejected.token, new.token) else new

    def _proof(self, answer: DpopProofResult) -> Presented:
        return _presented(answer)

    def _nonce(self, url: str) -> str | None:
        nonces = self._learnt.get("nonces")
        found = nonces.get(_origin(url)) if isinstance(nonces, dict) else None
        return found if isinstance(found, str) else None

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


__all__ = ["Presented", "TokenSource", "check_transport", "same_token", "token_source"]
