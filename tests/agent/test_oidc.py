"""Sans-I/O OAuth messages: standard vectors, strict checks, tolerant parsing, redaction."""

from __future__ import annotations

import base64
import json
import string
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest

from compozy_agent import oidc

ISSUER = "https://auth.example.test"
META = oidc.ProviderMetadata(
    issuer=ISSUER,
    token_endpoint=f"{ISSUER}/token",
    authorization_endpoint=f"{ISSUER}/authorize",
    device_authorization_endpoint=f"{ISSUER}/device",
    revocation_endpoint=f"{ISSUER}/revoke",
    userinfo_endpoint=f"{ISSUER}/me",
)
JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
# Token-shaped secrets, as a provider would issue them.
ACCESS = "at-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
REFRESH = "rt-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def jwt(claims: dict[str, object]) -> str:
    def segment(document: dict[str, object]) -> str:
        raw = json.dumps(document).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{segment({'alg': 'RS256'})}.{segment(claims)}.c2ln"


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# --------------------------------------------------------------------------- PKCE


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert oidc.pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_pkce_is_fresh_unreserved_and_redacted() -> None:
    pairs = [oidc.new_pkce() for _ in range(20)]
    assert len({p.verifier for p in pairs}) == 20
    for pkce in pairs:
        assert 43 <= len(pkce.verifier) <= 128
        assert set(pkce.verifier) <= UNRESERVED
        assert pkce.challenge == oidc.pkce_challenge(pkce.verifier)
        assert pkce.verifier not in repr(pkce) and pkce.verifier not in str(pkce)
        assert pkce.verifier not in repr(pkce.__rich_repr__())


def test_state_and_nonce_are_fresh_and_url_safe() -> None:
    values = [oidc.new_state() for _ in range(10)] + [oidc.new_nonce() for _ in range(10)]
    assert len(set(values)) == 20
    assert all(len(v) >= 43 and set(v) <= UNRESERVED for v in values)


# ---------------------------------------------------------------------- discovery


@pytest.mark.parametrize(
    ("issuer", "urls"),
    [
        (
            "https://a.test/tenant1",
            [
                "https://a.test/tenant1/.well-known/openid-configuration",
                "https://a.test/.well-known/oauth-authorization-server/tenant1",
            ],
        ),
        (
            "https://a.test/",
            [
                "https://a.test/.well-known/openid-configuration",
                "https://a.test/.well-known/oauth-authorization-server",
            ],
        ),
        (
            "https://a.test:8443",
            [
                "https://a.test:8443/.well-known/openid-configuration",
                "https://a.test:8443/.well-known/oauth-authorization-server",
            ],
        ),
        (
            "https://a.test/realms/x/",
            [
                "https://a.test/realms/x/.well-known/openid-configuration",
                "https://a.test/.well-known/oauth-authorization-server/realms/x",
            ],
        ),
    ],
)
def test_discovery_urls_follow_oidc_then_rfc8414_path_insertion(
    issuer: str, urls: list[str]
) -> None:
    assert oidc.discovery_urls(issuer) == urls


def metadata_body(issuer: str = ISSUER, **overrides: object) -> bytes:
    document: dict[str, object] = {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "authorization_endpoint": f"{issuer}/authorize",
        "code_challenge_methods_supported": ["S256"],
        "some_future_field": {"nested": True},
    }
    document.update(overrides)
    return json.dumps({k: v for k, v in document.items() if v is not None}).encode()


def test_discovery_parses_what_the_agent_uses_and_ignores_the_rest() -> None:
    metadata = oidc.parse_discovery(
        ISSUER,
        metadata_body(
            introspection_endpoint=f"{ISSUER}/introspect",
            grant_types_supported=["authorization_code", oidc.DEVICE_GRANT],
            authorization_response_iss_parameter_supported=True,
        ),
    )
    assert metadata.token_endpoint == f"{ISSUER}/token"
    assert metadata.introspection_endpoint == f"{ISSUER}/introspect"
    assert metadata.code_challenge_methods_supported == ["S256"]
    assert metadata.device_authorization_endpoint is None
    assert metadata.authorization_response_iss_parameter_supported


@pytest.mark.parametrize(
    "stated",
    [
        "https://evil.test",
        "https://auth.example.test/other",
        "https://AUTH.example.test",
        "http://auth.example.test",
        "https://auth.example.test.evil.test",
    ],
)
def test_discovery_refuses_another_issuer(stated: str) -> None:
    with pytest.raises(oidc.MalformedResponse, match=r"RFC 8414 3\.3"):
        oidc.parse_discovery(ISSUER, metadata_body(stated))


def test_discovery_allows_only_a_trailing_slash_difference() -> None:
    assert oidc.parse_discovery(ISSUER + "/", metadata_body(ISSUER)).issuer == ISSUER
    assert oidc.parse_discovery(ISSUER, metadata_body(ISSUER + "/")).issuer == ISSUER + "/"


