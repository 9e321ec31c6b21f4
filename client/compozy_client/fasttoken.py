"""`compozy auth token` in the common case, importing almost nothing.

A token helper runs before every command a person or script sends, so this
path imports no argparse, typing, msgspec, YAML, ``socket`` (its wrapper pulls
in enum and selectors) or ``json`` (which pulls in ``re``): it talks through
``_socket``, writes the request by hand and reads the token from the agent's
known response shape. It handles only the plain success: an agent answering
with a token. Anything else (an unusual flag, a config file holding a key or
not to be trusted, no agent, a socket that is not provably our agent's, an
error, a response in another shape) returns None and the full CLI does the
work again, with its messages. The socket checks of
:mod:`compozy_client.peercheck` run here too, before a byte is sent.
"""

from __future__ import annotations

import _socket
import os

from compozy_client.paths import (
    MAX_CONFIG_BYTES,
    config_file_problem,
    config_path,
    open_config_file,
    socket_path,
)
from compozy_client.peercheck import peer_problem, socket_path_problem

# msgspec writes the struct's fields in order, so a token response starts so.
_TOKEN_PREFIX = b'{"id":1,"ok":true,"result":{"access_token":"'

_VALUE_FLAGS = {"--profile": "profile", "--audience": "audience", "--min-valid": "min_valid"}


def run(args: list[str]) -> int | None:
    """Print a token and return 0, or None when the full CLI must take over."""
    request = _parse(args)
    if request is None:
        return None
    # Before the environment's key too: the full CLI and get_token refuse an
    # untrusted config file whatever else is set, and warn about a readable key.
    if _config_needs_full_cli():
        return None
    key = os.environ.get("FLYZT_API_KEY", "").strip()
    if key:
        os.write(1, key.encode() + b"\n")
        return 0
    if "profile" not in request:
        request["profile"] = os.environ.get("COMPOZY_PROFILE", "").strip() or "default"
    answer = _ask_agent(request)
    if answer is None:
        return None
    if isinstance(answer, tuple):  # the agent said no: report it rather than ask again
        message, command = answer
        os.write(2, f"error: {message}\n".encode())
        if command:
            os.write(2, f"  run: {command}\n".encode())
        return 1
    os.write(1, answer.encode() + b"\n")
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


def _config_needs_full_cli() -> bool:
    """True when the config file may hold a key, is not to be trusted, or cannot be read.

    The full CLI then uses the key, or refuses the file and says why.
    """
    path = config_path()
    try:
        with open(open_config_file(path), "rb") as file:
            if config_file_problem(path, os.fstat(file.fileno())) is not None:
                return True
            text = file.read(MAX_CONFIG_BYTES + 1)
            return len(text) > MAX_CONFIG_BYTES or b"api_key" in text
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _json_string(value: str) -> str | None:
    """``value`` as a JSON string, or None when it needs escapes (left to the full CLI)."""
    if '"' in value or "\\" in value or not value.isprintable():
        return None
    return f'"{value}"'


def _encode(request: dict[str, object]) -> bytes | None:
    parts = ['"id":1', '"op":"token"']
    for key, value in request.items():
        if isinstance(value, float):
            parts.append(f'"{key}":{value!r}')
            continue
        items = value if isinstance(value, list) else [value]
        encoded = [_json_string(str(item)) for item in items]
        if None in encoded:
            return None
        text = ",".join(e for e in encoded if e is not None)
        parts.append(f'"{key}":[{text}]' if isinstance(value, list) else f'"{key}":{text}')
    return ("{" + ",".join(parts) + "}\n").encode()


def _ask_agent(request: dict[str, object]) -> str | tuple[str, str] | None:
    """The token; or (message, command) for an error response; or None to fall back."""
    line = _encode(request)
    if line is None:
        return None
    path = socket_path()
    if socket_path_problem(path) is not None:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(30.0)
        sock.connect(path)
        if peer_problem(sock, path) is not None:
            return None
        sock.sendall(line)
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
    response = buffer.partition(b"\n")[0]
    if response.startswith(_TOKEN_PREFIX):
        token, quote, _ = response[len(_TOKEN_PREFIX):].partition(b'"')
        if quote and b"\\" not in token and token:
            return token.decode()
    return _token_from_json(response)


def _token_from_json(response: bytes) -> str | tuple[str, str] | None:
    """The general case: any valid response, success or error."""
    import json

    try:
        document = json.loads(response)
        if document.get("ok") is True:
            token = document["result"]["access_token"]
            return token if isinstance(token, str) and token else None
        error = document["error"]
        details = error.get("details") or {}
        return str(error["message"]), str(details.get("command", ""))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # the full CLI reads it again and says what is wrong
