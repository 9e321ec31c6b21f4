"""DPoP keys and proofs (RFC 9449): the agent holds the key and signs, as ssh-agent does.

Rules:

* One key pair per session, made at login: ES256 (P-256), or EdDSA (Ed25519)
  when the provider lists it in ``dpop_signing_alg_values_supported``
  (:func:`choose_algorithm`). The private key never leaves the agent: it is
  kept in the secret store beside the session's refresh token
  (:meth:`DpopKey.to_secret`, :meth:`DpopKey.from_secret`), never in the state
  file, a log, an error or a response. ``repr`` shows the algorithm and the
  public key's thumbprint only.
* A proof (section 4.2) is a JWS with ``typ: dpop+jwt``, the public key as
  ``jwk``, and ``jti`` (128 random bits), ``htm``, ``htu`` (without query and
  fragment), ``iat``, and ``nonce`` / ``ath`` (the access token's SHA-256,
  section 4.3) when they apply. The key's thumbprint (RFC 7638) is what a
  provider puts in the token's ``cnf.jkt`` (section 6.1).
* Signatures are made by ``cryptography`` (OpenSSL); this module only lays out
  the JWS compact form around them (RFC 7515 section 7.1: three base64url
  parts, the signature over the first two), and turns ECDSA's DER signature
  into the fixed-width ``r || s`` that JWS wants (RFC 7518 section 3.4).

This module does no I/O and reads no clock: ``now`` is passed in. It is
imported only by an agent that has a DPoP session or login, so bearer-only
agents and every client never load ``cryptography`` for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from compozy_agent.oidc import valid_dpop_nonce as valid_nonce

__all__ = [
    "ALGORITHMS",
    "DpopKey",
    "DpopKeyError",
    "access_token_hash",
    "choose_algorithm",
    "normalize_htu",
    "valid_method",
    "valid_nonce",
]

Algorithm = Literal["ES256", "EdDSA", "Ed25519"]
#: The algorithms this agent signs with, in order of preference. Ed25519 (RFC 9864's
#: fully specified name) and EdDSA (RFC 8037, which RFC 9864 deprecates) are the same
#: signature; ES256 is what every DPoP server takes.
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("Ed25519", "EdDSA", "ES256")
#: The version of the secret-store form of a key.
_SECRET_VERSION: Final = 1
_P256_BYTES: Final = 32
#: RFC 9110 section 9.1: a method is a token; real ones are short.
_METHOD_CHARACTERS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_MAX_METHOD_LENGTH: Final = 32


class DpopKeyError(ValueError):
    """A stored key that cannot be read, or a proof that cannot be made; never quotes a key."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def access_token_hash(access_token: str) -> str:
    """``ath`` (RFC 9449 section 4.2): base64url SHA-256 of the token's ASCII."""
    return _b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def choose_algorithm(supported: list[str] | None) -> Algorithm | None:
    """The algorithm to sign with, given the provider's ``dpop_signing_alg_values_supported``.

    None when the provider lists none we sign with. A provider that lists
    nothing (the field is optional) gets ES256, the one every DPoP server
    implements in practice.
    """
    if not supported:
        return "ES256"
    for algorithm in ALGORITHMS:
        if algorithm in supported:
            return algorithm
    return None


def valid_method(method: str) -> bool:
    """Whether ``method`` is an HTTP method token (RFC 9110 section 9.1) of sane length."""
    return 0 < len(method) <= _MAX_METHOD_LENGTH and set(method) <= _METHOD_CHARACTERS


