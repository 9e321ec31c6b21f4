"""A git smart-HTTP server on 127.0.0.1 that lets in only tokens the test provider holds active.

``git http-backend`` (Debian ``git``) serves the repositories as a CGI behind a
small ``http.server``; before it runs, the request's token (HTTP Basic
password, or a ``Bearer`` credential) is checked at the provider's RFC 7662
introspection endpoint, as an API would. :meth:`GitServer.refuse` makes it
refuse one token from then on while the provider still holds it active: what an
API does once it learns of a revocation (revoking the token at the node
provider would revoke its whole grant, refresh token included).

Tokens stay in memory here: the agent_env fixture's canary check scans files
and output for them.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from support.real_parts import require_tools


class GitServer:
    def __init__(self, root: Path, introspection_endpoint: str, client_id: str) -> None:
        self.root = root
        self.introspection_endpoint = introspection_endpoint
        self.client_id = client_id
        self.lock = threading.Lock()
        #: Tokens let in, in order of their first use.
        self.accepted: list[str] = []
        self.refused: set[str] = set()
        #: (method, path, status, how it authenticated: "none", "basic", "bearer").
        self.requests: list[tuple[str, str, int, str]] = []
        self.http_backend = _http_backend()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def refuse(self, token: str) -> None:
        """From now on, answer 401 to ``token`` although the provider holds it active."""
        with self.lock:
            self.refused.add(token)

    def allows(self, token: str) -> bool:
        with self.lock:
            if token in self.refused:
                return False
        answer = httpx.post(self.introspection_endpoint,
                            data={"client_id": self.client_id, "token": token}, timeout=20)
        if answer.status_code != 200 or answer.json().get("active") is not True:
            return False
        with self.lock:
            if token not in self.accepted:
                self.accepted.append(token)
        return True

    def create_repository(self, name: str) -> Path:
        """A bare repository with one commit on main."""
        work = self.root / f"{name}-seed"
        git = ["git", "-c", "user.name=Seed", "-c", "user.email=seed@example.test",
               "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q", str(work)], check=True)
        (work / "README").write_text("seed\n")
        subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
        subprocess.run([*git, "-C", str(work), "commit", "-qm", "seed"], check=True)
        bare = self.root / f"{name}.git"
        subprocess.run([*git, "clone", "-q", "--bare", str(work), str(bare)], check=True)
        shutil.rmtree(work)
        return bare

    def serve(self) -> None:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _http_backend() -> str:
    (git,) = require_tools(("git",), "git", "for the git credential helper tests")
    exec_path = subprocess.run([git, "--exec-path"], capture_output=True, text=True,
                               check=True).stdout.strip()
    return str(Path(exec_path) / "git-http-backend")


def _handler(server: GitServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet; self.requests records what matters

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _credential(self) -> tuple[str, str, str] | None:
            """(how, user, token) from the Authorization header."""
            header = self.headers.get("Authorization", "")
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer" and value:
                return "bearer", "bearer", value.strip()
            if scheme.lower() == "basic" and value:
                with contextlib.suppress(ValueError):
                    user, _, password = base64.b64decode(value).decode().partition(":")
                    return "basic", user, password
            return None

        def _serve(self) -> None:
            body = self._body()
            path, _, query = self.path.partition("?")
            credential = self._credential()
            if credential is None or not server.allows(credential[2]):
                server.requests.append((self.command, path, 401,
                                        credential[0] if credential else "none"))
                message = b"authentication required\n"
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="compozy-test-git"')
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                self.wfile.write(message)
                return
            how, user, _ = credential
            env = {
                "PATH": "/usr/bin:/bin",
                "GIT_PROJECT_ROOT": str(server.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GIT_CONFIG_NOSYSTEM": "1",
                "HOME": str(server.root),
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": user or "git",  # lets receive-pack (push) in
                "REMOTE_ADDR": "127.0.0.1",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            cgi = subprocess.run([server.http_backend], input=body, env=env,
                                 capture_output=True, timeout=60, check=False)
            head, _, content = cgi.stdout.partition(b"\r\n\r\n")
            if not _:
                head, _, content = cgi.stdout.partition(b"\n\n")
            status = 200
            headers = []
            for line in head.decode("latin-1").splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            server.requests.append((self.command, path, status, how))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    return Handler


@contextlib.contextmanager
def git_server(root: Path, introspection_endpoint: str, client_id: str) -> Iterator[GitServer]:
    root.mkdir(parents=True, exist_ok=True)
    server = GitServer(root, introspection_endpoint, client_id)
    server.serve()
    try:
        yield server
    finally:
        server.close()
