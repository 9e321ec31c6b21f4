"""OAuth 2.0 / OpenID Connect messages, without I/O: build requests, parse responses.

Nothing here opens a socket or reads a clock; times come in as arguments.
``http.py`` sends what this module builds. The exception tree::

    OAuthFailure                 anything a provider exchange can end in
    ├── OAuthError               the provider said no (RFC 6749 section 5.2: error, description)
    ├── TransientProviderError   5xx or 429: try again later (retry_after, if the provider said)
    ├── MalformedResponse        the provider's answer cannot be understood
    └── ProviderUnreachable      no answer at all (raised by http.py)

Messages name the endpoint's host and the error code, never a token or a body.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import msgspec

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
#: Used when neither expires_in nor a JWT exp says how long a token lives.
DEFAULT_LIFETIME: Final = 300.0
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


class OAuthFailure(Exception):
    """Base of every failure of a provider exchange."""


class OAuthError(OAuthFailure):
    """An error response (RFC 6749 section 5.2, RFC 8628 section 3.5)."""

    def __init__(self, error: str, description: str | None = None, status: int = 400) -> None:
        self.error = error
        self.description = description
        self.status = status
        super().__init__(f"{error}: {description}" if description else error)


class TransientProviderError(OAuthFailure):
    """5xx or 429: the provider may answer later."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"the provider answered HTTP {status}; try again later")


class MalformedResponse(OAuthFailure):
    """The provider's answer is not what the standard says it should be."""


class ProviderUnreachable(OAuthFailure):
    """The provider could not be reached (raised by the I/O edge)."""


class ProviderMetadata(msgspec.Struct, kw_only=True):
    """OIDC Discovery / RFC 8414 metadata, the fields this agent uses."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    code_challenge_methods_supported: list[str] | None = None
    scopes_supported: list[str] | None = None
    grant_types_supported: list[str] | None = None


def discovery_urls(issuer: str) -> list[str]:
    """Where to look for metadata: OIDC Discovery 4.1, then RFC 8414 section 3.1.

    RFC 8414 inserts the well-known segment between host and path.
    """
    issuer = issuer.rstrip("/")
    parts = urlsplit(issuer)
    oidc = f"{issuer}/.well-known/openid-configuration"
    rfc8414 = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}"
    return [oidc, rfc8414]


def check_endpoint_url(url: str) -> None:
    """HTTPS everywhere but on the loopback interface (RFC 9700 section 2.6)."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        return
    raise MalformedResponse(f"refusing a non-HTTPS provider endpoint on {parts.hostname}")


def parse_discovery(issuer: str, body: bytes) -> ProviderMetadata:
    """Parse metadata and insist that it names ``issuer`` exactly (RFC 8414 section 3.3)."""
    try:
        metadata = msgspec.json.decode(body, type=ProviderMetadata)
    except msgspec.DecodeError:
        raise MalformedResponse("the provider's discovery document is not valid metadata") \
            from None
    if metadata.issuer.rstrip("/") != issuer.rstrip("/"):
        raise MalformedResponse(
            f"discovery names issuer {metadata.issuer!r}, not {issuer!r}; refusing (RFC 8414 3.3)"
        )
    for url in (metadata.token_endpoint, metadata.authorization_endpoint,
                metadata.device_authorization_endpoint, metadata.revocation_endpoint):
        if url:
            check_endpoint_url(url)
    return metadata


class Pkce(msgspec.Struct, frozen=True):
    verifier: str
    challenge: str

    def __repr__(self) -> str:
        return "Pkce(<redacted>)"


