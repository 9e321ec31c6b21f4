"""Sans-I/O OAuth messages: standard vectors, strict checks, tolerant parsing, redaction."""

from __future__ import annotations

import pytest

from compozy_agent import oidc

ISSUER = "https://auth.example.test"
META = oidc.ProviderMetadata(
    issuer=ISSUER,
    token_endpoint=f"{ISSUER}/token",
    authorization_endpoint=f"{ISSUER}/authorize",
    revocation_endpoint=f"{ISSUER}/revoke",
)


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert oidc.pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    pkce = oidc.new_pkce()
    assert 43 <= len(pkce.verifier) <= 128 and pkce.verifier not in repr(pkce)


def test_discovery_urls_follow_oidc_then_rfc8414_path_insertion() -> None:
    assert oidc.discovery_urls("https://a.test/tenant1") == [
        "https://a.test/tenant1/.well-known/openid-configuration",
        "https://a.test/.well-known/oauth-authorization-server/tenant1",
    ]


def test_discovery_refuses_another_issuer_and_plain_http() -> None:
    body = b'{"issuer": "https://evil.test", "token_endpoint": "https://evil.test/t"}'
    with pytest.raises(oidc.MalformedResponse, match="RFC 8414"):
        oidc.parse_discovery(ISSUER, body)
    body = b'{"issuer": "%s", "token_endpoint": "http://auth.example.test/t"}' % ISSUER.encode()
    with pytest.raises(oidc.MalformedResponse, match="non-HTTPS"):
        oidc.parse_discovery(ISSUER, body)
    oidc.check_endpoint_url("http://127.0.0.1:8080/token")  # loopback is fine


def test_authorization_url_carries_pkce_state_and_resources() -> None:
    url = oidc.authorization_url(
        META,
        client_id="cli",
        redirect_uri="http://127.0.0.1:5/callback",
        scopes=["openid", "offline_access"],
        state="st",
        pkce=oidc.Pkce("v", "ch"),
        resources=["https://api.test"],
    )
    assert "code_challenge=ch&code_challenge_method=S256" in url
    assert "state=st" in url and "prompt=consent" in url
    assert "resource=https%3A%2F%2Fapi.test" in url


@pytest.mark.parametrize(
    ("headers", "body", "expires_in"),
    [
        ({"content-type": "application/json"}, b'{"access_token":"a","expires_in":"60"}', 60.0),
        ({"content-type": "application/json"}, b'{"access_token":"a"}', None),
        (
            {"content-type": "application/x-www-form-urlencoded"},
            b"access_token=a&expires_in=30",
            30.0,
        ),
    ],
)
def test_token_responses_are_parsed_tolerantly(
    headers: dict[str, str], body: bytes, expires_in: float | None
) -> None:
    parsed = oidc.parse_token_response(200, headers, body, 0.0)
    assert parsed.access_token == "a" and parsed.expires_in == expires_in


def test_errors_are_classified_and_never_quote_the_body() -> None:
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.parse_token_response(400, {}, b'{"error":"invalid_grant","x":"rt-SECRET"}', 0.0)
    assert caught.value.error == "invalid_grant" and "rt-SECRET" not in str(caught.value)
    with pytest.raises(oidc.TransientProviderError) as transient:
        oidc.parse_token_response(429, {"retry-after": "7"}, b"", 0.0)
    assert transient.value.retry_after == 7.0
    with pytest.raises(oidc.MalformedResponse):
        oidc.parse_token_response(200, {}, b'{"access_token": "rt-SECRET"', 0.0)


def test_expiry_falls_back_to_the_jwt_then_a_default() -> None:
    jwt = "e30.eyJleHAiOiAxMDAwfQ.sig"  # {"exp": 1000}
    assert oidc.access_token_expiry(100.0, 60, jwt) == 160.0
    assert oidc.access_token_expiry(100.0, None, jwt) == 1000.0
    assert oidc.access_token_expiry(100.0, None, "opaque") == 100.0 + oidc.DEFAULT_LIFETIME


def test_id_token_claims_are_checked() -> None:
    claims = {"iss": ISSUER, "aud": ["cli", "other"], "exp": 2000, "email": "a@b.test"}
    oidc.validate_id_token_claims(claims, issuer=ISSUER, client_id="cli", now=1000)
    with pytest.raises(oidc.MalformedResponse, match="another issuer"):
        oidc.validate_id_token_claims(
            {**claims, "iss": "x"}, issuer=ISSUER, client_id="cli", now=1000
        )
    with pytest.raises(oidc.MalformedResponse, match="not for this client"):
        oidc.validate_id_token_claims(claims, issuer=ISSUER, client_id="nope", now=1000)
    with pytest.raises(oidc.MalformedResponse, match="clock"):
        oidc.validate_id_token_claims(claims, issuer=ISSUER, client_id="cli", now=9000)
    assert oidc.account_from_claims(claims) == "a@b.test"


def test_requests_never_show_their_secrets() -> None:
    request = oidc.refresh_request(
        META, client_id="cli", refresh_token="rt-SECRET", scopes=["a"], resource="https://api.test"
    )
    assert ("scope", "a") in request.form and ("resource", "https://api.test") in request.form
    assert "rt-SECRET" not in repr(request)
    response = oidc.TokenResponse(access_token="at-SECRET", refresh_token="rt-SECRET")
    assert "SECRET" not in repr(response)


def test_clock_skew_from_a_date_header() -> None:
    assert oidc.clock_skew("Thu, 01 Jan 1970 00:02:00 GMT", 60.0) == 60.0
    assert oidc.clock_skew("garbage", 60.0) is None
