"""Calling an API with DPoP-bound tokens (RFC 9449), the key staying in the agent.

For a profile with ``token_binding: dpop`` each request carries
``Authorization: DPoP <access_token>`` and a fresh ``DPoP: <proof>`` that the
agent signs (op ``dpop_proof``, :func:`compozy_client.api.get_dpop_proof`).
:func:`call_with_dpop` does that around any HTTP client, and retries at most
once for each of the two answers that ask for it:

* a nonce challenge (section 9: 401 with ``WWW-Authenticate: DPoP
  error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header): a new proof carrying
  that nonce;
* any other 401: the token is handed back as ``rejected_token``, so the agent
  drops it and fetches a new one (at most one forced refresh every 5 s).

The HTTP adapters (httpx, requests) are built on these functions. This module
imports only the standard library and the client package: no crypto, the key
is never here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from compozy_client.protocol import DpopProofResult

__all__ = ["call_with_dpop", "nonce_challenge", "request_headers", "valid_nonce"]

_T = TypeVar("_T")
#: RFC 9449 section 8.1: nonce = 1*NQCHAR.
_NONCE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,1024}")
#: A DPoP challenge (section 7.1) among the WWW-Authenticate challenges, asking for a nonce.
_DPOP_SCHEME = re.compile(r"(?i)(?:^|,)\s*DPoP(?:\s|,|$)")
_NONCE_ERROR = re.compile(r'\berror\s*=\s*"?use_dpop_nonce"?')


def valid_nonce(nonce: str) -> bool:
    """Whether a ``DPoP-Nonce`` value is one (RFC 9449 section 8.1), at most 1 KiB."""
    return _NONCE.fullmatch(nonce) is not None


def request_headers(result: DpopProofResult) -> dict[str, str]:
    """The two headers of one request (RFC 9449 section 7.1)."""
    return {"Authorization": f"DPoP {result.access_token}", "DPoP": result.proof}


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def nonce_challenge(status: int, headers: Mapping[str, str]) -> str | None:
    """The nonce a resource server demands (RFC 9449 section 9: 401, a ``DPoP``
    challenge with ``error="use_dpop_nonce"``, and a valid ``DPoP-Nonce``), else None."""
    if status != 401:
        return None
    lowered = _lower(headers)
    nonce = lowered.get("dpop-nonce")
    challenge = lowered.get("www-authenticate", "")
    if nonce is None or not valid_nonce(nonce):
        return None
    if _DPOP_SCHEME.search(challenge) is None or _NONCE_ERROR.search(challenge) is None:
        return None
    return nonce


def call_with_dpop(
    method: str,
    url: str,
    send: Callable[[dict[str, str]], tuple[int, Mapping[str, str], _T]],
    *,
    profile: str | None = None,
    get_proof: Callable[..., DpopProofResult] | None = None,
) -> _T:
    """Send one request with a DPoP-bound token, retrying once on a nonce challenge
    and once on a 401 that rejects the token; the last answer is returned.

    ``send(headers)`` sends the request with those headers added and returns
    ``(status, response headers, answer)``. ``get_proof(method, url, profile,
    nonce=, rejected_token=)`` defaults to :func:`compozy_client.api.get_dpop_proof`.
    """
    if get_proof is None:
        from compozy_client.api import get_dpop_proof

        get_proof = get_dpop_proof
    nonce: str | None = None
    rejected: str | None = None
    nonce_retried = token_retried = False
    while True:
        proof = get_proof(method, url, profile, nonce=nonce, rejected_token=rejected)
        rejected = None
        status, headers, answer = send(request_headers(proof))
        demanded = nonce_challenge(status, headers)
        if demanded is not None and not nonce_retried:
            nonce, nonce_retried = demanded, True
            continue
        if status == 401 and demanded is None and not token_retried:
            rejected, token_retried = proof.access_token, True
            continue
        return answer
