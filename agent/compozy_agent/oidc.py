"""OAuth 2.0 / OpenID Connect messages, without I/O: build requests, parse responses.

This module owns what the agent says to an identity provider and how it reads
the answers: discovery (OIDC Discovery 1.0, RFC 8414), PKCE (RFC 7636), the
authorization code flow on a loopback redirect (RFC 6749 section 4.1, RFC 8252),
the device flow (RFC 8628), refresh (RFC 6749 section 6, RFC 8707), revocation
(RFC 7009), userinfo, and the ID token claims the agent relies on.

Nothing here opens a socket or reads a clock: times come in as ``now``
arguments, and ``http.py`` sends the :class:`HttpRequest` values built here
and hands the status, headers and body back to the parsers here.

The exception tree (every failure of a provider exchange)::

    OAuthFailure                 anything a provider exchange can end in
    ├── OAuthError               the provider said no: RFC 6749 section 5.2 ``error`` code
    │                            (.error, .description, .status); also an ``error=`` callback
    ├── TransientProviderError   HTTP 5xx or 429: ask again later (.status, .retry_after)
    ├── MalformedResponse        an answer that breaks the standard: not JSON, no access_token,
    │                            another issuer, a plain-http endpoint, a bad ID token (.status)
    ├── CallbackError            a loopback redirect that does not belong to this login
    │                            (state mismatch, no code, another issuer)
    └── ProviderUnreachable      no answer at all: DNS, connect, TLS, timeout, reset
                                 (raised by http.py; .host, .reason)

Secrets: messages and reprs name hosts, statuses and error codes, never a
token, a code or a body. Provider-supplied text (``error_description``) is
cut short and anything in it that looks like a credential is replaced. Every
struct that holds a secret has a redacting ``__repr__``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import msgspec

from compozy_client.safetext import one_line

__all__ = [
    "DEFAULT_LIFETIME",
    "DEVICE_GRANT",
    "ENDPOINT_FIELDS",
    "LOOPBACK_HOSTS",
    "CallbackError",
    "DeviceAuthorization",
    "DevicePending",
    "DeviceSlowDown",
    "HttpRequest",
    "MalformedResponse",
    "MetadataDocument",
    "OAuthError",
    "OAuthFailure",
    "Pkce",
    "ProviderMetadata",
    "ProviderUnreachable",
    "TokenResponse",
    "TransientProviderError",
    "access_token_expiry",
    "account_from_claims",
    "authorization_url",
    "check_endpoint_url",
    "check_issuer",
    "check_status",
    "clock_skew",
    "code_exchange_request",
    "decode_jwt_claims",
    "device_authorization_request",
    "device_token_request",
    "discovery_urls",
    "dpop_nonce_demanded",
    "dpop_nonce_of",
    "loopback_redirect_uri",
    "merge_metadata",
    "metadata_gaps",
    "new_nonce",
    "new_pkce",
    "new_state",
    "parse_callback",
    "parse_device_authorization",
    "parse_device_poll",
    "parse_discovery",
    "parse_metadata_document",
    "parse_refresh_response",
    "parse_revocation_response",
    "parse_token_response",
    "parse_userinfo",
    "pkce_challenge",
    "refresh_request",
    "retry_after_seconds",
    "revocation_request",
    "userinfo_request",
    "valid_dpop_nonce",
    "validate_id_token_claims",
    "validate_refresh_id_token",
    "with_endpoints",
]

#: RFC 8628 section 3.4.
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
#: Used when neither expires_in nor a JWT ``exp`` says how long an access token lives.
DEFAULT_LIFETIME: Final = 300.0
#: Hosts where plain http is allowed (RFC 8252 section 8.3, RFC 9700 section 2.6).
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})
#: RFC 8628 section 3.5: on slow_down "the interval MUST be increased by 5 seconds".
SLOW_DOWN_STEP: Final = 5.0
#: RFC 8628 section 3.2: the polling interval when the provider names none.
DEFAULT_DEVICE_INTERVAL: Final = 5.0
#: When a device authorization response omits expires_in (it is REQUIRED; be lenient).
DEFAULT_DEVICE_LIFETIME: Final = 600.0
REDACTED: Final = "<redacted>"


# --------------------------------------------------------------------------
# Exceptions. Messages are built from codes and hosts only; see _safe_text.


class OAuthFailure(Exception):
    """Base of every failure of a provider exchange (the tree is in the module docstring)."""


class OAuthError(OAuthFailure):
    """The provider refused: an RFC 6749 section 5.2 error response.

    ``error`` is the code (``invalid_grant``, ``access_denied``, ...), matched by
    callers; ``description`` is the provider's human text, shortened and scrubbed
    of anything token-like; ``status`` is the HTTP status, or None for an error
    delivered on the browser redirect (RFC 6749 section 4.1.2.1).
    """

    def __init__(self, error: str, description: str | None = None,
                 status: int | None = 400) -> None:
        self.error = _safe_text(error, 64)
        self.description = _safe_text(description, 300) if description else None
        self.status = status
        super().__init__(f"{self.error}: {self.description}" if self.description else self.error)


class TransientProviderError(OAuthFailure):
    """HTTP 5xx or 429: the provider may answer later; ``retry_after`` seconds if it said."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        hint = f" (retry after {retry_after:.0f} s)" if retry_after is not None else ""
        super().__init__(f"the provider answered HTTP {status}; try again later{hint}")


class MalformedResponse(OAuthFailure):
    """The provider's answer is not what the standard says it should be."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class CallbackError(OAuthFailure):
    """A loopback redirect that does not complete this login (RFC 6749 10.12, RFC 9207)."""


class ProviderUnreachable(OAuthFailure):
    """No answer from the provider (raised by the I/O edge); the message names the host only."""

    def __init__(self, reason: str, host: str | None = None, *,
                 message: str | None = None) -> None:
        self.reason = reason
        self.host = host
        super().__init__(message or (f"{host}: {reason}" if host else reason))


# Runs of token alphabet (base64url, JWT dots, standard base64) long enough to be a
# credential. A run is replaced if it is long, or shorter but holds a digit:
# error codes such as invalid_authorization_details stay readable.
_TOKEN_LIKE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")


def _safe_text(value: str, limit: int) -> str:
    """Provider text fit for a message: no token-like runs, one line with every control
    character escaped (``safetext.one_line``), at most ``limit``."""
    text = _TOKEN_LIKE.sub(
        lambda m: REDACTED if len(m[0]) >= 32 or any(c.isdigit() for c in m[0]) else m[0], value
    )
    return one_line(text, limit)


def _redacted(value: str | None) -> str | None:
    return REDACTED if value else None


# --------------------------------------------------------------------------
# Discovery: OIDC Discovery 1.0 section 4, RFC 8414 section 3.


class ProviderMetadata(msgspec.Struct, kw_only=True):
    """Authorization server metadata, the fields this agent uses (others are ignored)."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    introspection_endpoint: str | None = None
    code_challenge_methods_supported: list[str] | None = None
    scopes_supported: list[str] | None = None
    grant_types_supported: list[str] | None = None
    #: RFC 9207: the provider puts ``iss`` on the authorization response.
    authorization_response_iss_parameter_supported: bool = False
    #: RFC 9449 section 5.1: the provider takes DPoP proofs signed with these.
    dpop_signing_alg_values_supported: list[str] | None = None


def discovery_urls(issuer: str) -> list[str]:
    """Where to look for metadata, in order.

    First OIDC Discovery 4.1 (the well-known path appended to the issuer, after
    removing a trailing ``/``), then RFC 8414 section 3.1 (the well-known segment
    inserted between the host and the issuer's path).
    """
    trimmed = issuer.rstrip("/")
    parts = urlsplit(trimmed)
    return [
        f"{trimmed}/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}",
    ]


def check_endpoint_url(url: str) -> None:
    """Refuse an endpoint that is not https, unless on loopback (RFC 9700 section 2.6).

    Also refuses a fragment (RFC 6749 section 3.1 and 3.2). Raises MalformedResponse.
    """
    parts = urlsplit(url)
    if not parts.hostname:
        raise MalformedResponse("refusing a provider endpoint without a host")
    if parts.fragment:
        raise MalformedResponse(f"refusing a provider endpoint on {parts.hostname} "
                                "with a fragment (RFC 6749 3.1)")
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        return
    raise MalformedResponse(f"refusing a non-HTTPS provider endpoint on {parts.hostname}")


def check_issuer(issuer: str) -> None:
    """An issuer is an https URL without query or fragment (RFC 8414 section 2)."""
    check_endpoint_url(issuer)
    if urlsplit(issuer).query:
        raise MalformedResponse("an issuer identifier has no query part (RFC 8414 2)")


def _same_issuer(stated: str, expected: str) -> bool:
    # RFC 8414 3.3 / OIDC Discovery 4.3 want identical strings. The one allowance is a
    # trailing "/": OIDC Discovery 4.1 strips it to build the URL, so both spellings
    # fetch the same document, and providers differ (Auth0 issuers end in "/").
    return stated == expected or stated.rstrip("/") == expected.rstrip("/")


#: The endpoints the agent calls, by their RFC 8414 section 2 names: what a profile may
#: name when no metadata document does (``device_authorization_endpoint`` is RFC 8628
#: section 4, ``userinfo_endpoint`` OIDC Discovery section 3).
ENDPOINT_FIELDS: Final = (
    "authorization_endpoint",
    "token_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
    "userinfo_endpoint",
)


class MetadataDocument(msgspec.Struct, kw_only=True):
    """One metadata document as published: every field but ``issuer`` may be missing
    (RFC 8414 documents often lack ``userinfo_endpoint``, OIDC ones
    ``revocation_endpoint``); :func:`merge_metadata` combines documents."""

    issuer: str
    token_endpoint: str | None = None
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    introspection_endpoint: str | None = None
    code_challenge_methods_supported: list[str] | None = None
    scopes_supported: list[str] | None = None
    grant_types_supported: list[str] | None = None
    authorization_response_iss_parameter_supported: bool | None = None
    #: RFC 9449 section 5.1.
    dpop_signing_alg_values_supported: list[str] | None = None


def parse_metadata_document(issuer: str, body: bytes) -> MetadataDocument:
    """Parse one metadata document for ``issuer`` and check it.

    The document must name ``issuer`` itself (RFC 8414 section 3.3, OIDC
    Discovery 4.3: defends against mix-up), and every endpoint must be https
    except on loopback. Raises MalformedResponse.
    """
    try:
        document = msgspec.json.decode(body, type=MetadataDocument)
    except msgspec.ValidationError as exc:
        # msgspec names the field ("$.token_endpoint"), never its value.
        raise MalformedResponse(f"the discovery document is not valid metadata: {exc}") \
            from None
    except msgspec.DecodeError:
        raise MalformedResponse("the discovery document is not JSON") from None
    if not _same_issuer(document.issuer, issuer):
        raise MalformedResponse(
            f"the discovery document names issuer {_safe_text(document.issuer, 200)!r}, "
            f"not {issuer!r}; refusing it (RFC 8414 3.3)"
        )
    for url in (document.token_endpoint, document.authorization_endpoint,
                document.device_authorization_endpoint, document.revocation_endpoint,
                document.userinfo_endpoint, document.introspection_endpoint):
        if url is not None:
            check_endpoint_url(url)
    return document


def metadata_gaps(document: MetadataDocument | ProviderMetadata) -> list[str]:
    """The endpoints the agent uses that ``document`` does not name."""
    return [name for name in ENDPOINT_FIELDS if getattr(document, name) is None]


def merge_metadata(documents: Sequence[MetadataDocument]) -> ProviderMetadata:
    """One view of the provider from its documents, in order of precedence.

    OIDC Discovery's document comes first and RFC 8414's fills its gaps: each field
    is taken from the first document that has it. Every document was checked by
    :func:`parse_metadata_document` (same issuer, https endpoints). Raises
    MalformedResponse when none names a token endpoint (RFC 8414 section 2).
    """
    if not documents:
        raise MalformedResponse("no metadata document to read")
    merged: dict[str, Any] = {}
    for document in documents:
        for name in MetadataDocument.__struct_fields__:
            value = getattr(document, name)
            if value is not None and name not in merged:
                merged[name] = value
    if merged.get("token_endpoint") is None:
        raise MalformedResponse(
            "the discovery document is not valid metadata: Object missing required field "
            "`token_endpoint`")
    if merged.get("authorization_response_iss_parameter_supported") is None:
        merged.pop("authorization_response_iss_parameter_supported", None)
    return ProviderMetadata(**merged)


def parse_discovery(issuer: str, body: bytes) -> ProviderMetadata:
    """Parse a single metadata document for ``issuer`` (checked as
    :func:`parse_metadata_document`) into the agent's view of the provider."""
    return merge_metadata([parse_metadata_document(issuer, body)])


def with_endpoints(metadata: ProviderMetadata, endpoints: Mapping[str, str]) -> ProviderMetadata:
    """``metadata`` with the endpoints a profile names (keys of :data:`ENDPOINT_FIELDS`),
    which win over the documents'.

    Each is checked as a discovered one is (https except on loopback, no fragment):
    a profile cannot weaken what discovery would refuse. Raises MalformedResponse
    (naming the setting) or ValueError for a name the agent does not use.
    """
    changes: dict[str, str] = {}
    for name, url in endpoints.items():
        if name not in ENDPOINT_FIELDS:
            raise ValueError(f"not an endpoint the agent uses: {name}")
        try:
            check_endpoint_url(url)
        except MalformedResponse as exc:
            raise MalformedResponse(f"the profile's {name}: {exc}") from None
        changes[name] = url
    return msgspec.structs.replace(metadata, **changes) if changes else metadata


# --------------------------------------------------------------------------
# PKCE (RFC 7636), state and nonce.


class Pkce(msgspec.Struct, frozen=True):
    """A PKCE pair: the secret ``verifier`` and its S256 ``challenge``."""

    verifier: str
    challenge: str

    def __repr__(self) -> str:
        return "Pkce(<redacted>)"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("verifier", REDACTED)]


def pkce_challenge(verifier: str) -> str:
    """S256: BASE64URL(SHA256(ASCII(verifier))) without padding (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> Pkce:
    """A fresh pair (RFC 7636 section 4.1).

    The verifier is 32 random octets, base64url-encoded: 43 characters from the
    unreserved set, as section 4.1 recommends.
    """
    verifier = secrets.token_urlsafe(32)
    return Pkce(verifier, pkce_challenge(verifier))


def new_state() -> str:
    """A fresh ``state`` for one authorization request (RFC 6749 section 10.12)."""
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    """A fresh ``nonce`` for one authentication request (OIDC Core 3.1.2.1, 15.5.2)."""
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------
# Requests.


class HttpRequest(msgspec.Struct, kw_only=True):
    """A request for the I/O edge to send.

    ``form`` is sent as ``application/x-www-form-urlencoded`` when not empty; it
    is a list of pairs because ``resource`` may repeat (RFC 8707 section 2).
    """

    method: str
    url: str
    headers: dict[str, str] = {}
    form: list[tuple[str, str]] = []

    def encoded_form(self) -> bytes:
        """The form body, in order (RFC 6749 Appendix B)."""
        return urlencode(self.form).encode("ascii")

    def __repr__(self) -> str:  # forms and headers carry codes, tokens and verifiers
        parts = urlsplit(self.url)
        return f"HttpRequest({self.method} {parts.netloc}{parts.path})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("request", repr(self))]


def authorization_url(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: Sequence[str],
    state: str,
    pkce: Pkce,
    nonce: str | None = None,
    resources: Sequence[str] = (),
    dpop_jkt: str | None = None,
) -> str:
    """The URL the browser opens: authorization code with PKCE S256.

    RFC 6749 section 4.1.1, RFC 7636 section 4.3, OIDC Core 3.1.2.1 (``nonce``),
    RFC 8707 section 2 (``resource``, repeatable), RFC 9449 section 10
    (``dpop_jkt``: the code is bound to the login's DPoP key). Raises
    MalformedResponse when the provider has no authorization endpoint.
    """
    if not metadata.authorization_endpoint:
        raise MalformedResponse("the provider has no authorization endpoint; use the device flow")
    params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("scope", " ".join(scopes)),
        ("state", state),
        ("code_challenge", pkce.challenge),
        ("code_challenge_method", "S256"),
    ]
    if nonce is not None:
        params.append(("nonce", nonce))
    if "offline_access" in scopes:
        # OIDC Core 11: offline_access is honoured only together with prompt=consent.
        params.append(("prompt", "consent"))
    params.extend(("resource", r) for r in resources)
    if dpop_jkt is not None:
        params.append(("dpop_jkt", dpop_jkt))
    separator = "&" if "?" in metadata.authorization_endpoint else "?"
    return f"{metadata.authorization_endpoint}{separator}{urlencode(params)}"


def code_exchange_request(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    code: str,
    redirect_uri: str,
    pkce: Pkce,
    resources: Sequence[str] = (),
) -> HttpRequest:
    """Exchange an authorization code (RFC 6749 section 4.1.3) with its PKCE verifier
    (RFC 7636 section 4.5); ``resources`` per RFC 8707 section 2.2."""
    form = [
        ("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri),
        ("client_id", client_id), ("code_verifier", pkce.verifier),
    ]
    form.extend(("resource", r) for r in resources)
    return HttpRequest(method="POST", url=metadata.token_endpoint, form=form)


def device_authorization_request(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    scopes: Sequence[str],
    resources: Sequence[str] = (),
) -> HttpRequest:
    """Start a device flow (RFC 8628 section 3.1). Raises MalformedResponse when unsupported."""
    if not metadata.device_authorization_endpoint:
        raise MalformedResponse(
            "the provider's metadata names no device authorization endpoint, so the device "
            "flow cannot start: log in with the browser, or name it with "
            "device_authorization_endpoint in the profile")
    form = [("client_id", client_id), ("scope", " ".join(scopes))]
    form.extend(("resource", r) for r in resources)
    return HttpRequest(method="POST", url=metadata.device_authorization_endpoint, form=form)


def device_token_request(
    metadata: ProviderMetadata, *, client_id: str, device_code: str
) -> HttpRequest:
    """One poll of the token endpoint in the device flow (RFC 8628 section 3.4)."""
    return HttpRequest(method="POST", url=metadata.token_endpoint, form=[
        ("grant_type", DEVICE_GRANT), ("device_code", device_code), ("client_id", client_id),
    ])


def refresh_request(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    refresh_token: str,
    scopes: Sequence[str] | None = None,
    resources: Sequence[str] = (),
    resource: str | None = None,
    audience: str | None = None,
) -> HttpRequest:
    """Refresh (RFC 6749 section 6).

    ``scopes`` asks for a narrower token (section 6: at most the original grant);
    ``resources`` (or a single ``resource``) name the APIs it is for (RFC 8707
    section 2.2); ``audience`` is the parameter some providers (Auth0, Keycloak
    token exchange) use instead.
    """
    form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token),
            ("client_id", client_id)]
    if scopes:
        form.append(("scope", " ".join(scopes)))
    targets = [*resources, *([resource] if resource else [])]
    form.extend(("resource", r) for r in dict.fromkeys(targets))
    if audience:
        form.append(("audience", audience))
    return HttpRequest(method="POST", url=metadata.token_endpoint, form=form)


def revocation_request(
    metadata: ProviderMetadata, *, client_id: str, token: str, hint: str | None = None
) -> HttpRequest:
    """Revoke a token (RFC 7009 section 2.1); ``hint`` is ``refresh_token`` or ``access_token``.

    Raises MalformedResponse when the provider has no revocation endpoint.
    """
    if not metadata.revocation_endpoint:
        raise MalformedResponse(
            "the provider's metadata names no revocation endpoint (revocation_endpoint "
            "in the profile names one)")
    form = [("token", token)]
    if hint:
        form.append(("token_type_hint", hint))
    form.append(("client_id", client_id))
    return HttpRequest(method="POST", url=metadata.revocation_endpoint, form=form)


def userinfo_request(metadata: ProviderMetadata, access_token: str) -> HttpRequest:
    """GET the userinfo endpoint with a bearer token (OIDC Core 5.3.1, RFC 6750 section 2.1)."""
    if not metadata.userinfo_endpoint:
        raise MalformedResponse("the provider has no userinfo endpoint")
    return HttpRequest(method="GET", url=metadata.userinfo_endpoint,
                       headers={"Authorization": f"Bearer {access_token}"})


# --------------------------------------------------------------------------
# Responses.


class TokenResponse(msgspec.Struct, kw_only=True):
    """A successful token response (RFC 6749 section 5.1), normalised.

    ``token_type`` is ``Bearer`` whatever the case the provider used;
    ``expires_in`` is seconds or None; ``received_at`` is the ``now`` the parser
    was given; ``sent_at``, set by the I/O edge, is when the request was sent.
    """

    access_token: str
    token_type: str = "Bearer"
    expires_in: float | None = None
    refresh_token: str | None = None
    id_token: str | None = None
    scope: list[str] | None = None
    received_at: float = 0.0
    sent_at: float | None = None

    @property
    def issued_at(self) -> float:
        """The earliest the provider can have issued the token: when the request was sent
        (when known), else when the answer arrived."""
        return self.sent_at if self.sent_at is not None else self.received_at

    @property
    def expires_at(self) -> float:
        """When the provider says the access token expires, on the agent's clock, counted
        from :attr:`issued_at` (see access_token_expiry): an answer that took 50 s to
        arrive took 50 s of the token's life with it."""
        return access_token_expiry(self.issued_at, self.expires_in, self.access_token)

    def __repr__(self) -> str:
        return (f"TokenResponse(access_token={REDACTED}, token_type={self.token_type!r}, "
                f"expires_in={self.expires_in!r}, scope={self.scope!r}, "
                f"refresh_token={_redacted(self.refresh_token)}, "
                f"id_token={_redacted(self.id_token)}, sent_at={self.sent_at!r}, "
                f"received_at={self.received_at!r})")

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("access_token", REDACTED), ("expires_in", self.expires_in),
                ("scope", self.scope)]


