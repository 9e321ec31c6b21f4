"""A socket standing in for the agent, for client tests: each request line gets the answer
a function gives for it. Only the client's side of the protocol is under test there."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def answering_socket(path: str, answer: Callable[[dict[str, Any]], bytes]) -> Iterator[str]:
    """Listen on ``path``; every request on every connection gets ``answer(request)``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                for line in conn.makefile("rb"):
                    conn.sendall(answer(json.loads(line)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        # Wake the accept() first and let the thread end before the descriptor is freed:
        # closed under a thread about to accept, its number could be reused by a later
        # test's listener (the git server's), whose connections this thread would take.
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=10)
        server.close()