def pkce_challenge(verifier: str) -> str:
    """S256: BASE64URL(SHA256(verifier)) without padding (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> Pkce:
    """A fresh verifier of 43 characters from 32 random bytes (RFC 7636 section 4.1)."""
    verifier = secrets.token_urlsafe(32)
    return Pkce(verifier, pkce_challenge(verifier))


def new_state() -> str:
    return secrets.token_urlsafe(24)


class HttpRequest(msgspec.Struct, kw_only=True):
    """A request for the I/O edge to send. ``form`` pairs may repeat a name (resource=)."""

    method: str
    url: str
    form: list[tuple[str, str]] = []
    bearer: str | None = None

    def __repr__(self) -> str:  # forms carry codes and refresh tokens
        return f"HttpRequest({self.method} {urlsplit(self.url).netloc}{urlsplit(self.url).path})"


def authorization_url(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: list[str],
    state: str,
    pkce: Pkce,
    resources: list[str] = [],  # noqa: B006 - never mutated
) -> str:
    """The browser's URL for the authorization code flow with PKCE S256 (RFC 7636, 8252)."""
    if not metadata.authorization_endpoint:
        raise MalformedResponse("the provider has no authorization endpoint; use --device")
    params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("scope", " ".join(scopes)),
        ("state", state),
        ("code_challenge", pkce.challenge),
        ("code_challenge_method", "S256"),
    ]
    if "offline_access" in scopes:
        # OIDC Core 11: offline_access is honoured only together with prompt=consent.
        params.append(("prompt", "consent"))
    params.extend(("resource", r) for r in resources)
    separator = "&" if "?" in metadata.authorization_endpoint else "?"
    return f"{metadata.authorization_endpoint}{separator}{urlencode(params)}"


def code_exchange_request(
    metadata: ProviderMetadata, *, client_id: str, code: str, redirect_uri: str, pkce: Pkce
) -> HttpRequest:
    """RFC 6749 section 4.1.3 with the PKCE verifier (RFC 7636 section 4.5)."""
    return HttpRequest(method="POST", url=metadata.token_endpoint, form=[
        ("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri),
        ("client_id", client_id), ("code_verifier", pkce.verifier),
    ])


def device_authorization_request(
    metadata: ProviderMetadata, *, client_id: str, scopes: list[str], resources: list[str] = []  # noqa: B006
) -> HttpRequest:
    """RFC 8628 section 3.1."""
    if not metadata.device_authorization_endpoint:
        raise MalformedResponse("the provider does not support the device flow; use the browser")
    form = [("client_id", client_id), ("scope", " ".join(scopes))]
    form.extend(("resource", r) for r in resources)
    return HttpRequest(method="POST", url=metadata.device_authorization_endpoint, form=form)


def device_token_request(
    metadata: ProviderMetadata, *, client_id: str, device_code: str
) -> HttpRequest:
    """RFC 8628 section 3.4."""
    return HttpRequest(method="POST", url=metadata.token_endpoint, form=[
        ("grant_type", DEVICE_GRANT), ("device_code", device_code), ("client_id", client_id),
    ])


def refresh_request(
    metadata: ProviderMetadata,
    *,
    client_id: str,
    refresh_token: str,
    scopes: list[str] | None = None,
    resource: str | None = None,
) -> HttpRequest:
    """RFC 6749 section 6; narrower with ``scope``, for one API with RFC 8707 ``resource``."""
    form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token),
            ("client_id", client_id)]
    if scopes:
        form.append(("scope", " ".join(scopes)))
    if resource:
        form.append(("resource", resource))
    return HttpRequest(method="POST", url=metadata.token_endpoint, form=form)


def revocation_request(
    metadata: ProviderMetadata, *, client_id: str, token: str, hint: str
) -> HttpRequest:
    """RFC 7009 section 2.1."""
    if not metadata.revocation_endpoint:
        raise MalformedResponse("the provider has no revocation endpoint")
    return HttpRequest(method="POST", url=metadata.revocation_endpoint, form=[
        ("token", token), ("token_type_hint", hint), ("client_id", client_id),
    ])


def userinfo_request(metadata: ProviderMetadata, access_token: str) -> HttpRequest:
    if not metadata.userinfo_endpoint:
        raise MalformedResponse("the provider has no userinfo endpoint")
    return HttpRequest(method="GET", url=metadata.userinfo_endpoint, bearer=access_token)


class TokenResponse(msgspec.Struct, kw_only=True):
    """A successful token response (RFC 6749 section 5.1), normalised."""

    access_token: str
    token_type: str = "Bearer"
    expires_in: float | None = None
    refresh_token: str | None = None
    id_token: str | None = None
    scope: list[str] | None = None

    def __repr__(self) -> str:
        refresh = "<redacted>" if self.refresh_token else None
        return (f"TokenResponse(token_type={self.token_type!r}, expires_in={self.expires_in!r}, "
                f"scope={self.scope!r}, refresh_token={refresh})")


