"""A DPoP proof verifier for the tests (RFC 9449 section 4.3), independent of the agent.

It checks proofs with joserfc (a JOSE library with its own JWS, JWK and
thumbprint code), never with ``compozy_agent.dpop``: a proof the agent signs
is accepted only if someone else's implementation of the standard accepts it.
The resource server of the integration tests (``resource_server.py``) uses it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

#: RFC 9449 section 11.1: a proof is accepted for this many seconds around now.
IAT_WINDOW = 60.0
ALGORITHMS = ["ES256", "EdDSA", "Ed25519"]


class ProofRejected(Exception):
    """The proof does not satisfy section 4.3; ``error`` is the WWW-Authenticate code."""

    def __init__(self, reason: str, error: str = "invalid_dpop_proof") -> None:
        super().__init__(reason)
        self.error = error


@dataclass
class VerifiedProof:
    thumbprint: str
    jti: str
    claims: dict[str, object]


def _b64url_json(part: str) -> dict[str, object]:
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    if not isinstance(value, dict):
        raise ProofRejected("not a JSON object")
    return value


def _htu(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))


def access_token_hash(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


@dataclass
class DpopVerifier:
    """Checks proofs as a resource server would: signature, typ, claims, ath, replay."""

    now: Callable[[], float] = time.time
    #: The nonce this server demands (section 9), or None.
    nonce: str | None = None
    seen_jti: set[str] = field(default_factory=set)

    def verify(self, proof: str, method: str, url: str,
               access_token: str | None = None) -> VerifiedProof:
        parts = proof.split(".")
        if len(parts) != 3:
            raise ProofRejected("not a compact JWS")
        header = _b64url_json(parts[0])
        if header.get("typ") != "dpop+jwt":
            raise ProofRejected("typ is not dpop+jwt")
        if header.get("alg") not in ALGORITHMS:
            raise ProofRejected("unsupported alg")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or "d" in jwk:
            raise ProofRejected("no public jwk in the header")
        try:
            key = JWKRegistry.import_key(jwk)
            with warnings.catch_warnings():  # joserfc warns that RFC 9864 deprecates "EdDSA"
                warnings.simplefilter("ignore")
                verified = jws.deserialize_compact(proof, key, algorithms=[str(header["alg"])])
        except (JoseError, ValueError) as exc:
            raise ProofRejected(f"signature does not verify ({type(exc).__name__})") from None
        claims = json.loads(verified.payload)
        if claims.get("htm") != method:
            raise ProofRejected("htm mismatch")
        if not isinstance(claims.get("htu"), str) or _htu(claims["htu"]) != _htu(url):
            raise ProofRejected("htu mismatch")
        iat = claims.get("iat")
        if not isinstance(iat, int) or abs(self.now() - iat) > IAT_WINDOW:
            raise ProofRejected("iat outside the window")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise ProofRejected("no jti")
        if access_token is not None and claims.get("ath") != access_token_hash(access_token):
            raise ProofRejected("ath does not match the access token")
        if self.nonce is not None and claims.get("nonce") != self.nonce:
            raise ProofRejected("nonce required", error="use_dpop_nonce")
        if jti in self.seen_jti:
            raise ProofRejected("jti reused (replay)")
        self.seen_jti.add(jti)
        return VerifiedProof(thumbprint=key.thumbprint(), jti=jti, claims=claims)
