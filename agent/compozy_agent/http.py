"""The httpx edge: sends what ``oidc.py`` builds, and maps httpx's failures.

Nothing above this module sees an httpx exception: every transport failure
becomes :class:`~compozy_agent.oidc.ProviderUnreachable`, named by host only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from compozy_agent import oidc
from compozy_client import __version__

#: How long discovered metadata is reused.
DISCOVERY_TTL = 3600.0

# httpx's exception classes, and what each means to a person.
_TRANSPORT_FAILURES: tuple[tuple[type[Exception], str], ...] = (
    (httpx.TimeoutException, "timed out"),
    (httpx.ConnectError, "cannot connect"),
    (httpx.RemoteProtocolError, "the connection broke"),
    (httpx.NetworkError, "network error"),
    (httpx.TransportError, "transport error"),
)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    received_at: float

    def __repr__(self) -> str:
        return f"HttpResponse(status={self.status})"


class ProviderClient:
    """One HTTP client for every provider the agent talks to."""

    def __init__(
        self,
        now: Callable[[], float],
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 15.0,
    ) -> None:
        self._now = now
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=False,
            headers={"User-Agent": f"compozy-agent/{__version__}", "Accept": "application/json"},
        )
        self._metadata: dict[str, tuple[float, oidc.ProviderMetadata]] = {}
        #: Provider clock minus ours, from the latest response's Date header.
        self.last_clock_skew: float | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, request: oidc.HttpRequest) -> HttpResponse:
        headers = {"Authorization": f"Bearer {request.bearer}"} if request.bearer else {}
        try:
            response = await self._client.request(
                request.method, request.url, data=dict(_merge(request.form)) or None,
                headers=headers,
            )
        except httpx.HTTPError as exc:
            host = urlsplit(request.url).netloc
            reason = next((text for kind, text in _TRANSPORT_FAILURES if isinstance(exc, kind)),
                          "HTTP error")
            raise oidc.ProviderUnreachable(f"{host}: {reason}") from None
        received_at = self._now()
        skew = oidc.clock_skew(response.headers.get("date"), received_at)
        if skew is not None:
            self.last_clock_skew = skew
        return HttpResponse(
            status=response.status_code,
            headers={k.lower(): v for k, v in response.headers.items()},
            body=response.content,
            received_at=received_at,
        )

    async def discover(self, issuer: str) -> oidc.ProviderMetadata:
        """Metadata for ``issuer`` (OIDC Discovery, then RFC 8414), cached for an hour."""
        cached = self._metadata.get(issuer)
        if cached is not None and cached[0] > self._now():
            return cached[1]
        oidc.check_endpoint_url(issuer)
        last_status = 0
        for url in oidc.discovery_urls(issuer):
            response = await self.send(oidc.HttpRequest(method="GET", url=url))
            if response.status == 200:
                metadata = oidc.parse_discovery(issuer, response.body)
                self._metadata[issuer] = (response.received_at + DISCOVERY_TTL, metadata)
                return metadata
            if response.status >= 500 or response.status == 429:
                raise oidc.TransientProviderError(response.status)
            last_status = response.status
        raise oidc.MalformedResponse(
            f"{urlsplit(issuer).netloc} publishes no OpenID/OAuth metadata "
            f"(HTTP {last_status}); is {issuer} the right issuer?"
        )

    async def token(self, request: oidc.HttpRequest) -> tuple[oidc.TokenResponse, float]:
        """Send a token request; the parsed response and when it arrived."""
        response = await self.send(request)
        parsed = oidc.parse_token_response(
            response.status, response.headers, response.body, response.received_at
        )
        return parsed, response.received_at

    async def device_authorize(self, request: oidc.HttpRequest) -> oidc.DeviceAuthorization:
        response = await self.send(request)
        return oidc.parse_device_authorization(
            response.status, response.headers, response.body, response.received_at
        )

    async def revoke(self, request: oidc.HttpRequest) -> None:
        """RFC 7009 section 2.2: 200 means revoked (or already invalid)."""
        response = await self.send(request)
        oidc.check_status(response.status, response.headers, response.body, response.received_at)

    async def userinfo(self, request: oidc.HttpRequest) -> dict[str, object]:
        response = await self.send(request)
        if response.status != 200:
            return {}
        try:
            document = json.loads(response.body)
        except ValueError:
            return {}
        return document if isinstance(document, dict) else {}


def _merge(pairs: list[tuple[str, str]]) -> list[tuple[str, str | list[str]]]:
    """httpx takes repeated form names as a list value."""
    merged: dict[str, str | list[str]] = {}
    for name, value in pairs:
        if name in merged:
            existing = merged[name]
            merged[name] = [*existing, value] if isinstance(existing, list) else [existing, value]
        else:
            merged[name] = value
    return list(merged.items())