def normalize_htu(url: str) -> str:
    """``htu``: the target URI without query and fragment (RFC 9449 section 4.2).

    Raises DpopKeyError for anything but an absolute http(s) URL with a host.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise DpopKeyError("htu is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise DpopKeyError("htu must be an absolute http or https URL")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise DpopKeyError("htu must not contain spaces or control characters")
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path or "/", "", ""))


class DpopKey:
    """One session's DPoP key pair; signs proofs, shows only its public half."""

    __slots__ = ("_header", "_private", "algorithm", "public_jwk", "thumbprint")

    def __init__(self, private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
                 algorithm: Algorithm) -> None:
        self._private = private
        self.algorithm: Algorithm = algorithm
        if isinstance(private, ec.EllipticCurvePrivateKey):
            if algorithm != "ES256" or not isinstance(private.curve, ec.SECP256R1):
                raise DpopKeyError("an EC key signs ES256 on P-256 only")
            numbers = private.public_key().public_numbers()
            self.public_jwk: dict[str, str] = {
                "kty": "EC", "crv": "P-256",
                "x": _b64url(numbers.x.to_bytes(_P256_BYTES, "big")),
                "y": _b64url(numbers.y.to_bytes(_P256_BYTES, "big")),
            }
        else:
            if algorithm not in ("EdDSA", "Ed25519"):
                raise DpopKeyError("an Ed25519 key signs EdDSA or Ed25519 only")
            raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
            self.public_jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
        # RFC 7638 section 3: the required members only, sorted, no whitespace.
        self.thumbprint: str = _b64url(hashlib.sha256(_json(self.public_jwk)).digest())
        # Every proof's protected header is the same (section 4.2): encoded once.
        self._header = _b64url(_json({"typ": "dpop+jwt", "alg": algorithm,
                                      "jwk": self.public_jwk}))

    @classmethod
    def generate(cls, algorithm: Algorithm) -> DpopKey:
        """A new key pair for ``algorithm``."""
        if algorithm == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()), algorithm)
        return cls(ed25519.Ed25519PrivateKey.generate(), algorithm)

    def __repr__(self) -> str:
        return f"DpopKey({self.algorithm}, thumbprint={self.thumbprint})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a DPoP key is not pickled: it stays in the agent")

    @property
    def description(self) -> str:
        """What status shows: ``DPoP (ES256, key thumbprint ...)``."""
        return f"DPoP ({self.algorithm}, key thumbprint {self.thumbprint})"

    # ------------------------------------------------------------ the secret store

    def to_secret(self) -> str:
        """The private key as the secret store keeps it: a small JSON object, PKCS #8 inside."""
        der = self._private.private_bytes(serialization.Encoding.DER,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        return json.dumps({"v": _SECRET_VERSION, "alg": self.algorithm, "pkcs8": _b64url(der)})

    @classmethod
    def from_secret(cls, text: str) -> DpopKey:
        """The key :meth:`to_secret` wrote; DpopKeyError (without its contents) if it is not."""
        try:
            document = json.loads(text)
            algorithm = document["alg"]
            if document.get("v") != _SECRET_VERSION or algorithm not in ALGORITHMS:
                raise DpopKeyError("the stored DPoP key is of an unknown version or algorithm")
            private = serialization.load_der_private_key(_b64url_decode(document["pkcs8"]),
                                                         password=None)
        except DpopKeyError:
            raise
        except Exception:  # whatever the parser says may quote the key: say only what it is
            raise DpopKeyError("the stored DPoP key is not readable") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise DpopKeyError("the stored DPoP key is of an unsupported type")
        return cls(private, algorithm)

    # ------------------------------------------------------------ proofs

    def proof(self, method: str, url: str, now: float, *, nonce: str | None = None,
              access_token: str | None = None) -> str:
        """A DPoP proof JWT for one request (RFC 9449 section 4.2).

        ``url`` loses its query and fragment; ``access_token``, when given, is
        bound by its hash (``ath``, section 4.3); ``nonce`` is the server's
        (section 8, 9). Raises DpopKeyError for a method or URL that is not one.
        """
        if not valid_method(method):
            raise DpopKeyError("htm must be an HTTP method such as GET or POST")
        if nonce is not None and not valid_nonce(nonce):
            raise DpopKeyError("the DPoP nonce is not one (RFC 9449 section 8.1)")
        claims: dict[str, object] = {
            "jti": _b64url(secrets.token_bytes(16)),
            "htm": method,
            "htu": normalize_htu(url),
            "iat": int(now),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        signing_input = f"{self._header}.{_b64url(_json(claims))}".encode("ascii")
        return f"{signing_input.decode('ascii')}.{_b64url(self._sign(signing_input))}"

    def _sign(self, data: bytes) -> bytes:
        private = self._private
        if isinstance(private, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
            # RFC 7518 section 3.4: R and S as 32-byte big-endian integers, concatenated.
            return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
        return private.sign(data)
