"""A small protected resource that takes only DPoP-bound tokens (RFC 9449 section 7).

It checks each request as a real API would, with code that is not the agent's:
the proof with joserfc (``dpop_verifier.py``: signature, ``typ``, ``htm``,
``htu``, ``iat``, ``ath``, a ``jti`` never seen before, the nonce when it
demands one), then the access token at the provider's introspection endpoint
(RFC 7662): active, ``token_type`` DPoP, and ``cnf.jkt`` equal to the
thumbprint of the key that signed the proof (section 6). Anything else is
answered 401 with a ``DPoP`` challenge naming the error; a demanded nonce
(section 9) is answered 401 ``use_dpop_nonce`` with a ``DPoP-Nonce`` header.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from support.dpop_verifier import DpopVerifier, ProofRejected


@dataclass
class Outcome:
    status: int
    reason: str


@dataclass
class ResourceServer:
    """Serves ``GET /me`` on 127.0.0.1; :attr:`outcomes` records each answer and why."""

    introspection_endpoint: str
    client_id: str
    require_nonce: bool = False
    #: Refuse the first token that is otherwise good (an API that has just learnt it was
    #: revoked): the client must report it as rejected and come back with a new one.
    reject_first_token: bool = False
    refused_tokens: set[str] = field(default_factory=set)
    verifier: DpopVerifier = field(default_factory=DpopVerifier)
    outcomes: list[Outcome] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        if self.require_nonce:
            self.verifier.nonce = secrets.token_urlsafe(16)

    def check(self, method: str, authorization: str | None,
              proof: str | None) -> tuple[int, dict[str, str], dict[str, object]]:
        """The answer to one request: status, headers, JSON body."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "DPoP" or not token or not proof:
            return self._refuse("invalid_token", "no DPoP token and proof")
        try:
            verified = self.verifier.verify(proof, method, self.url + "/me", access_token=token)
        except ProofRejected as exc:
            return self._refuse(exc.error, str(exc))
        answer = httpx.post(self.introspection_endpoint,
                            data={"token": token, "client_id": self.client_id}, timeout=10)
        claims = answer.json()
        if not claims.get("active"):
            return self._refuse("invalid_token", "token not active")
        if claims.get("token_type") != "DPoP":
            return self._refuse("invalid_token", f"token_type {claims.get('token_type')}")
        cnf = claims.get("cnf")
        if not isinstance(cnf, dict) or cnf.get("jkt") != verified.thumbprint:
            return self._refuse("invalid_token", "cnf.jkt does not match the proof's key")
        if self.reject_first_token and (not self.refused_tokens or token in self.refused_tokens):
            self.refused_tokens.add(token)
            return self._refuse("invalid_token", "token refused as revoked")
        self.outcomes.append(Outcome(200, "ok"))
        return 200, {}, {"sub": claims.get("sub"), "jkt": verified.thumbprint}

    def _refuse(self, error: str, reason: str) -> tuple[int, dict[str, str], dict[str, object]]:
        self.outcomes.append(Outcome(401, reason))
        headers = {"WWW-Authenticate": f'DPoP algs="ES256 EdDSA Ed25519", error="{error}"'}
        if error == "use_dpop_nonce" and self.verifier.nonce is not None:
            headers["DPoP-Nonce"] = self.verifier.nonce
        return 401, headers, {"error": error}


@contextmanager
def serving(resource: ResourceServer) -> Iterator[ResourceServer]:
    """Run ``resource`` on a free port until the block ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self._answer("POST")

        def _answer(self, method: str) -> None:
            status, headers, body = resource.check(
                method, self.headers.get("Authorization"), self.headers.get("DPoP"))
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    resource.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield resource
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