@pytest.mark.parametrize(
    "field",
    [
        "token_endpoint",
        "authorization_endpoint",
        "device_authorization_endpoint",
        "revocation_endpoint",
        "userinfo_endpoint",
        "introspection_endpoint",
    ],
)
def test_discovery_requires_https_endpoints(field: str) -> None:
    body = metadata_body(**{field: "http://auth.example.test/x"})
    with pytest.raises(oidc.MalformedResponse, match="non-HTTPS"):
        oidc.parse_discovery(ISSUER, body)


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "[::1]:8080", "localhost:8080"])
def test_plain_http_is_fine_on_loopback(host: str) -> None:
    issuer = f"http://{host}"
    oidc.check_issuer(issuer)
    assert oidc.parse_discovery(issuer, metadata_body(issuer)).issuer == issuer


@pytest.mark.parametrize(
    "url",
    [
        "http://auth.example.test",
        "http://127.0.0.2",  # only the loopback names the RFC lists
        "ftp://auth.example.test",
        "https://auth.example.test#frag",
        "https://auth.example.test?tenant=1",
        "https:///nohost",
    ],
)
def test_bad_issuers_are_refused(url: str) -> None:
    with pytest.raises(oidc.MalformedResponse):
        oidc.check_issuer(url)


def test_discovery_without_token_endpoint_or_json_is_malformed() -> None:
    with pytest.raises(oidc.MalformedResponse, match="token_endpoint"):
        oidc.parse_discovery(ISSUER, json.dumps({"issuer": ISSUER}).encode())
    with pytest.raises(oidc.MalformedResponse, match="not JSON"):
        oidc.parse_discovery(ISSUER, b"<html>sign in</html>")


def test_merge_takes_each_field_from_the_first_document_that_has_it() -> None:
    openid = oidc.parse_metadata_document(ISSUER, json.dumps({
        "issuer": ISSUER, "token_endpoint": f"{ISSUER}/token",
        "userinfo_endpoint": f"{ISSUER}/me"}).encode())
    rfc8414 = oidc.parse_metadata_document(ISSUER + "/", json.dumps({
        "issuer": ISSUER, "token_endpoint": f"{ISSUER}/elsewhere",
        "revocation_endpoint": f"{ISSUER}/revoke",
        "grant_types_supported": [oidc.DEVICE_GRANT]}).encode())
    merged = oidc.merge_metadata([openid, rfc8414])
    assert merged.token_endpoint == f"{ISSUER}/token"
    assert merged.userinfo_endpoint == f"{ISSUER}/me"
    assert merged.revocation_endpoint == f"{ISSUER}/revoke"
    assert merged.grant_types_supported == [oidc.DEVICE_GRANT]
    assert merged.device_authorization_endpoint is None
    assert oidc.metadata_gaps(merged) == ["authorization_endpoint",
                                          "device_authorization_endpoint"]
    # RFC 8414 alone may serve, and a document without a token endpoint cannot.
    assert oidc.merge_metadata([rfc8414]).token_endpoint == f"{ISSUER}/elsewhere"
    no_token = oidc.parse_metadata_document(ISSUER, json.dumps({"issuer": ISSUER}).encode())
    with pytest.raises(oidc.MalformedResponse, match="token_endpoint"):
        oidc.merge_metadata([no_token])


@pytest.mark.parametrize("stated", ["https://evil.test", f"{ISSUER}/other"])
def test_each_metadata_document_must_name_the_issuer(stated: str) -> None:
    with pytest.raises(oidc.MalformedResponse, match=r"RFC 8414 3\.3"):
        oidc.parse_metadata_document(ISSUER, json.dumps({"issuer": stated}).encode())


def test_profile_endpoints_win_and_are_checked() -> None:
    named = oidc.with_endpoints(META, {"revocation_endpoint": f"{ISSUER}/r2"})
    assert named.revocation_endpoint == f"{ISSUER}/r2" and named.token_endpoint == \
        META.token_endpoint
    with pytest.raises(oidc.MalformedResponse, match="device_authorization_endpoint"):
        oidc.with_endpoints(META, {"device_authorization_endpoint": "http://a.test/d"})
    with pytest.raises(oidc.MalformedResponse, match="fragment"):
        oidc.with_endpoints(META, {"token_endpoint": f"{ISSUER}/t#x"})
    with pytest.raises(ValueError, match="not an endpoint"):
        oidc.with_endpoints(META, {"jwks_uri": f"{ISSUER}/jwks"})


# ----------------------------------------------------------------------- requests


def test_authorization_url_carries_pkce_state_nonce_and_resources() -> None:
    url = oidc.authorization_url(
        META,
        client_id="cli",
        redirect_uri="http://127.0.0.1:5/callback",
        scopes=["openid", "offline_access"],
        state="st",
        pkce=oidc.Pkce("v", "ch"),
        nonce="nn",
        resources=["https://api.test", "https://other.test"],
    )
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == META.authorization_endpoint
    params = parse_qs(parts.query)
    assert params == {
        "response_type": ["code"],
        "client_id": ["cli"],
        "redirect_uri": ["http://127.0.0.1:5/callback"],
        "scope": ["openid offline_access"],
        "state": ["st"],
        "code_challenge": ["ch"],
        "code_challenge_method": ["S256"],
        "nonce": ["nn"],
        "prompt": ["consent"],
        "resource": ["https://api.test", "https://other.test"],
    }
    assert "v" not in params.get("code_verifier", [])


