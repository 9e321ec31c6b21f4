"""The httpx edge: sends what ``oidc.py`` builds, hands the answers back to its parsers.

This module owns the agent's one HTTP client for identity providers: its
deadlines (each exchange, from connecting to the last byte of the body, ends
within CALL_DEADLINE = 10 s; connecting alone gets 5 s), no redirects, a
User-Agent, a cap on body size, the discovery cache, the time each request was
sent (a token's life counts from then), and the clock skew seen in ``Date``
headers.

httpx's own timeouts apply to each read: a provider that answers one byte a
second would keep an exchange going for as long as its answer lasts. The
deadline around the whole exchange is what bounds it; running out counts as
:class:`~compozy_agent.oidc.ProviderUnreachable`, a transient failure.

Nothing above this module sees an httpx exception: :data:`_HTTPX_FAILURES`
maps each to a failure of the tree drawn in ``oidc.py`` (mostly
:class:`~compozy_agent.oidc.ProviderUnreachable`, named by host only, never
by a URL's query or a body). It classifies and never retries: retry and
backoff are the lifecycle's decision. The one exception is part of a
protocol, not a failure: a token request with a DPoP proof (RFC 9449) that the
provider answers ``use_dpop_nonce`` is signed again with the nonce it sent and
sent once more (section 8); the newest nonce of each token endpoint is kept
for the next request.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, overload
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from compozy_agent import oidc
from compozy_agent.oidc import ProviderUnreachable
from compozy_client import __version__
from compozy_client.safetext import one_line

if TYPE_CHECKING:
    import ssl

__all__ = [
    "CALL_DEADLINE",
    "CONNECT_TIMEOUT",
    "DISCOVERY_TTL",
    "MAX_BODY_BYTES",
    "READ_TIMEOUT",
    "USER_AGENT",
    "DpopSigner",
    "HttpResponse",
    "ProviderClient",
    "ProviderUnreachable",
]

log = logging.getLogger("compozy_agent.http")

#: How long discovered metadata is reused, in seconds.
DISCOVERY_TTL: Final = 3600.0
#: The whole of one exchange with a provider: connecting, sending, and reading the
#: answer to its last byte (docs/architecture.md, "Deadlines").
CALL_DEADLINE: Final = 10.0
CONNECT_TIMEOUT: Final = 5.0
#: httpx's per-operation timeout (each read, each write); CALL_DEADLINE bounds the sum.
READ_TIMEOUT: Final = 10.0
#: Token, discovery and userinfo answers are small; anything bigger is refused.
MAX_BODY_BYTES: Final = 1024 * 1024
USER_AGENT: Final = f"compozy-agent/{__version__}"

#: Signs a DPoP proof (RFC 9449 section 4.2) for (method, url, nonce): the session's key
#: stays with its owner (``dpop.py``), this edge only asks for proofs.
DpopSigner = Callable[[str, str, "str | None"], str]

# httpx's exceptions and what each means, most specific first (the first isinstance
# match wins; compare httpcore/_exceptions.py). Each becomes the failure class with
# the reason; the host is added from the request URL.
_HTTPX_FAILURES: Final[tuple[tuple[type[Exception], type[oidc.OAuthFailure], str], ...]] = (
    (httpx.ConnectTimeout, ProviderUnreachable, "connecting timed out"),
    (httpx.ReadTimeout, ProviderUnreachable, "no answer in time (read timeout)"),
    (httpx.WriteTimeout, ProviderUnreachable, "sending timed out"),
    (httpx.PoolTimeout, ProviderUnreachable, "too many requests in flight (pool timeout)"),
    (httpx.TimeoutException, ProviderUnreachable, "timed out"),
    (httpx.ConnectError, ProviderUnreachable, "cannot connect"),
    (httpx.ReadError, ProviderUnreachable, "the connection was reset"),
    (httpx.WriteError, ProviderUnreachable, "the connection was reset while sending"),
    (httpx.CloseError, ProviderUnreachable, "the connection broke while closing"),
    (httpx.NetworkError, ProviderUnreachable, "network error"),
    (httpx.RemoteProtocolError, ProviderUnreachable, "the server broke the HTTP protocol"),
    (httpx.LocalProtocolError, ProviderUnreachable, "the request could not be sent"),
    (httpx.ProxyError, ProviderUnreachable, "the proxy refused the connection"),
    (httpx.UnsupportedProtocol, ProviderUnreachable, "unsupported URL scheme"),
    (httpx.TransportError, ProviderUnreachable, "transport error"),
    (httpx.DecodingError, oidc.MalformedResponse, "the answer's content encoding is broken"),
    (httpx.InvalidURL, oidc.MalformedResponse, "invalid endpoint URL"),
    (httpx.HTTPError, ProviderUnreachable, "HTTP error"),
)

# Common causes inside a ConnectError's text (OS and OpenSSL wording), told plainly.
# Only these fixed phrases are used: the exception's own text is never copied.
_CONNECT_CAUSES: Final = (
    ("CERTIFICATE_VERIFY_FAILED", "the TLS certificate is not trusted"),
    ("Name or service not known", "the host name does not resolve"),
    ("nodename nor servname", "the host name does not resolve"),
    ("Temporary failure in name resolution", "the host name does not resolve"),
    ("Network is unreachable", "the network is unreachable"),
    ("No route to host", "no route to host"),
)


def _is_metadata(body: bytes) -> bool:
    """Whether ``body`` is a JSON object with an ``issuer``: a metadata document, as
    opposed to the page a single-page app serves on every path."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return False
    return isinstance(decoded, dict) and "issuer" in decoded


