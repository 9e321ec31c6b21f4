"""Small servers standing in for the APIs other tools talk to: a Kubernetes API server
(HTTPS, bearer tokens) and a container registry (Docker registry v2, basic auth).

Each accepts only a token the test OpenID provider says is active (its
introspection endpoint, RFC 7662), as a real resource server would, and counts
what it accepted and refused. Tokens are never stored, only counted, and a
digest kept to tell tokens apart (the canary check looks for tokens in files
and output).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from support.provider import OidcTestProvider


@dataclass
class Seen:
    """What a stand-in saw: accepted and refused requests, and digests of accepted tokens."""

    accepted: int = 0
    refused: int = 0
    #: (path, scheme of the Authorization header or "") of each refused request.
    refusals: list[tuple[str, str]] = field(default_factory=list)
    usernames: set[str] = field(default_factory=set)
    token_digests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def active_at_provider(provider: OidcTestProvider, token: str) -> bool:
    """Whether the provider's introspection endpoint says ``token`` is an active access
    token (a refresh token is refused: only access tokens may reach an API)."""
    answer = httpx.post(provider.introspection_endpoint,
                        data={"client_id": provider.client_id, "token": token}, timeout=30)
    document = answer.json()
    return document.get("active") is True and document.get("token_type", "Bearer") != \
        "refresh_token"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files), made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test reports what matters

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _credential(self) -> tuple[str, str] | None:
        """(username or "", token) from the Authorization header."""
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            return "", value.strip()
        if scheme.lower() == "basic" and value:
            try:
                user, colon, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return None
            return (user, password) if colon else None
        return None

    def _authorized(self) -> bool:
        credential = self._credential()
        seen = self.server.seen
        if credential is not None and active_at_provider(self.server.provider, credential[1]):
            with seen.lock:
                seen.accepted += 1
                seen.usernames.add(credential[0])
                seen.token_digests.append(_digest(credential[1]))
            return True
        with seen.lock:
            seen.refused += 1
            seen.refusals.append((self.path, self.headers.get("Authorization", "").split(" ")[0]))
        return False

    def do_GET(self) -> None:
        status, body, headers = self.server.answer(self)
        self._send(status, body, headers)

    def do_HEAD(self) -> None:
        self.do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, provider: OidcTestProvider) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.provider = provider
        self.seen = Seen()

    def answer(self, request: _Handler) -> tuple[int, bytes, dict[str, str]]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class KubeApiStandIn(_Server):
    """``GET /api`` as a Kubernetes API server answers it, for an active bearer token."""

    #: The certificate it serves (its own CA), once served over TLS.
    certificate: Path | None = None

    def answer(self, request: _Handler) -> tuple[int, bytes, dict[str, str]]:
        json_type = {"Content-Type": "application/json"}
        if request.path.split("?")[0] == "/version":
            # Public on a real API server (system:public-info-viewer); Debian's kubectl
            # dispatcher asks it, without credentials, to pick a kubectl version.
            return 200, json.dumps({"major": "1", "minor": "32", "gitVersion": "v1.32.4"}) \
                .encode(), json_type
        if not request._authorized():
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
            return 401, json.dumps(status).encode(), json_type
        if request.path.split("?")[0] != "/api":
            return 404, b'{"kind":"Status","code":404}', json_type
        versions = {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]}
        return 200, json.dumps(versions).encode(), json_type


#: One image: its config blob and manifest (Docker image manifest v2, schema 2).
_IMAGE_CONFIG = json.dumps({
    "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
    "config": {"Labels": {"stand-in": "yes"}}, "rootfs": {"type": "layers", "diff_ids": []},
}).encode()
_CONFIG_DIGEST = "sha256:" + hashlib.sha256(_IMAGE_CONFIG).hexdigest()
_MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
               "size": len(_IMAGE_CONFIG), "digest": _CONFIG_DIGEST},
    "layers": [],
}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(_MANIFEST).hexdigest()


class RegistryStandIn(_Server):
    """Just enough of the Docker registry v2 API for ``skopeo inspect`` of one image
    (``REPOSITORY:TAG``), behind HTTP basic auth whose password must be an active token."""

    REPOSITORY = "team/app"
    TAG = "1.0"

    def answer(self, request: _Handler) -> tuple[int, bytes, dict[str, str]]:
        common = {"Docker-Distribution-API-Version": "registry/2.0",
                  "Content-Type": "application/json"}
        if not request._authorized():
            return 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication '\
                        b'required"}]}', {**common,
                                          "WWW-Authenticate": 'Basic realm="stand-in"'}
        path = request.path.split("?")[0]
        prefix = f"/v2/{self.REPOSITORY}"
        if path == "/v2/":
            return 200, b"{}", common
        if path in (f"{prefix}/manifests/{self.TAG}", f"{prefix}/manifests/{MANIFEST_DIGEST}"):
            return 200, _MANIFEST, {
                **common, "Docker-Content-Digest": MANIFEST_DIGEST,
                "Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}
        if path == f"{prefix}/blobs/{_CONFIG_DIGEST}":
            return 200, _IMAGE_CONFIG, {**common, "Docker-Content-Digest": _CONFIG_DIGEST,
                                        "Content-Type": "application/octet-stream"}
        if path == f"{prefix}/tags/list":
            return 200, json.dumps({"name": self.REPOSITORY, "tags": [self.TAG]}).encode(), \
                common
        return 404, b'{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}', common


@contextlib.contextmanager
def serving(server: _Server, tls: tuple[Path, Path] | None = None) -> Iterator[_Server]:
    """Serve ``server`` in a thread (over TLS with ``(certificate, key)``) until the block ends."""
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