def test_authorization_url_keeps_an_existing_query_and_needs_an_endpoint() -> None:
    meta = oidc.ProviderMetadata(
        issuer=ISSUER, token_endpoint=f"{ISSUER}/t", authorization_endpoint=f"{ISSUER}/a?p=1"
    )
    url = oidc.authorization_url(meta, client_id="c", redirect_uri="r", scopes=["openid"],
                                 state="s", pkce=oidc.Pkce("v", "ch"))
    assert url.startswith(f"{ISSUER}/a?p=1&response_type=code")
    assert "nonce" not in url and "prompt" not in url
    bare = oidc.ProviderMetadata(issuer=ISSUER, token_endpoint=f"{ISSUER}/t")
    with pytest.raises(oidc.MalformedResponse, match="authorization endpoint"):
        oidc.authorization_url(bare, client_id="c", redirect_uri="r", scopes=[], state="s",
                               pkce=oidc.Pkce("v", "ch"))


def test_code_exchange_request() -> None:
    request = oidc.code_exchange_request(
        META, client_id="cli", code="the-code", redirect_uri="http://127.0.0.1:5/callback",
        pkce=oidc.Pkce("the-verifier", "ch"), resources=["https://api.test"],
    )
    assert (request.method, request.url) == ("POST", META.token_endpoint)
    assert request.form == [
        ("grant_type", "authorization_code"),
        ("code", "the-code"),
        ("redirect_uri", "http://127.0.0.1:5/callback"),
        ("client_id", "cli"),
        ("code_verifier", "the-verifier"),
        ("resource", "https://api.test"),
    ]
    assert "the-code" not in repr(request) and "the-verifier" not in repr(request)


def test_device_requests() -> None:
    start = oidc.device_authorization_request(
        META, client_id="cli", scopes=["openid", "email"], resources=["https://a", "https://b"]
    )
    assert start.url == META.device_authorization_endpoint
    assert start.form == [("client_id", "cli"), ("scope", "openid email"),
                          ("resource", "https://a"), ("resource", "https://b")]
    poll = oidc.device_token_request(META, client_id="cli", device_code="dc-secret")
    assert poll.url == META.token_endpoint
    assert dict(poll.form) == {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                               "device_code": "dc-secret", "client_id": "cli"}
    assert "dc-secret" not in repr(poll)
    no_device = oidc.ProviderMetadata(issuer=ISSUER, token_endpoint=f"{ISSUER}/t")
    with pytest.raises(oidc.MalformedResponse, match="device flow"):
        oidc.device_authorization_request(no_device, client_id="cli", scopes=[])


def test_refresh_request_narrows_scope_and_names_resources_and_audience() -> None:
    plain = oidc.refresh_request(META, client_id="cli", refresh_token=REFRESH)
    assert plain.form == [("grant_type", "refresh_token"), ("refresh_token", REFRESH),
                          ("client_id", "cli")]
    narrow = oidc.refresh_request(
        META, client_id="cli", refresh_token=REFRESH, scopes=["read", "write"],
        resources=["https://a", "https://b"], resource="https://a", audience="api://x",
    )
    assert narrow.form[3:] == [("scope", "read write"), ("resource", "https://a"),
                               ("resource", "https://b"), ("audience", "api://x")]
    # Repeated names survive form encoding (RFC 8707 section 2).
    assert parse_qsl(narrow.encoded_form().decode()).count(("resource", "https://b")) == 1
    assert parse_qs(narrow.encoded_form().decode())["resource"] == ["https://a", "https://b"]
    assert REFRESH not in repr(narrow) and REFRESH not in str(narrow)
    assert REFRESH not in repr(narrow.__rich_repr__())


def test_revocation_and_userinfo_requests() -> None:
    revoke = oidc.revocation_request(META, client_id="cli", token=REFRESH, hint="refresh_token")
    assert revoke.url == META.revocation_endpoint
    assert revoke.form == [("token", REFRESH), ("token_type_hint", "refresh_token"),
                           ("client_id", "cli")]
    unhinted = oidc.revocation_request(META, client_id="cli", token=REFRESH)
    assert "token_type_hint" not in dict(unhinted.form)
    info = oidc.userinfo_request(META, ACCESS)
    assert (info.method, info.url, info.form) == ("GET", META.userinfo_endpoint, [])
    assert info.headers == {"Authorization": f"Bearer {ACCESS}"}
    assert ACCESS not in repr(info) and REFRESH not in repr(revoke)
    bare = oidc.ProviderMetadata(issuer=ISSUER, token_endpoint=f"{ISSUER}/t")
    with pytest.raises(oidc.MalformedResponse, match="revocation"):
        oidc.revocation_request(bare, client_id="cli", token=REFRESH)
    with pytest.raises(oidc.MalformedResponse, match="userinfo"):
        oidc.userinfo_request(bare, ACCESS)