def host_of(url: str) -> str:
    """Host and port of a URL: never its user info, path or query."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "the provider"
    if not host:
        return "the provider"
    host = f"[{host}]" if ":" in host else host
    # A provider's metadata names the host: it goes into logs and messages as one line.
    return one_line(f"{host}:{port}" if port else host, 300)


def _host_and_port(url: str) -> str:
    """``host:port`` of a URL, with the scheme's default port when none is written."""
    host = host_of(url)
    try:
        parts = urlsplit(url)
        explicit = parts.port
    except ValueError:
        return host
    if explicit is not None or host == "the provider":
        return host
    return f"{host}:{443 if parts.scheme == 'https' else 80}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during, most recent first (bounded)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _refused(exc: BaseException) -> bool:
    """Whether the connection was refused (anyio hides it under "All connection attempts
    failed", so the cause chain is searched, not the text)."""
    return any(isinstance(cause, ConnectionRefusedError)
               or (isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED)
               for cause in _causes(exc))


def _map_httpx_error(exc: Exception, url: str) -> oidc.OAuthFailure:
    """The failure of our tree for an httpx exception (STYLE idea 4)."""
    host = host_of(url)
    for kind, failure, reason in _HTTPX_FAILURES:
        if isinstance(exc, kind):
            if kind is httpx.ConnectError:
                if _refused(exc) or "Connection refused" in str(exc):
                    where = _host_and_port(url)
                    return ProviderUnreachable("connection refused", host,
                                               message=f"connection refused by {where}")
                reason = next((plain for phrase, plain in _CONNECT_CAUSES
                               if phrase in str(exc)), reason)
            if failure is ProviderUnreachable:
                return ProviderUnreachable(reason, host)
            return failure(f"{host}: {reason}")
    return ProviderUnreachable("HTTP error", host)  # pragma: no cover - HTTPError is last


class HttpResponse(msgspec.Struct, frozen=True):
    """What came back: status, headers with lowercase names, body, when it arrived, and
    when its request was sent (on the agent's clock; a token's life counts from then)."""

    status: int
    headers: dict[str, str]
    body: bytes
    received_at: float
    sent_at: float | None = None

    def __repr__(self) -> str:  # bodies carry tokens
        return (f"HttpResponse(status={self.status}, sent_at={self.sent_at!r}, "
                f"received_at={self.received_at!r})")

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # a Struct's own would show the body
        return [("status", self.status), ("sent_at", self.sent_at),
                ("received_at", self.received_at)]