class DeviceAuthorization(msgspec.Struct, kw_only=True):
    """RFC 8628 section 3.2."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: float = 600.0
    interval: float = 5.0

    def __repr__(self) -> str:
        return f"DeviceAuthorization(user_code={self.user_code!r}, <device_code redacted>)"


def _body_fields(headers: dict[str, str], body: bytes) -> dict[str, object]:
    """JSON, or form-encoded as some providers send (e.g. GitHub without Accept)."""
    content_type = headers.get("content-type", "")
    if "application/x-www-form-urlencoded" in content_type:
        return dict(parse_qsl(body.decode("utf-8", "replace")))
    try:
        document = json.loads(body)
    except ValueError:
        raise MalformedResponse("the provider's answer is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedResponse("the provider's answer is not a JSON object")
    return document


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def check_status(status: int, headers: dict[str, str], body: bytes, now: float) -> None:
    """Raise for 5xx/429 (transient) and for OAuth error bodies."""
    if status == 429 or status >= 500:
        raise TransientProviderError(status, retry_after_seconds(headers.get("retry-after"), now))
    if status >= 400:
        try:
            fields = _body_fields(headers, body)
        except MalformedResponse:
            raise MalformedResponse(f"the provider answered HTTP {status} without an error body") \
                from None
        error = fields.get("error")
        if not isinstance(error, str):
            raise MalformedResponse(f"the provider answered HTTP {status} without an error code")
        description = fields.get("error_description")
        raise OAuthError(error, description if isinstance(description, str) else None, status)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_token_response(
    status: int, headers: dict[str, str], body: bytes, now: float
) -> TokenResponse:
    """A token response, tolerant of expires_in as a string or missing, and form bodies."""
    check_status(status, headers, body, now)
    fields = _body_fields(headers, body)
    access_token = fields.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise MalformedResponse("the token response has no access_token")
    scope = fields.get("scope")
    refresh = fields.get("refresh_token")
    id_token = fields.get("id_token")
    token_type = fields.get("token_type")
    return TokenResponse(
        access_token=access_token,
        token_type="Bearer" if not isinstance(token_type, str) or token_type.lower() == "bearer"
        else token_type,
        expires_in=_number(fields.get("expires_in")),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        scope=scope.split() if isinstance(scope, str) else None,
    )


def parse_device_authorization(
    status: int, headers: dict[str, str], body: bytes, now: float
) -> DeviceAuthorization:
    check_status(status, headers, body, now)
    fields = _body_fields(headers, body)
    try:
        return msgspec.convert(
            {k: (_number(v) if k in ("expires_in", "interval") else v) for k, v in fields.items()
             if v is not None},
            DeviceAuthorization, strict=False,
        )
    except msgspec.ValidationError:
        raise MalformedResponse("the device authorization response is incomplete") from None


def decode_jwt_claims(token: str) -> dict[str, object]:
    """The payload of a JWT, unverified.

    Used for the ID token received straight from the token endpoint over TLS,
    which OIDC Core 3.1.3.7 (6) allows in lieu of a signature check, and to
    read an access token's ``exp`` when the response lacks ``expires_in``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def validate_id_token_claims(
    claims: dict[str, object], *, issuer: str, client_id: str, now: float, leeway: float = 300.0
) -> None:
    """OIDC Core 3.1.3.7 steps 2, 3 and 9: issuer, audience, expiry."""
    if str(claims.get("iss", "")).rstrip("/") != issuer.rstrip("/"):
        raise MalformedResponse("the ID token was issued by another issuer")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if client_id not in audiences:
        raise MalformedResponse("the ID token is not for this client")
    expiry = _number(claims.get("exp"))
    if expiry is not None and expiry + leeway < now:
        raise MalformedResponse("the ID token has expired; check your system clock")


def account_from_claims(claims: dict[str, object]) -> str | None:
    """What to call the person: email, else preferred_username, name or sub."""
    for key in ("email", "preferred_username", "name", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def access_token_expiry(received_at: float, expires_in: float | None, access_token: str) -> float:
    """``received_at + expires_in``; else the JWT ``exp``; else a conservative default."""
    if expires_in is not None and expires_in > 0:
        return received_at + expires_in
    expiry = _number(decode_jwt_claims(access_token).get("exp"))
    if expiry is not None and expiry > received_at:
        return expiry
    return received_at + DEFAULT_LIFETIME


def clock_skew(date_header: str | None, local_now: float) -> float | None:
    """Provider time minus local time, from an HTTP ``Date`` header."""
    if not date_header:
        return None
    try:
        return parsedate_to_datetime(date_header).timestamp() - local_now
    except (TypeError, ValueError):
        return None