# --------------------------------------------------------------- token responses


@pytest.mark.parametrize(
    ("headers", "raw", "expires_in"),
    [
        (JSON, body(access_token="a", expires_in=60), 60.0),
        (JSON, body(access_token="a", expires_in=59.5), 59.5),
        (JSON, body(access_token="a", expires_in="60"), 60.0),
        (JSON, body(access_token="a", expires_in=" 60 "), 60.0),
        (JSON, body(access_token="a"), None),
        (JSON, body(access_token="a", expires_in=None), None),
        (JSON, body(access_token="a", expires_in="soon"), None),
        (JSON, body(access_token="a", expires_in=-5), None),
        (JSON, body(access_token="a", expires_in=True), None),
        (JSON, body(access_token="a", expires_in="NaN"), None),
        (FORM, b"access_token=a&expires_in=30&token_type=bearer", 30.0),
        ({"content-type": "text/plain"}, b"access_token=a&expires_in=30", 30.0),
        ({}, body(access_token="a", expires_in=10), 10.0),
    ],
)
def test_token_responses_are_parsed_tolerantly(
    headers: dict[str, str], raw: bytes, expires_in: float | None
) -> None:
    parsed = oidc.parse_token_response(200, headers, raw, 1000.0)
    assert parsed.access_token == "a" and parsed.expires_in == expires_in
    assert parsed.received_at == 1000.0
    assert parsed.expires_at == 1000.0 + (expires_in or oidc.DEFAULT_LIFETIME)


@pytest.mark.parametrize(
    ("stated", "normalised"),
    [("bearer", "Bearer"), ("BEARER", "Bearer"), ("Bearer", "Bearer"), (None, "Bearer"),
     ("DPoP", "DPoP")],
)
def test_token_type_is_case_insensitive(stated: str | None, normalised: str) -> None:
    raw = body(access_token="a", token_type=stated)
    assert oidc.parse_token_response(200, JSON, raw, 0.0).token_type == normalised


def test_token_response_optional_fields() -> None:
    full = oidc.parse_token_response(200, JSON, body(
        access_token=ACCESS, refresh_token=REFRESH, id_token="h.p.s", scope="openid  email",
    ), 0.0)
    assert (full.refresh_token, full.id_token, full.scope) == (REFRESH, "h.p.s",
                                                               ["openid", "email"])
    listed = oidc.parse_token_response(200, JSON, body(access_token="a", scope=["x", "y"],
                                                       refresh_token=""), 0.0)
    assert listed.scope == ["x", "y"] and listed.refresh_token is None
    odd = oidc.parse_token_response(200, JSON, body(access_token="a", scope=5, id_token=7), 0.0)
    assert odd.scope is None and odd.id_token is None


def test_granted_scopes_keep_only_rfc6749_scope_tokens() -> None:
    """RFC 6749 3.3: a scope-token is printable ASCII without space, quote or backslash.
    Anything else is provider text (escape sequences, bidi overrides) no request names."""
    hostile = "openid\t\x1b[2J email\u202etxt x\x7fy https://api.example/read a\\b \"q\" \x9b"
    for scope in (hostile, hostile.split()):
        parsed = oidc.parse_token_response(200, JSON, body(access_token="a", scope=scope), 0.0)
        assert parsed.scope is not None
        assert "openid" in parsed.scope and "https://api.example/read" in parsed.scope
        assert all(token.isascii() and token.isprintable() and " " not in token
                   and "\\" not in token and '"' not in token for token in parsed.scope)


def test_refresh_without_refresh_token_keeps_the_old_one() -> None:
    kept = oidc.parse_refresh_response(200, JSON, body(access_token="a"), 0.0,
                                       refresh_token=REFRESH)
    assert kept.refresh_token == REFRESH
    rotated = oidc.parse_refresh_response(200, JSON, body(access_token="a", refresh_token="new"),
                                          0.0, refresh_token=REFRESH)
    assert rotated.refresh_token == "new"


def test_oauth_errors_carry_code_description_and_status() -> None:
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.parse_token_response(400, JSON, body(error="invalid_grant",
                                                  error_description="Grant expired"), 0.0)
    assert (caught.value.error, caught.value.description, caught.value.status) == (
        "invalid_grant", "Grant expired", 400)
    assert str(caught.value) == "invalid_grant: Grant expired"
    with pytest.raises(oidc.OAuthError) as form_error:
        oidc.parse_token_response(400, FORM, b"error=invalid_scope", 0.0)
    assert form_error.value.error == "invalid_scope" and form_error.value.description is None


def test_an_error_on_http_200_is_still_an_error() -> None:
    # GitHub answers device-flow polls and bad codes with 200 and a form-encoded error.
    raw = b"error=bad_verification_code&error_description=The+code+is+incorrect"
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.parse_token_response(200, FORM, raw, 0.0)
    assert caught.value.error == "bad_verification_code"
    assert caught.value.description == "The code is incorrect"


