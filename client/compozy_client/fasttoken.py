"""`compozy auth token` in the common case, with nothing but os, socket and json.

A token helper runs before every command a person or script sends, so this
path imports no argparse, msgspec, YAML or the rest of the client. It handles
only the plain success: an agent that answers with a token. Anything else
(an unusual flag, a config file holding a key, no agent, an error response)
returns None and the full CLI does the work again, with its messages.
"""

from __future__ import annotations

import os
import socket

from compozy_client.paths import config_path, socket_path

_VALUE_FLAGS = {"--profile": "profile", "--audience": "audience", "--min-valid": "min_valid"}


def run(args: list[str]) -> int | None:
    """Print a token and return 0, or None when the full CLI must take over."""
    request = _parse(args)
    if request is None:
        return None
    key = os.environ.get("FLYZT_API_KEY", "").strip()
    if key:
        os.write(1, key.encode() + b"\n")
        return 0
    if _config_may_hold_key():
        return None
    if "profile" not in request:
        request["profile"] = os.environ.get("COMPOZY_PROFILE", "").strip() or "default"
    token = _ask_agent(request)
    if token is None:
        return None
    os.write(1, token.encode() + b"\n")
    return 0


def _parse(args: list[str]) -> dict[str, object] | None:
    request: dict[str, object] = {}
    scopes: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        name, eq, inline = arg.partition("=")
        if name in _VALUE_FLAGS or name == "--scope":
            if eq:
                value = inline
            elif index + 1 < len(args):
                index += 1
                value = args[index]
            else:
                return None
            if name == "--scope":
                scopes.extend(value.replace(",", " ").split())
            elif name == "--min-valid":
                try:
                    request["min_valid"] = float(value)
                except ValueError:
                    return None
            else:
                request[_VALUE_FLAGS[name]] = value
        else:
            return None
        index += 1
    if scopes:
        request["scope"] = scopes
    return request


def _config_may_hold_key() -> bool:
    try:
        with open(config_path(), "rb") as file:
            return b"api_key" in file.read()
    except OSError:
        return False


def _ask_agent(request: dict[str, object]) -> str | None:
    import json

    request["id"] = 1
    request["op"] = "token"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30.0)
        sock.connect(socket_path())
        sock.sendall(json.dumps(request).encode() + b"\n")
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buffer += chunk
    except OSError:
        return None
    finally:
        sock.close()
    try:
        response = json.loads(buffer.partition(b"\n")[0])
        token = response["result"]["access_token"] if response.get("ok") is True else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return token if isinstance(token, str) and token else None
