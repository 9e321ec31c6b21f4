"""A local API stand-in that checks bearer tokens, for the HTTP client adapters' tests.

``BearerServer`` listens on a loopback address (127.0.0.1 unless told
another) in a thread per connection, and answers every request 200 when its
policy accepts the request's bearer token, else 401 with
``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750 section 3.1).
``/redirect?to=URL`` answers 302 to URL. It records what each request carried
(tokens are kept in memory for assertions, never printed).

``together=N`` holds the first N requests until all N have arrived, so they
are in flight at once: each carries whatever token its client had before any
of them was answered.

``RejectFirstToken`` is the policy of an API that has just learnt of a
revocation: the first token it ever sees is refused for good, and any other is
accepted when ``active(token)`` says so (the test provider's introspection).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx


@dataclass(frozen=True)
class Seen:
    """One request the server answered."""

    method: str
    path: str
    token: str | None
    body: bytes
    status: int


class BearerServer:
    """See the module docstring; use as a context manager."""

    def __init__(self, accepts: Callable[[str], bool], host: str = "127.0.0.1",
                 together: int = 0, hold_timeout: float = 60.0) -> None:
        self.accepts = accepts
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._together = together
        self._hold_timeout = hold_timeout
        self._arrived = 0
        self._all_arrived = threading.Condition(self._lock)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real API
            # Headers and body go out in two writes: without TCP_NODELAY the body waits
            # for the client's delayed ACK (40 ms a request).
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass  # nothing on stderr (a request line could carry anything)

            def do_GET(self) -> None:
                owner._answer(self)

            def do_POST(self) -> None:
                owner._answer(self)

            def do_PUT(self) -> None:
                owner._answer(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # 50 clients connect at once

        self._server = Server((host, 0), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        # A short poll interval: shutdown() waits for the loop to notice it.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    def __enter__(self) -> BearerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def tokens(self) -> list[str | None]:
        """The token each request carried, in the order they arrived."""
        with self._lock:
            return [seen.token for seen in self.seen]

    def statuses(self) -> list[int]:
        with self._lock:
            return [seen.status for seen in self.seen]

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        with self._all_arrived:
            self._arrived += 1
            if self._arrived <= self._together:
                self._all_arrived.notify_all()
                if not self._all_arrived.wait_for(lambda: self._arrived >= self._together,
                                                  self._hold_timeout):
                    raise TimeoutError(f"only {self._arrived} of {self._together} requests "
                                       f"arrived within {self._hold_timeout:.0f} s")
        target = urlsplit(handler.path)
        authorization = handler.headers.get("Authorization", "")
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else None
        if target.path == "/redirect":
            status = 302
        else:
            status = 200 if token is not None and self.accepts(token) else 401
        with self._lock:
            self.seen.append(Seen(handler.command, target.path, token, body, status))
        payload = b"ok\n" if status == 200 else b""
        handler.send_response(status)
        if status == 302:
            handler.send_header("Location", parse_qs(target.query)["to"][0])
        if status == 401:
            handler.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, sized or chunked (RFC 9112 section 7.1)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


class RejectFirstToken:
    """Refuse the first token seen, forever; accept others that ``active`` says are active."""

    def __init__(self, active: Callable[[str], bool]) -> None:
        self._active = active
        self._lock = threading.Lock()
        self._first: str | None = None
        self._verdicts: dict[str, bool] = {}

    def __call__(self, token: str) -> bool:
        with self._lock:
            if self._first is None:
                self._first = token
            if token == self._first:
                return False
            known = self._verdicts.get(token)
        if known is None:
            known = self._active(token)
            with self._lock:
                self._verdicts[token] = known
        return known


def introspector(endpoint: str, client_id: str) -> Callable[[str], bool]:
    """Whether the provider holds a token active (RFC 7662), asked at ``endpoint``."""
    def active(token: str) -> bool:
        answer = httpx.post(endpoint, data={"client_id": client_id, "token": token}, timeout=10)
        answer.raise_for_status()
        return bool(answer.json()["active"])

    return active


def chunks(*parts: bytes) -> Iterator[bytes]:
    """A body that can be read once (a generator): sent chunked."""
    yield from parts
