"""Token binding at login (RFC 9449): which key a login signs with, and what it must get.

``token_binding`` in a profile's config decides: ``bearer`` (no key), ``dpop``
(a key, and DPoP-bound tokens or no login), ``auto`` (a key when the
provider's discovery lists ``dpop_signing_alg_values_supported``; a provider
that then issues bearer tokens anyway gets a bearer session, logged). The key
itself and its proofs are ``dpop.py``'s; the login flows are ``logins.py``'s.
Imported only for logins that are not plain bearer: ``cryptography`` is never
loaded for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from compozy_agent import oidc
from compozy_agent.backend import OpError
from compozy_agent.dpop import DpopKey, choose_algorithm
from compozy_client.errors import ErrorCode
from compozy_client.safetext import one_line

if TYPE_CHECKING:
    from compozy_agent.logins import Login

log = logging.getLogger("compozy_agent.dpop_binding")


def new_login_key(binding: str, metadata: oidc.ProviderMetadata, profile: str) -> DpopKey | None:
    """The key a login with ``token_binding: binding`` signs with, or None for bearer.

    ES256, or Ed25519 when the provider lists it. Raises OpError (config_error)
    for ``dpop`` with a provider that lists only algorithms this agent does not sign.
    """
    supported = metadata.dpop_signing_alg_values_supported
    if binding == "auto" and not supported:
        return None
    algorithm = choose_algorithm(supported)
    if algorithm is None:
        listed = one_line(", ".join(supported or []), 200)
        if binding == "auto":
            log.info("profile %s: the provider signs DPoP with %s only; using bearer tokens",
                     profile, listed)
            return None
        raise OpError(ErrorCode.CONFIG_ERROR,
                      f"profile {profile!r} asks for DPoP (token_binding: dpop), and the "
                      f"provider takes DPoP proofs signed with {listed} only (this agent "
                      "signs ES256 and Ed25519); set token_binding: bearer for it")
    return DpopKey.generate(algorithm)


def check_token_type(login: Login, token_type: str) -> str | None:
    """Why a login's tokens cannot be taken (their type is not what the binding asked
    for), or None. An ``auto`` login that got bearer tokens drops its key and goes on."""
    profile = login.profile
    if login.dpop_key is None:
        if token_type == "Bearer":
            return None
        return (f"the provider issued {token_type} tokens to a login that did not ask for "
                f"them; set token_binding: dpop for profile {profile!r} and log in again")
    if token_type == "DPoP":
        return None
    if login.token_binding == "auto":
        log.info("profile %s: the provider issued %s tokens despite the DPoP proof; the "
                 "session uses them as bearer tokens", profile, token_type)
        login.dpop_key = None
        return None
    return (f"the provider issued {token_type} tokens although the login sent a DPoP proof, "
            "so they are not bound to the agent's key (RFC 9449); refusing them rather than "
            f"use them unbound: set token_binding: bearer (or auto) for profile {profile!r}")


def dpop_resource_request(request: oidc.HttpRequest, key: DpopKey, access_token: str,
                          now: float) -> oidc.HttpRequest:
    """``request`` to a protected resource, sent with a DPoP-bound token (RFC 9449 section 7.1)."""
    headers = {**request.headers, "Authorization": f"DPoP {access_token}",
               "DPoP": key.proof(request.method, request.url, now, access_token=access_token)}
    return oidc.HttpRequest(method=request.method, url=request.url, headers=headers,
                            form=request.form)