class DeviceAuthorization(msgspec.Struct, kw_only=True):
    """A device authorization response (RFC 8628 section 3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: float = DEFAULT_DEVICE_LIFETIME
    interval: float = DEFAULT_DEVICE_INTERVAL

    def __repr__(self) -> str:  # the device code is a credential; the user code is shown anyway
        return (f"DeviceAuthorization(user_code={self.user_code!r}, "
                f"verification_uri={self.verification_uri!r}, expires_in={self.expires_in!r}, "
                f"interval={self.interval!r}, device_code={REDACTED})")

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("user_code", self.user_code), ("device_code", REDACTED)]


class DevicePending(msgspec.Struct, frozen=True):
    """Device flow: not approved yet; poll again after the interval (RFC 8628 3.5)."""


class DeviceSlowDown(msgspec.Struct, frozen=True):
    """Device flow: polling too fast (RFC 8628 section 3.5).

    ``interval`` is the provider's new interval when it named one (GitHub does).
    """

    interval: float | None = None

    def next_interval(self, current: float) -> float:
        """The interval to use from now on: 5 seconds more, or the provider's, if larger."""
        return max(current + SLOW_DOWN_STEP, self.interval or 0.0)


def _http_date(value: str) -> float | None:
    """An HTTP-date (RFC 9110 section 5.6.7) as a POSIX timestamp, or None."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # "-0000" parses naive; HTTP dates are always GMT
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date (RFC 9110 section 10.2.3), in seconds.

    ``now`` is the time on the same clock as the date: pass the response's Date
    header time when there is one, so that clock skew does not matter.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        when = _http_date(value)
        return None if when is None else max(0.0, when - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _fields(headers: Mapping[str, str], body: bytes) -> dict[str, object]:
    """The body as a flat object: JSON, or form-encoded as some providers send.

    GitHub answers ``application/x-www-form-urlencoded`` unless asked for JSON;
    a few old providers send form bodies labelled ``text/plain``.
    """
    content_type = headers.get("content-type", "").lower()
    text = body.decode("utf-8", "replace")
    if "application/x-www-form-urlencoded" in content_type:
        return dict(parse_qsl(text, keep_blank_values=True))
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        if "json" not in content_type and text.strip():
            try:
                return dict(parse_qsl(text.strip(), keep_blank_values=True,
                                      strict_parsing=True))
            except ValueError:
                pass
        raise MalformedResponse("the provider's answer is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedResponse("the provider's answer is not a JSON object")
    return document


def _www_authenticate_error(value: str | None) -> tuple[str, str | None] | None:
    """``error`` and ``error_description`` of a Bearer challenge (RFC 6750 section 3)."""
    if not value:
        return None
    error = re.search(r'\berror="([^"]*)"', value)
    if error is None:
        return None
    description = re.search(r'\berror_description="([^"]*)"', value)
    return error[1], description[1] if description else None


def check_status(status: int, headers: Mapping[str, str], body: bytes, now: float) -> None:
    """Raise for any answer that is not a success.

    5xx and 429 raise TransientProviderError with Retry-After in seconds; 3xx (the
    edge never follows redirects) raises MalformedResponse; 4xx raises OAuthError
    from the RFC 6749 section 5.2 body, or from a Bearer ``WWW-Authenticate``
    challenge (RFC 6750 section 3), else MalformedResponse.
    """
    if status == 429 or status >= 500:
        date = _http_date(headers["date"]) if headers.get("date") else None
        reference = now if date is None else date  # both ends on the provider's clock
        raise TransientProviderError(status, retry_after_seconds(headers.get("retry-after"),
                                                                 reference))
    if 300 <= status < 400:
        raise MalformedResponse(f"the provider answered with a redirect (HTTP {status}); "
                                "is the endpoint URL right?", status)
    if status >= 400:
        try:
            fields = _fields(headers, body)
        except MalformedResponse:
            fields = {}
        error = fields.get("error")
        if isinstance(error, str) and error:
            description = fields.get("error_description")
            raise OAuthError(error, description if isinstance(description, str) else None,
                             status)
        challenge = _www_authenticate_error(headers.get("www-authenticate"))
        if challenge is not None:
            raise OAuthError(challenge[0], challenge[1], status)
        raise MalformedResponse(f"the provider answered HTTP {status} without an OAuth error",
                                status)
    if status < 200:
        raise MalformedResponse(f"the provider answered HTTP {status}", status)


#: RFC 9449 section 8.1: nonce = 1*NQCHAR; NQCHAR = %x21 / %x23-5B / %x5D-7E.
_DPOP_NONCE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,1024}")


def valid_dpop_nonce(nonce: str) -> bool:
    """Whether a ``DPoP-Nonce`` value is one (RFC 9449 section 8.1), at most 1 KiB."""
    return _DPOP_NONCE.fullmatch(nonce) is not None


def dpop_nonce_of(headers: Mapping[str, str]) -> str | None:
    """The server's ``DPoP-Nonce`` header (RFC 9449 section 8), when it is a valid nonce."""
    nonce = headers.get("dpop-nonce")
    return nonce if nonce is not None and valid_dpop_nonce(nonce) else None