def test_a_bearer_challenge_is_an_oauth_error() -> None:
    headers = {"www-authenticate": 'Bearer realm="x", error="invalid_token", '
                                   'error_description="The access token expired"'}
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.parse_userinfo(401, headers, b"", 0.0)
    assert (caught.value.error, caught.value.status) == ("invalid_token", 401)
    assert caught.value.description == "The access token expired"


@pytest.mark.parametrize(
    ("status", "headers", "raw", "match"),
    [
        (400, {}, b"", "HTTP 400 without an OAuth error"),
        (401, JSON, body(message="nope"), "HTTP 401 without an OAuth error"),
        (403, {"content-type": "text/html"}, b"<h1>Forbidden</h1>", "HTTP 403"),
        (302, {"location": "https://x.test/login?session=abc"}, b"", "redirect"),
        (101, {}, b"", "HTTP 101"),
        (200, JSON, b'{"access_token": "a"', "not JSON"),
        (200, JSON, b'["access_token"]', "not a JSON object"),
        (200, JSON, body(token_type="bearer"), "no access_token"),
        (200, JSON, body(access_token=5), "no access_token"),
        (200, {"content-type": "text/html"}, b"<html>login</html>", "not JSON"),
        (200, JSON, b"[" * 100_000, "not JSON"),
    ],
)
def test_malformed_answers(status: int, headers: dict[str, str], raw: bytes, match: str) -> None:
    with pytest.raises(oidc.MalformedResponse, match=match):
        oidc.parse_token_response(status, headers, raw, 0.0)


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        (500, {}, None),
        (502, {"content-type": "text/html"}, None),
        (503, {"retry-after": "120"}, 120.0),
        (429, {"retry-after": "7"}, 7.0),
        (429, {"retry-after": "1.5"}, 1.5),
        (429, {"retry-after": "-3"}, None),
        (429, {"retry-after": "soon"}, None),
        # An HTTP-date is measured against the provider's own Date header when present...
        (429, {"retry-after": "Thu, 01 Jan 1970 00:10:00 GMT",
               "date": "Thu, 01 Jan 1970 00:09:30 GMT"}, 30.0),
        # ... else against local now (1000 s, i.e. 00:16:40), and never negative.
        (429, {"retry-after": "Thu, 01 Jan 1970 00:17:00 GMT"}, 20.0),
        (429, {"retry-after": "Thu, 01 Jan 1970 00:10:00 GMT"}, 0.0),
    ],
)
def test_5xx_and_429_are_transient_with_retry_after(
    status: int, headers: dict[str, str], retry_after: float | None
) -> None:
    with pytest.raises(oidc.TransientProviderError) as caught:
        oidc.parse_token_response(status, headers, body(access_token=ACCESS), 1000.0)
    assert caught.value.status == status and caught.value.retry_after == retry_after


def test_retry_after_seconds() -> None:
    assert oidc.retry_after_seconds(None, 0.0) is None
    assert oidc.retry_after_seconds("", 0.0) is None
    assert oidc.retry_after_seconds(" 30 ", 0.0) == 30.0
    assert oidc.retry_after_seconds("inf", 0.0) is None
    assert oidc.retry_after_seconds("Thu, 01 Jan 1970 00:01:00 GMT", 0.0) == 60.0


# ------------------------------------------------------------------ device flow


def test_device_authorization_is_parsed_tolerantly() -> None:
    parsed = oidc.parse_device_authorization(200, JSON, body(
        device_code="dc-secret-0123456789", user_code="WDJB-MJHT",
        verification_uri="https://auth.example.test/device",
        verification_uri_complete="https://auth.example.test/device?user_code=WDJB-MJHT",
        expires_in="1800", interval=7,
    ), 0.0)
    assert (parsed.user_code, parsed.expires_in, parsed.interval) == ("WDJB-MJHT", 1800.0, 7.0)
    assert "dc-secret" not in repr(parsed) and "WDJB-MJHT" in repr(parsed)
    assert "dc-secret" not in repr(parsed.__rich_repr__())
    google = oidc.parse_device_authorization(200, JSON, body(
        device_code="d", user_code="U", verification_url="https://www.google.com/device",
    ), 0.0)
    assert google.verification_uri == "https://www.google.com/device"
    assert (google.expires_in, google.interval) == (oidc.DEFAULT_DEVICE_LIFETIME,
                                                    oidc.DEFAULT_DEVICE_INTERVAL)
    with pytest.raises(oidc.MalformedResponse, match="device_code"):
        oidc.parse_device_authorization(200, JSON, body(user_code="U"), 0.0)
    with pytest.raises(oidc.OAuthError, match="unauthorized_client"):
        oidc.parse_device_authorization(400, JSON, body(error="unauthorized_client"), 0.0)


@pytest.mark.parametrize(
    ("status", "headers", "raw"),
    [
        (400, JSON, body(error="authorization_pending")),
        (200, FORM, b"error=authorization_pending&error_description=pending"),
    ],
)
def test_device_poll_pending(status: int, headers: dict[str, str], raw: bytes) -> None:
    assert oidc.parse_device_poll(status, headers, raw, 0.0) == oidc.DevicePending()


