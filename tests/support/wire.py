"""One request to an agent over its socket, as a tool in another language would send it."""

from __future__ import annotations

import json
import socket
from typing import Any


def ask(path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one JSON line to the socket at ``path``; the one response line, decoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, "the agent closed the connection"
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer
