"""The second real provider (django-oauth-toolkit) does what the agent's DOT tests rely on,
and shows the differences from node oidc-provider that issue 12 is about.

Over plain httpx, without the agent: its two discovery documents, the browser flow
completed by the person helper, the device flow on its own client, refresh-token
rotation, revocation seen at userinfo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from support.dot_provider import (
    CLIENT_ID,
    DEVICE_CLIENT_ID,
    DotProvider,
    approve_device,
    complete_browser_login,
    deny_device,
)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REDIRECT_URI = "http://127.0.0.1:45678/callback"


def claims_of(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def browser_tokens(provider: DotProvider, scope: str = "openid profile compozy:read",
                   login: str = "alice") -> dict[str, Any]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    url = provider.authorization_endpoint + "?" + urlencode({
        "response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT_URI,
        "scope": scope, "state": state, "code_challenge": challenge,
        "code_challenge_method": "S256", "nonce": "n-0S6_WzA2Mj"})
    callback = parse_qs(urlsplit(complete_browser_login(url, login)).query)
    assert callback["state"] == [state]
    response = httpx.post(provider.token_endpoint, timeout=30.0, data={
        "grant_type": "authorization_code", "code": callback["code"][0],
        "redirect_uri": REDIRECT_URI, "client_id": CLIENT_ID, "code_verifier": verifier})
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def test_dot_discovery_is_sparse_in_both_documents(dot_provider: DotProvider) -> None:
    oidc = httpx.get(dot_provider.url("/.well-known/openid-configuration"), timeout=30).json()
    rfc8414 = httpx.get(f"{dot_provider.root}/.well-known/oauth-authorization-server/o",
                        timeout=30).json()
    assert oidc["issuer"] == rfc8414["issuer"] == dot_provider.issuer
    assert "revocation_endpoint" not in oidc
    assert "device_authorization_endpoint" not in oidc
    assert rfc8414["revocation_endpoint"] == dot_provider.revocation_endpoint
    assert "device_authorization_endpoint" not in rfc8414
    assert DEVICE_GRANT in rfc8414["grant_types_supported"]
    assert "userinfo_endpoint" not in rfc8414


def test_dot_browser_login_refresh_rotation_and_revocation(dot_provider: DotProvider) -> None:
    tokens = browser_tokens(dot_provider)
    assert claims_of(tokens["id_token"])["iss"] == dot_provider.issuer
    assert dot_provider.userinfo_status(tokens["access_token"]) == 200
    refreshed = httpx.post(dot_provider.token_endpoint, timeout=30, data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": CLIENT_ID}).json()
    assert refreshed["refresh_token"] != tokens["refresh_token"]  # ROTATE_REFRESH_TOKEN
    assert not dot_provider.refresh_works(tokens["refresh_token"])
    revoked = httpx.post(dot_provider.revocation_endpoint, timeout=30, data={
        "token": refreshed["refresh_token"], "token_type_hint": "refresh_token",
        "client_id": CLIENT_ID})
    assert revoked.status_code == 200
    # Revoking a refresh token also revokes its access token at DOT.
    assert dot_provider.userinfo_status(refreshed["access_token"]) == 401
    assert not dot_provider.refresh_works(refreshed["refresh_token"])
    assert dot_provider.count("revocation", status=200) >= 1


def test_dot_device_flow_on_its_own_client(dot_provider: DotProvider) -> None:
    started = httpx.post(dot_provider.device_authorization_endpoint, timeout=30, data={
        "client_id": DEVICE_CLIENT_ID, "scope": "openid profile compozy:read"}).json()
    # RFC 8628 differences: no hyphen, 0-9A-V, no verification_uri_complete.
    assert "verification_uri_complete" not in started
    assert len(started["user_code"]) == 8 and "-" not in started["user_code"]

    def poll() -> httpx.Response:
        return httpx.post(dot_provider.token_endpoint, timeout=30, data={
            "grant_type": DEVICE_GRANT, "device_code": started["device_code"],
            "client_id": DEVICE_CLIENT_ID})

    assert poll().json()["error"] == "authorization_pending"
    approve_device(started["verification_uri"], started["user_code"], login="bob")
    tokens = poll().json()
    assert "access_token" in tokens and "refresh_token" in tokens
    assert "id_token" not in tokens  # the device grant answers without an ID token
    userinfo = httpx.get(dot_provider.userinfo_endpoint, timeout=30, headers={
        "Authorization": f"Bearer {tokens['access_token']}"}).json()
    assert set(userinfo) == {"sub"}  # stock DOT: only the subject, no name or email

    unknown = httpx.post(dot_provider.token_endpoint, timeout=30, data={
        "grant_type": DEVICE_GRANT, "device_code": "not-a-device-code",
        "client_id": DEVICE_CLIENT_ID})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "device_not_found")


def test_dot_device_code_lowercase_is_refused_and_deny_works(dot_provider: DotProvider) -> None:
    started = httpx.post(dot_provider.device_authorization_endpoint, timeout=30, data={
        "client_id": DEVICE_CLIENT_ID, "scope": "openid"}).json()
    code = started["user_code"]
    if code.lower() != code:  # an all-digit code has no lower case
        with pytest.raises(AssertionError, match="did not succeed"):
            approve_device(started["verification_uri"], code.lower())
    deny_device(started["verification_uri"], code)
    denied = httpx.post(dot_provider.token_endpoint, timeout=30, data={
        "grant_type": DEVICE_GRANT, "device_code": started["device_code"],
        "client_id": DEVICE_CLIENT_ID}).json()
    assert denied["error"] == "access_denied"


def test_the_browser_client_cannot_take_the_device_grant(dot_provider: DotProvider) -> None:
    started = httpx.post(dot_provider.device_authorization_endpoint, timeout=30, data={
        "client_id": CLIENT_ID, "scope": "openid"})
    assert started.status_code == 200  # DOT hands out the codes...
    approve_device(started.json()["verification_uri"], started.json()["user_code"])
    polled = httpx.post(dot_provider.token_endpoint, timeout=30, data={
        "grant_type": DEVICE_GRANT, "device_code": started.json()["device_code"],
        "client_id": CLIENT_ID})
    assert polled.status_code >= 400  # ...but refuses the grant to that client
    assert polled.json()["error"] in ("unauthorized_client", "invalid_client")