def test_device_poll_slow_down_adds_five_seconds_or_takes_the_providers_interval() -> None:
    plain = oidc.parse_device_poll(400, JSON, body(error="slow_down"), 0.0)
    assert plain == oidc.DeviceSlowDown(None)
    assert isinstance(plain, oidc.DeviceSlowDown) and plain.next_interval(5.0) == 10.0
    github = oidc.parse_device_poll(200, FORM, b"error=slow_down&interval=15", 0.0)
    assert isinstance(github, oidc.DeviceSlowDown) and github.next_interval(5.0) == 15.0
    assert github.next_interval(12.0) == 17.0


@pytest.mark.parametrize("code", ["expired_token", "access_denied", "invalid_client"])
def test_device_poll_terminal_errors_raise_with_their_code(code: str) -> None:
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.parse_device_poll(400, JSON, body(error=code), 0.0)
    assert caught.value.error == code


def test_device_poll_success_and_transient() -> None:
    done = oidc.parse_device_poll(200, JSON, body(access_token=ACCESS, expires_in=60), 5.0)
    assert isinstance(done, oidc.TokenResponse) and done.expires_at == 65.0
    with pytest.raises(oidc.TransientProviderError):
        oidc.parse_device_poll(503, {}, b"", 0.0)


# ------------------------------------------------------------ revocation, userinfo


def test_revocation_responses() -> None:
    oidc.parse_revocation_response(200, {}, b"", 0.0)
    oidc.parse_revocation_response(204, {}, b"", 0.0)
    with pytest.raises(oidc.OAuthError, match="unsupported_token_type"):
        oidc.parse_revocation_response(400, JSON, body(error="unsupported_token_type"), 0.0)
    with pytest.raises(oidc.TransientProviderError) as caught:
        oidc.parse_revocation_response(503, {"retry-after": "9"}, b"", 0.0)
    assert caught.value.retry_after == 9.0


def test_userinfo_json_jwt_and_subject_check() -> None:
    claims = oidc.parse_userinfo(200, JSON, body(sub="u1", email="a@b.test"), 0.0, subject="u1")
    assert claims == {"sub": "u1", "email": "a@b.test"}
    signed = jwt({"sub": "u1", "name": "Ann"}).encode()
    assert oidc.parse_userinfo(200, {"content-type": "application/jwt"}, signed, 0.0)["name"] \
        == "Ann"
    with pytest.raises(oidc.MalformedResponse, match="another subject"):
        oidc.parse_userinfo(200, JSON, body(sub="u2"), 0.0, subject="u1")
    with pytest.raises(oidc.MalformedResponse, match="readable JWT"):
        oidc.parse_userinfo(200, {"content-type": "application/jwt"}, b"garbage", 0.0)


# ---------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("status", "headers", "raw"),
    [
        (400, JSON, body(error="invalid_grant", error_description=f"refresh token {REFRESH} "
                         "is revoked", refresh_token=REFRESH)),
        (400, JSON, body(error=f"invalid_{REFRESH}", access_token=ACCESS)),
        (400, JSON, body(error="invalid_grant", error_description=f"Bearer {ACCESS}\n\x1b[2J")),
        (400, JSON, body(error="x", error_description="y" * 5000 + ACCESS)),
        (400, JSON, body(message=ACCESS)),
        (401, {"www-authenticate": f'Bearer error="invalid_token", error_description="{ACCESS}"'},
         b""),
        (200, JSON, body(refresh_token=REFRESH, token=ACCESS)),
        (200, JSON, ('{"access_token": "' + ACCESS + '"').encode()),
        (200, FORM, f"error=denied&error_description={REFRESH}".encode()),
        (302, {"location": f"https://x.test/?code={ACCESS}"}, body(access_token=ACCESS)),
        (500, JSON, body(access_token=ACCESS, refresh_token=REFRESH)),
        (429, {"retry-after": ACCESS}, body(access_token=ACCESS)),
    ],
)
def test_failures_never_show_a_token_or_the_body(
    status: int, headers: dict[str, str], raw: bytes
) -> None:
    with pytest.raises(oidc.OAuthFailure) as caught:
        oidc.parse_refresh_response(status, headers, raw, 0.0, refresh_token=REFRESH)
    shown = f"{caught.value} {caught.value!r} {vars(caught.value)} {caught.value.args}"
    for secret in (ACCESS, REFRESH, ACCESS[3:], REFRESH[3:], "\x1b"):
        assert secret not in shown
    assert len(str(caught.value)) < 500


def test_oauth_error_descriptions_stay_readable() -> None:
    error = oidc.OAuthError("invalid_authorization_details",
                            "The refresh token has expired; please sign in again", 400)
    assert str(error) == ("invalid_authorization_details: "
                          "The refresh token has expired; please sign in again")