class ProviderClient:
    """One HTTP client for every provider the agent talks to.

    ``now`` is the agent's clock (wall-clock seconds); ``transport`` replaces
    the network in tests (``httpx.MockTransport``). ``timeout`` bounds each
    read, write and wait for a connection; connecting gets at most 5 seconds;
    ``call_deadline`` bounds each exchange as a whole (on the event loop's
    clock: it measures I/O, not the wall clock). ``ssl_context`` is the TLS
    context to verify providers with (:mod:`compozy_agent.tls`), else httpx's.
    """

    def __init__(
        self,
        now: Callable[[], float],
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = READ_TIMEOUT,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        discovery_ttl: float = DISCOVERY_TTL,
        call_deadline: float = CALL_DEADLINE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._now = now
        self._discovery_ttl = discovery_ttl
        self.call_deadline = call_deadline
        self._client = httpx.AsyncClient(
            transport=transport,
            # A context built ahead (compozy_agent.tls), else httpx's own default.
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, connect_timeout)),
            follow_redirects=False,
            # Accept: GitHub answers form-encoded bodies unless asked for JSON.
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        self._metadata: dict[str, tuple[float, oidc.ProviderMetadata]] = {}
        #: The newest DPoP-Nonce (RFC 9449 section 8) each token endpoint sent, by URL.
        self._dpop_nonces: dict[str, str] = {}
        #: Provider clock minus ours (seconds), from the latest response's Date header.
        self.last_clock_skew: float | None = None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ sending

    async def send(self, request: oidc.HttpRequest) -> HttpResponse:
        """Send one request; any HTTP status is an answer, no answer raises.

        The whole exchange, from connecting to the body's last byte, ends within
        ``call_deadline`` seconds or raises ProviderUnreachable. Raises
        ProviderUnreachable (or MalformedResponse for an undecodable or
        oversized body, or an invalid URL). Records when the request was sent
        and the clock skew of the answer.
        """
        headers = dict(request.headers)
        content: bytes | None = None
        if request.form:
            content = request.encoded_form()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        # Taken before connecting: the provider may issue the token as soon as the
        # request reaches it, so its lifetime can only start after this instant.
        sent_at = self._now()
        try:
            with anyio.fail_after(self.call_deadline):
                async with self._client.stream(
                    request.method, request.url, content=content, headers=headers
                ) as response:
                    body = await _read_capped(response, request.url)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # "from None": the httpx exception holds the request, form and all.
            raise _map_httpx_error(exc, request.url) from None
        except TimeoutError:
            raise ProviderUnreachable(
                f"no complete answer within {self.call_deadline:.0f} s",
                host_of(request.url)) from None
        received_at = self._now()
        skew = oidc.clock_skew(response.headers.get("date"), received_at)
        if skew is not None:
            self.last_clock_skew = skew
        # The path comes from the provider's metadata: one printable line in the log.
        log.debug("%s %s%s -> %d", request.method, host_of(request.url),
                  one_line(urlsplit(request.url).path, 200), response.status_code)
        return HttpResponse(
            status=response.status_code,
            headers={k.lower(): v for k, v in response.headers.items()},
            body=body,
            received_at=received_at,
            sent_at=sent_at,
        )

    async def send_with_dpop(self, request: oidc.HttpRequest,
                             dpop: DpopSigner | None) -> HttpResponse:
        """:meth:`send`, with a DPoP proof when ``dpop`` is given (RFC 9449 section 5).

        The proof carries the endpoint's last nonce, if any. An answer demanding a
        nonce (``use_dpop_nonce`` with a ``DPoP-Nonce`` header, section 8) is
        answered once with a new proof carrying it; a second demand is the answer.
        """
        if dpop is None:
            return await self.send(request)
        url = request.url
        for attempt in range(2):
            signed = msgspec.structs.replace(
                request, headers={**request.headers,
                                  "DPoP": dpop(request.method, url, self._dpop_nonces.get(url))})
            response = await self.send(signed)
            demanded = oidc.dpop_nonce_demanded(response.status, response.headers,
                                                response.body)
            fresh = demanded or oidc.dpop_nonce_of(response.headers)
            if fresh is not None:
                self._dpop_nonces[url] = fresh
            if demanded is None or attempt == 1:
                return response
            log.debug("%s demands a DPoP nonce; signing again with it", host_of(url))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---------------------------------------------------------------- discovery

    async def discover(
        self, issuer: str, endpoints: Mapping[str, str] | None = None
    ) -> oidc.ProviderMetadata:
        """Metadata for ``issuer``: OIDC Discovery's document, with the gaps filled from
        RFC 8414's; cached for an hour. ``endpoints`` (a profile's
        ``device_authorization_endpoint`` and the like) win over both.

        RFC 8414's document is fetched only when OIDC's lacks an endpoint the agent
        uses (``oidc.ENDPOINT_FIELDS``). A URL that answers 4xx is not there; a
        document that names another issuer or a plain-http endpoint is refused
        whichever it is (``oidc.parse_metadata_document``), and so is an answer that
        is not metadata when no document is usable. When the second document cannot
        be had for now (5xx, no answer), the first is used, uncached. Raises
        TransientProviderError (5xx/429), ProviderUnreachable, or MalformedResponse.
        """
        cached = self._metadata.get(issuer)
        if cached is not None and cached[0] > self._now():
            metadata = cached[1]
        else:
            metadata = await self._discover(issuer)
        return oidc.with_endpoints(metadata, endpoints) if endpoints else metadata

    async def _discover(self, issuer: str) -> oidc.ProviderMetadata:
        oidc.check_issuer(issuer)
        statuses: list[int] = []
        unreadable: oidc.MalformedResponse | None = None
        documents: list[oidc.MetadataDocument] = []
        received_at = self._now()
        complete = True
        for url in oidc.discovery_urls(issuer):
            if documents and not oidc.metadata_gaps(documents[0]):
                break  # OIDC's document names every endpoint the agent uses
            try:
                response = await self.send(oidc.HttpRequest(method="GET", url=url))
                if response.status == 429 or response.status >= 500:
                    oidc.check_status(response.status, response.headers, response.body,
                                      response.received_at)
            except (oidc.TransientProviderError, oidc.ProviderUnreachable) as exc:
                if not documents:
                    raise
                log.warning("discovery for %s: %s not read (%s); using the OpenID "
                            "metadata alone for now", issuer, url, exc)
                complete = False
                break
            if response.status != 200:
                statuses.append(response.status)
                continue
            received_at = response.received_at
            try:
                documents.append(oidc.parse_metadata_document(issuer, response.body))
            except oidc.MalformedResponse as exc:
                if _is_metadata(response.body):
                    raise  # metadata, but not for this issuer or not safe to use
                unreadable = unreadable or exc  # an HTML page on a catch-all route
        if not documents:
            if unreadable is not None:
                raise unreadable
            raise oidc.MalformedResponse(
                f"{host_of(issuer)} publishes no OpenID or OAuth metadata "
                f"(HTTP {', '.join(map(str, statuses))}); is {issuer} the right issuer?",
                statuses[-1] if statuses else None,
            )
        metadata = oidc.merge_metadata(documents)
        if complete:
            self._metadata[issuer] = (received_at + self._discovery_ttl, metadata)
        return metadata

    def forget_metadata(self, issuer: str | None = None) -> None:
        """Drop cached metadata for ``issuer``, or for every issuer."""
        if issuer is None:
            self._metadata.clear()
        else:
            self._metadata.pop(issuer, None)

    # ------------------------------------------------------------------- tokens

    async def token(self, request: oidc.HttpRequest, *,
                    dpop: DpopSigner | None = None) -> tuple[oidc.TokenResponse, float]:
        """Send a prebuilt token request (with a DPoP proof when ``dpop`` is given);
        the parsed answer and when it arrived.

        Device-flow ``authorization_pending`` and ``slow_down`` raise OAuthError
        here; :meth:`poll_device` returns them as values instead.
        """
        response = await self.send_with_dpop(request, dpop)
        parsed = oidc.parse_token_response(
            response.status, response.headers, response.body, response.received_at
        )
        return _stamped(parsed, response), response.received_at

    async def exchange(
        self,
        metadata: oidc.ProviderMetadata,
        *,
        client_id: str,
        code: str,
        redirect_uri: str,
        pkce: oidc.Pkce,
        resources: Sequence[str] = (),
    ) -> oidc.TokenResponse:
        """Exchange an authorization code (RFC 6749 4.1.3 with the PKCE verifier)."""
        response = await self.send(oidc.code_exchange_request(
            metadata, client_id=client_id, code=code, redirect_uri=redirect_uri, pkce=pkce,
            resources=resources))
        return _stamped(oidc.parse_token_response(response.status, response.headers,
                                                  response.body, response.received_at), response)

    async def refresh(
        self,
        metadata: oidc.ProviderMetadata,
        *,
        client_id: str,
        refresh_token: str,
        scopes: Sequence[str] | None = None,
        resources: Sequence[str] = (),
        audience: str | None = None,
        dpop: DpopSigner | None = None,
    ) -> oidc.TokenResponse:
        """Refresh (RFC 6749 section 6); the answer's refresh_token is the sent one
        when the provider did not rotate it. ``dpop`` signs the proof a DPoP-bound
        refresh token needs (RFC 9449 section 5)."""
        response = await self.send_with_dpop(oidc.refresh_request(
            metadata, client_id=client_id, refresh_token=refresh_token, scopes=scopes,
            resources=resources, audience=audience), dpop)
        return _stamped(oidc.parse_refresh_response(
            response.status, response.headers, response.body, response.received_at,
            refresh_token=refresh_token), response)

    @overload
    async def device_authorize(
        self, metadata: oidc.ProviderMetadata, /, *, client_id: str, scopes: Sequence[str],
        resources: Sequence[str] = (),
    ) -> oidc.DeviceAuthorization: ...

    @overload
    async def device_authorize(self, request: oidc.HttpRequest, /) -> oidc.DeviceAuthorization:
        ...

    async def device_authorize(
        self,
        target: oidc.ProviderMetadata | oidc.HttpRequest,
        /,
        *,
        client_id: str | None = None,
        scopes: Sequence[str] = (),
        resources: Sequence[str] = (),
    ) -> oidc.DeviceAuthorization:
        """Start a device flow (RFC 8628 section 3.1-3.2).

        Pass the metadata and parameters; a prebuilt request is still accepted.
        """
        request = target if isinstance(target, oidc.HttpRequest) else \
            oidc.device_authorization_request(target, client_id=_required(client_id),
                                              scopes=scopes, resources=resources)
        response = await self.send(request)
        return oidc.parse_device_authorization(
            response.status, response.headers, response.body, response.received_at
        )

    async def poll_device(
        self, metadata: oidc.ProviderMetadata, *, client_id: str, device_code: str,
        dpop: DpopSigner | None = None,
    ) -> oidc.TokenResponse | oidc.DevicePending | oidc.DeviceSlowDown:
        """One poll of the device flow (RFC 8628 sections 3.4-3.5), with a DPoP proof
        when ``dpop`` is given.

        ``expired_token``, ``access_denied`` and other codes raise OAuthError.
        """
        response = await self.send_with_dpop(oidc.device_token_request(
            metadata, client_id=client_id, device_code=device_code), dpop)
        answer = oidc.parse_device_poll(response.status, response.headers, response.body,
                                        response.received_at)
        return _stamped(answer, response) if isinstance(answer, oidc.TokenResponse) else answer

    # ------------------------------------------------------ revocation, userinfo

    @overload
    async def revoke(
        self, metadata: oidc.ProviderMetadata, /, *, client_id: str, token: str,
        hint: str | None = None,
    ) -> None: ...

    @overload
    async def revoke(self, request: oidc.HttpRequest, /) -> None: ...

    async def revoke(
        self,
        target: oidc.ProviderMetadata | oidc.HttpRequest,
        /,
        *,
        client_id: str | None = None,
        token: str | None = None,
        hint: str | None = None,
    ) -> None:
        """Revoke a token (RFC 7009); returning means revoked or already invalid.

        Pass the metadata and parameters; a prebuilt request is still accepted.
        """
        request = target if isinstance(target, oidc.HttpRequest) else \
            oidc.revocation_request(target, client_id=_required(client_id),
                                    token=_required(token), hint=hint)
        response = await self.send(request)
        oidc.parse_revocation_response(response.status, response.headers, response.body,
                                       response.received_at)

    @overload
    async def userinfo(
        self, metadata: oidc.ProviderMetadata, /, access_token: str, *,
        subject: str | None = None,
    ) -> dict[str, object]: ...

    @overload
    async def userinfo(
        self, request: oidc.HttpRequest, /, *, subject: str | None = None
    ) -> dict[str, object]: ...

    async def userinfo(
        self,
        target: oidc.ProviderMetadata | oidc.HttpRequest,
        /,
        access_token: str | None = None,
        *,
        subject: str | None = None,
    ) -> dict[str, object]:
        """The userinfo claims (OIDC Core 5.3); ``subject``, when given, must match ``sub``.

        Pass the metadata and the access token; a prebuilt request is still accepted.
        """
        request = target if isinstance(target, oidc.HttpRequest) else \
            oidc.userinfo_request(target, _required(access_token))
        response = await self.send(request)
        return oidc.parse_userinfo(response.status, response.headers, response.body,
                                   response.received_at, subject=subject)


def _stamped(parsed: oidc.TokenResponse, response: HttpResponse) -> oidc.TokenResponse:
    """The token answer with the time its request was sent: its life counts from then."""
    return msgspec.structs.replace(parsed, sent_at=response.sent_at)


def _required(value: str | None) -> str:
    if value is None:
        raise TypeError("a required keyword argument is missing")
    return value


async def _read_capped(response: httpx.Response, url: str) -> bytes:
    """The body, refusing more than MAX_BODY_BYTES (a hostile or broken provider)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise oidc.MalformedResponse(f"{host_of(url)}: the answer is larger than "
                                     f"{MAX_BODY_BYTES} bytes", response.status_code)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise oidc.MalformedResponse(f"{host_of(url)}: the answer is larger than "
                                         f"{MAX_BODY_BYTES} bytes", response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)