def dpop_nonce_demanded(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """The nonce an authorization server demands (RFC 9449 section 8: HTTP 400 with
    ``use_dpop_nonce`` and a ``DPoP-Nonce`` header), else None."""
    nonce = dpop_nonce_of(headers)
    if nonce is None or status not in (400, 401):
        return None
    try:
        check_status(status, headers, body, 0.0)
    except OAuthError as exc:
        return nonce if exc.error == "use_dpop_nonce" else None
    except OAuthFailure:
        return None
    return None


def _number(value: object) -> float | None:
    """A finite, non-negative number from an int, float or numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) and number >= 0 else None
    return None


#: RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _scope(value: object) -> list[str] | None:
    """The granted scopes: space-delimited (RFC 6749 section 3.3), or a JSON array as
    some providers send. Only RFC 6749 scope-tokens are kept: anything else is provider
    text no request could name, and would reach `compozy auth status` raw."""
    if isinstance(value, str):
        tokens = value.split()
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        tokens = value
    else:
        return None
    return [token for token in tokens if _SCOPE_TOKEN.fullmatch(token)]


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_token_response(
    status: int, headers: Mapping[str, str], body: bytes, now: float
) -> TokenResponse:
    """A token endpoint answer (RFC 6749 sections 5.1 and 5.2), read tolerantly.

    Accepts JSON or form bodies, ``expires_in`` as a number, a numeric string or
    missing, ``token_type`` in any case, ``scope`` as a string or list, and an
    ``error`` on HTTP 200 (as GitHub sends). Raises OAuthError,
    TransientProviderError or MalformedResponse.
    """
    check_status(status, headers, body, now)
    fields = _fields(headers, body)
    access_token = fields.get("access_token")
    error = fields.get("error")
    if not access_token and isinstance(error, str) and error:
        description = fields.get("error_description")
        raise OAuthError(error, description if isinstance(description, str) else None, status)
    if not isinstance(access_token, str) or not access_token:
        raise MalformedResponse("the token response has no access_token", status)
    token_type = fields.get("token_type")
    return TokenResponse(
        access_token=access_token,
        # RFC 6749 section 5.1: token_type is case insensitive (RFC 9449 section 5: DPoP).
        token_type="Bearer" if not isinstance(token_type, str) or token_type.lower() == "bearer"
        else "DPoP" if token_type.lower() == "dpop" else _safe_text(token_type, 32),
        expires_in=_number(fields.get("expires_in")),
        refresh_token=_optional_str(fields.get("refresh_token")),
        id_token=_optional_str(fields.get("id_token")),
        scope=_scope(fields.get("scope")),
        received_at=now,
    )


def parse_refresh_response(
    status: int, headers: Mapping[str, str], body: bytes, now: float, *, refresh_token: str
) -> TokenResponse:
    """A refresh answer: as parse_token_response, but a missing ``refresh_token``
    means the one sent stays valid (RFC 6749 section 6), so it is filled in."""
    response = parse_token_response(status, headers, body, now)
    if response.refresh_token is None:
        response = msgspec.structs.replace(response, refresh_token=refresh_token)
    return response


def parse_device_authorization(
    status: int, headers: Mapping[str, str], body: bytes, now: float
) -> DeviceAuthorization:
    """A device authorization answer (RFC 8628 section 3.2).

    Tolerates ``verification_url`` (Google's spelling), numbers as strings, and a
    missing ``interval`` (5 s) or ``expires_in``. Raises as check_status, or
    MalformedResponse when a required field is missing.
    """
    check_status(status, headers, body, now)
    fields = _fields(headers, body)
    device_code = _optional_str(fields.get("device_code"))
    user_code = _optional_str(fields.get("user_code"))
    verification_uri = _optional_str(fields.get("verification_uri")) \
        or _optional_str(fields.get("verification_url"))
    if device_code is None or user_code is None or verification_uri is None:
        raise MalformedResponse("the device authorization response lacks device_code, "
                                "user_code or verification_uri", status)
    expires_in = _number(fields.get("expires_in"))
    interval = _number(fields.get("interval"))
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=verification_uri,
        verification_uri_complete=_optional_str(fields.get("verification_uri_complete")),
        expires_in=expires_in or DEFAULT_DEVICE_LIFETIME,
        interval=DEFAULT_DEVICE_INTERVAL if interval is None else interval,
    )


def parse_device_poll(
    status: int, headers: Mapping[str, str], body: bytes, now: float
) -> TokenResponse | DevicePending | DeviceSlowDown:
    """One device-flow poll answer (RFC 8628 section 3.5).

    ``authorization_pending`` gives DevicePending and ``slow_down`` gives
    DeviceSlowDown; ``expired_token``, ``access_denied`` and any other code raise
    OAuthError (match on ``.error``); success gives the TokenResponse.
    """
    try:
        return parse_token_response(status, headers, body, now)
    except OAuthError as exc:
        if exc.error == "authorization_pending":
            return DevicePending()
        if exc.error == "slow_down":
            try:
                interval = _number(_fields(headers, body).get("interval"))
            except MalformedResponse:
                interval = None
            return DeviceSlowDown(interval)
        raise


def parse_revocation_response(
    status: int, headers: Mapping[str, str], body: bytes, now: float
) -> None:
    """A revocation answer (RFC 7009 section 2.2): any 2xx means revoked or already invalid.

    ``unsupported_token_type`` (2.2.1) and other codes raise OAuthError; 503
    raises TransientProviderError with Retry-After.
    """
    check_status(status, headers, body, now)


def parse_userinfo(
    status: int, headers: Mapping[str, str], body: bytes, now: float,
    *, subject: str | None = None,
) -> dict[str, object]:
    """A userinfo answer (OIDC Core 5.3.2): JSON claims, or a JWT (``application/jwt``).

    A signed answer is decoded without checking the signature, for the same
    reason as the ID token (see decode_jwt_claims). When ``subject`` is given the
    answer's ``sub`` must equal it (5.3.2: otherwise it MUST NOT be used). A 401
    with a Bearer challenge raises OAuthError (``invalid_token``).
    """
    check_status(status, headers, body, now)
    if "application/jwt" in headers.get("content-type", "").lower():
        claims = decode_jwt_claims(body.decode("ascii", "replace").strip())
        if not claims:
            raise MalformedResponse("the userinfo response is not a readable JWT", status)
    else:
        claims = _fields(headers, body)
    if subject is not None and claims.get("sub") != subject:
        raise MalformedResponse("the userinfo response is about another subject", status)
    return claims


# --------------------------------------------------------------------------
# ID tokens and access-token expiry.


def decode_jwt_claims(token: str) -> dict[str, object]:
    """The payload of a compact JWS, *not verified*; ``{}`` if it is not one.

    No signature check, on purpose: the ID token comes straight from the token
    endpoint over TLS (the edge refuses plain http off loopback), which OIDC Core
    3.1.3.7 step 6 accepts in lieu of checking the signature for the code flow;
    the device flow gets it the same way. The claims are still checked by
    validate_id_token_claims. Also used to read an access token's ``exp`` when
    the response lacks ``expires_in``; never to decide what a resource server
    will accept.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def validate_id_token_claims(
    claims: Mapping[str, object],
    *,
    issuer: str,
    client_id: str,
    now: float,
    nonce: str | None = None,
    leeway: float = 300.0,
) -> None:
    """Check an ID token's claims (OIDC Core 3.1.3.7, 2.), raising MalformedResponse.

    Step 2: ``iss`` is the issuer (trailing ``/`` as in discovery). Step 3: ``aud``
    (a string or a list) contains ``client_id``. Steps 4-5: with several audiences
    ``azp`` must be present, and when present it must be ``client_id``. Step 9:
    ``exp`` is present and not more than ``leeway`` seconds past. Step 11: when a
    ``nonce`` was sent, the claim equals it.
    """
    _check_issuer_and_audience(claims, issuer, client_id, "the ID token")
    audience = claims.get("aud")
    if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") is None:
        raise MalformedResponse("the ID token was issued to another party (azp)")
    expiry = _number(claims.get("exp"))
    if expiry is None:
        raise MalformedResponse("the ID token has no exp claim")
    if now > expiry + leeway:
        raise MalformedResponse("the ID token has expired; check your system clock")
    if nonce is not None:
        stated_nonce = claims.get("nonce")
        if not isinstance(stated_nonce, str) or not hmac.compare_digest(
                stated_nonce.encode(), nonce.encode()):
            raise MalformedResponse("the ID token's nonce does not match this login")


def _check_issuer_and_audience(
    claims: Mapping[str, object], issuer: str, client_id: str, what: str
) -> None:
    """OIDC Core 3.1.3.7 steps 2-5 for ``claims``; ``what`` names the token in messages."""
    if not claims:
        raise MalformedResponse(f"{what} is not a readable JWT")
    stated_issuer = claims.get("iss")
    if not isinstance(stated_issuer, str) or not _same_issuer(stated_issuer, issuer):
        raise MalformedResponse(f"{what} was issued by another issuer")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if client_id not in audiences:
        raise MalformedResponse(f"{what} is not for this client")
    azp = claims.get("azp")
    if azp is not None and azp != client_id:
        raise MalformedResponse(f"{what} was issued to another party (azp)")


def validate_refresh_id_token(
    id_token: str, *, issuer: str, client_id: str, subject: str | None
) -> None:
    """Check an ID token that came with a refresh, raising MalformedResponse.

    OIDC Core 12.2: its ``iss`` and ``sub`` MUST be the login's and its ``aud`` the
    client (``azp`` as at login); an answer about someone else is not this session's.
    It need not carry a nonce, and ``exp`` is not judged here (a clock that drifted
    since the login must not end a session). ``subject`` None: the login had no ID
    token, so only issuer and audience are compared.
    """
    claims = decode_jwt_claims(id_token)
    _check_issuer_and_audience(claims, issuer, client_id, "the refresh's ID token")
    if subject is not None and claims.get("sub") != subject:
        raise MalformedResponse("the refresh's ID token is about another subject than "
                                "the login's (OIDC Core 12.2)")


def account_from_claims(claims: Mapping[str, object]) -> str | None:
    """What to call the person: ``email``, else ``preferred_username``, ``name``, ``sub``."""
    for key in ("email", "preferred_username", "name", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def access_token_expiry(received_at: float, expires_in: float | None, access_token: str) -> float:
    """When an access token expires, on the agent's clock.

    ``received_at + expires_in`` when the provider said (RFC 6749 section 5.1);
    else the token's own ``exp`` if it is a JWT (provider clock, and in the
    future); else ``received_at`` plus the conservative DEFAULT_LIFETIME.
    """
    if expires_in is not None and expires_in > 0:
        return received_at + expires_in
    expiry = _number(decode_jwt_claims(access_token).get("exp"))
    if expiry is not None and expiry > received_at:
        return expiry
    return received_at + DEFAULT_LIFETIME


def clock_skew(date_header: str | None, local_now: float) -> float | None:
    """Provider time minus local time, from an HTTP ``Date`` header (RFC 9110 section 6.6.1).

    None when the header is missing or unreadable. The header has one-second
    resolution, so only skews of a few seconds or more mean anything.
    """
    if not date_header:
        return None
    provider_now = _http_date(date_header)
    return None if provider_now is None else provider_now - local_now


# --------------------------------------------------------------------------
# The loopback redirect (RFC 8252 section 7.3).


def loopback_redirect_uri(port: int) -> str:
    """The redirect URI for a listener on ``port``: the IPv4 literal, never
    ``localhost`` (RFC 8252 sections 7.3 and 8.3)."""
    if not 0 < port < 65536:
        raise ValueError(f"not a TCP port: {port}")
    return f"http://127.0.0.1:{port}/callback"


def parse_callback(
    query: str | Mapping[str, str],
    expected_state: str,
    *,
    issuer: str | None = None,
    issuer_required: bool = False,
) -> str:
    """The authorization code of a redirect that belongs to this login.

    ``query`` is the raw query string or its parsed parameters. Checks, in order:
    no parameter repeats (RFC 6749 section 3.1); ``state`` equals
    ``expected_state`` (RFC 6749 section 10.12; checked first so that a forged
    ``error=`` cannot end a login); ``iss`` equals ``issuer`` when present, and is
    present when ``issuer_required`` (RFC 9207 section 2.4). Then an ``error``
    raises OAuthError (``access_denied`` and so on, RFC 6749 section 4.1.2.1), and
    a missing ``code`` raises CallbackError, as do the failed checks.
    """
    if isinstance(query, str):
        pairs = parse_qsl(query.removeprefix("?"), keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs):
            raise CallbackError("the login callback repeats a parameter (RFC 6749 3.1)")
    else:
        params = dict(query)
    state = params.get("state", "")
    if not hmac.compare_digest(state.encode(), expected_state.encode()):
        raise CallbackError("the login callback's state does not match this login")
    stated_issuer = params.get("iss")
    if issuer is not None and (stated_issuer is not None or issuer_required) and (
            stated_issuer is None or not _same_issuer(stated_issuer, issuer)):
        raise CallbackError("the login callback comes from another issuer (RFC 9207)")
    if "error" in params:
        raise OAuthError(params["error"] or "unknown_error",
                         params.get("error_description"), status=None)
    code = params.get("code")
    if not code:
        raise CallbackError("the login callback carries no code")
    return code