def test_token_structs_redact_their_secrets() -> None:
    response = oidc.TokenResponse(access_token=ACCESS, refresh_token=REFRESH, id_token="i.d.t",
                                  scope=["openid"], expires_in=60.0)
    for shown in (repr(response), str(response), repr(response.__rich_repr__()),
                  f"{[response]}"):
        assert ACCESS not in shown and REFRESH not in shown and "i.d.t" not in shown
    assert "expires_in=60.0" in repr(response) and "openid" in repr(response)


# ------------------------------------------------------------------------ ID token


def test_decode_jwt_claims() -> None:
    assert oidc.decode_jwt_claims(jwt({"sub": "u", "exp": 5})) == {"sub": "u", "exp": 5}
    assert oidc.decode_jwt_claims("e30.eyJleHAiOiAxMDAwfQ.sig") == {"exp": 1000}
    for junk in ("opaque", "a.b", "a..c", "a.!!!!.c", "a.W10.c", "a.b.c.d.e",
                 f"x.{base64.urlsafe_b64encode(b'not json').decode()}.y"):
        assert oidc.decode_jwt_claims(junk) == {}


CLAIMS: dict[str, object] = {"iss": ISSUER, "aud": "cli", "exp": 2000, "sub": "u1",
                             "nonce": "n-1"}


def test_valid_id_token_claims_pass() -> None:
    oidc.validate_id_token_claims(CLAIMS, issuer=ISSUER, client_id="cli", now=1000, nonce="n-1")
    oidc.validate_id_token_claims({**CLAIMS, "aud": ["cli", "api"], "azp": "cli"},
                                  issuer=ISSUER, client_id="cli", now=1000)
    oidc.validate_id_token_claims({**CLAIMS, "aud": ["cli"]}, issuer=ISSUER + "/",
                                  client_id="cli", now=1000)
    # Within the leeway a slightly expired token is accepted (clock skew).
    oidc.validate_id_token_claims(CLAIMS, issuer=ISSUER, client_id="cli", now=2100, leeway=300)


@pytest.mark.parametrize(
    ("change", "nonce", "now", "match"),
    [
        ({"iss": "https://evil.test"}, None, 1000, "another issuer"),
        ({"iss": None}, None, 1000, "another issuer"),
        ({"iss": 5}, None, 1000, "another issuer"),
        ({"aud": "someone-else"}, None, 1000, "not for this client"),
        ({"aud": ["api", "other"]}, None, 1000, "not for this client"),
        ({"aud": None}, None, 1000, "not for this client"),
        ({"aud": ["cli", "api"]}, None, 1000, "azp"),
        ({"azp": "other"}, None, 1000, "azp"),
        ({"exp": None}, None, 1000, "no exp"),
        ({"exp": "tomorrow"}, None, 1000, "no exp"),
        ({}, None, 2301, "expired; check your system clock"),
        ({}, "n-2", 1000, "nonce"),
        ({"nonce": None}, "n-1", 1000, "nonce"),
        ({"nonce": 1}, "n-1", 1000, "nonce"),
    ],
)
def test_bad_id_token_claims_are_refused(
    change: dict[str, object], nonce: str | None, now: float, match: str
) -> None:
    claims = {k: v for k, v in {**CLAIMS, **change}.items() if v is not None}
    with pytest.raises(oidc.MalformedResponse, match=match):
        oidc.validate_id_token_claims(claims, issuer=ISSUER, client_id="cli", now=now,
                                      nonce=nonce, leeway=300)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sub": "mallory"}, "another subject"),
        ({"sub": None}, "another subject"),
        ({"iss": "https://evil.example.test"}, "another issuer"),
        ({"aud": "someone-else"}, "not for this client"),
        ({"azp": "someone-else"}, "another party"),
    ],
)
def test_a_refresh_id_token_must_name_the_logins_issuer_client_and_subject(
    change: dict[str, object], match: str
) -> None:
    """OIDC Core 12.2: the same iss, sub and aud as the login's ID token."""
    claims = {k: v for k, v in {**CLAIMS, **change}.items() if v is not None}
    with pytest.raises(oidc.MalformedResponse, match=match):
        oidc.validate_refresh_id_token(jwt(claims), issuer=ISSUER, client_id="cli",
                                       subject=str(CLAIMS["sub"]))


def test_a_refresh_id_token_needs_no_nonce_and_is_not_judged_by_its_expiry() -> None:
    """OIDC Core 12.2: a refresh's ID token need not carry the login's nonce; an expired
    one (a clock that drifted since the login) still says who it is about."""
    claims = {k: v for k, v in CLAIMS.items() if k != "nonce"}
    oidc.validate_refresh_id_token(jwt({**claims, "exp": 1}), issuer=ISSUER, client_id="cli",
                                   subject=str(CLAIMS["sub"]))
    oidc.validate_refresh_id_token(jwt(claims), issuer=ISSUER, client_id="cli", subject=None)


def test_unreadable_id_token_is_refused() -> None:
    with pytest.raises(oidc.MalformedResponse, match="readable JWT"):
        oidc.validate_id_token_claims(oidc.decode_jwt_claims("opaque"), issuer=ISSUER,
                                      client_id="cli", now=0)


@pytest.mark.parametrize(
    ("claims", "account"),
    [
        ({"email": "a@b.test", "preferred_username": "ann", "name": "Ann", "sub": "1"},
         "a@b.test"),
        ({"email": "", "preferred_username": "ann", "name": "Ann", "sub": "1"}, "ann"),
        ({"name": "Ann", "sub": "1"}, "Ann"),
        ({"sub": "1", "email": 5}, "1"),
        ({}, None),
    ],
)
def test_account_from_claims(claims: dict[str, object], account: str | None) -> None:
    assert oidc.account_from_claims(claims) == account


# ------------------------------------------------------------------ expiry, skew


def test_expiry_falls_back_to_the_jwt_then_a_default() -> None:
    token = jwt({"exp": 1000})
    assert oidc.access_token_expiry(100.0, 60, token) == 160.0
    assert oidc.access_token_expiry(100.0, None, token) == 1000.0
    assert oidc.access_token_expiry(100.0, 0, token) == 1000.0
    assert oidc.access_token_expiry(100.0, None, "opaque") == 100.0 + oidc.DEFAULT_LIFETIME
    # A JWT exp already past (or a clock far off) is not trusted: the default applies.
    assert oidc.access_token_expiry(5000.0, None, token) == 5000.0 + oidc.DEFAULT_LIFETIME
    assert oidc.access_token_expiry(100.0, None, jwt({"exp": "x"})) == 400.0


def test_clock_skew_from_a_date_header() -> None:
    assert oidc.clock_skew("Thu, 01 Jan 1970 00:02:00 GMT", 60.0) == 60.0
    assert oidc.clock_skew("Thu, 01 Jan 1970 00:00:30 GMT", 60.0) == -30.0
    assert oidc.clock_skew("Thu, 01 Jan 1970 00:02:00 -0000", 60.0) == 60.0
    assert oidc.clock_skew("garbage", 60.0) is None
    assert oidc.clock_skew("", 60.0) is None
    assert oidc.clock_skew(None, 60.0) is None


# -------------------------------------------------------------- loopback callback


def test_loopback_redirect_uri_uses_the_ipv4_literal() -> None:
    assert oidc.loopback_redirect_uri(53682) == "http://127.0.0.1:53682/callback"
    for port in (0, -1, 65536):
        with pytest.raises(ValueError, match="port"):
            oidc.loopback_redirect_uri(port)


def test_callback_with_the_right_state_gives_the_code() -> None:
    assert oidc.parse_callback("?code=c1&state=s1", "s1") == "c1"
    assert oidc.parse_callback({"code": "c1", "state": "s1"}, "s1") == "c1"
    assert oidc.parse_callback(f"code=c1&state=s1&iss={ISSUER}", "s1", issuer=ISSUER) == "c1"


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("code=c1&state=wrong", "state"),
        ("code=c1", "state"),
        ("code=c1&state=", "state"),
        ("error=access_denied&state=wrong", "state"),  # a forged error cannot end the login
        ("state=s1", "no code"),
        ("state=s1&code=", "no code"),
        ("code=c1&state=s1&state=s2", "repeats"),
        ("code=c1&code=c2&state=s1", "repeats"),
    ],
)
def test_callbacks_that_do_not_belong_to_the_login_are_refused(query: str, match: str) -> None:
    with pytest.raises(oidc.CallbackError, match=match) as caught:
        oidc.parse_callback(query, "s1")
    assert "c1" not in str(caught.value)


def test_callback_error_becomes_an_oauth_error() -> None:
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.parse_callback("error=access_denied&error_description=User+said+no&state=s1", "s1")
    assert (caught.value.error, caught.value.description, caught.value.status) == (
        "access_denied", "User said no", None)


def test_callback_issuer_rfc9207() -> None:
    with pytest.raises(oidc.CallbackError, match="another issuer"):
        oidc.parse_callback("code=c&state=s&iss=https://evil.test", "s", issuer=ISSUER)
    with pytest.raises(oidc.CallbackError, match="another issuer"):
        oidc.parse_callback("code=c&state=s", "s", issuer=ISSUER, issuer_required=True)
    assert oidc.parse_callback("code=c&state=s", "s", issuer=ISSUER) == "c"


# ------------------------------------------------------------------------ the tree


def test_every_failure_is_an_oauth_failure_and_all_is_the_public_api() -> None:
    for kind in (oidc.OAuthError, oidc.TransientProviderError, oidc.MalformedResponse,
                 oidc.CallbackError, oidc.ProviderUnreachable):
        assert issubclass(kind, oidc.OAuthFailure)
    public = {name for name in vars(oidc) if not name.startswith("_")
              and getattr(getattr(oidc, name), "__module__", None) == oidc.__name__}
    assert public <= set(oidc.__all__)
    assert all(hasattr(oidc, name) for name in oidc.__all__)
    unreachable = oidc.ProviderUnreachable("timed out", "auth.example.test")
    assert str(unreachable) == "auth.example.test: timed out"
    assert (unreachable.host, unreachable.reason) == ("auth.example.test", "timed out")
