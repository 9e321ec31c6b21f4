"""`compozy auth token` in the common case, importing almost nothing.

A token helper runs before every command a person or script sends, so this
path imports no argparse, typing, msgspec, YAML, ``socket`` (its wrapper pulls
in enum and selectors) or ``json`` (which pulls in ``re``): it talks through
``_socket``, writes the request by hand and reads the token from the agent's
known response shape. It handles the plain success (an agent answering with
a token) and the agent's error answers. Anything else before the request is
sent (an unusual flag, a config file holding a key or not to be trusted, no
agent, a socket that is not provably our agent's, a response in another shape)
returns None and the full CLI does the work, with its messages, within what is
left of the same time budget. The socket checks of
:mod:`compozy_client.peercheck` run here too, before a byte is sent.

Once the request is sent it is never sent again after a timeout: the agent
answers before the budget ends whenever it is only waiting for the provider
(it tells the caller how long it may wait), so a timeout means the agent itself
is stuck, and asking again would only double the wait. The fast path then says
so and exits 1.
"""

from __future__ import annotations

import _socket
import os
import time

from compozy_client.configcheck import was_checked
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
#: As compozy_client.connection.DEFAULT_TIMEOUT and TIMEOUT_ENV (not imported: cost).
_DEFAULT_BUDGET = 30.0
_TIMEOUT_ENV = "COMPOZY_TIMEOUT"


#: A token answer is a few KiB; anything longer is left to the full CLI, which bounds it too.
_MAX_ANSWER_BYTES = 1024 * 1024


class _TimedOut(Exception):
    """The agent took the request and did not answer within the budget."""


#: For the other light paths (compozy_client.gitcredential).
TimedOut = _TimedOut
TOKEN_PREFIX = _TOKEN_PREFIX


def budget() -> float:
    """The time budget in seconds, as compozy_client.connection.budget() computes it."""
    try:
        value = float(os.environ.get(_TIMEOUT_ENV, "") or _DEFAULT_BUDGET)
    except ValueError:
        return _DEFAULT_BUDGET
    return value if 0 < value < float("inf") else _DEFAULT_BUDGET


def run(args: list[str], deadline: float | None = None) -> int | None:
    """Print a token and return 0 (1 after an error answer or a timeout), or None when
    the full CLI must take over. ``deadline`` is the CLI's, on ``time.monotonic()``."""
    if deadline is None:
        deadline = time.monotonic() + budget()
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
    try:
        answer = _ask_agent(request, deadline)
    except _TimedOut as timed_out:
        waited = timed_out.args[0]
        os.write(2, (f"error: the agent took the request but did not answer within "
                     f"{waited:.0f} s; it was not asked again (it answers in time whenever it "
                     f"is only waiting for the provider, so it may be stuck)\n"
                     f"  see: compozy auth status\n").encode())
        return 1
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
    """True when the config file may hold a key, is not to be trusted, cannot be read,
    or is not the one the full CLI last validated (:mod:`compozy_client.configcheck`).

    The full CLI then uses the key, or refuses the file and says why, as every
    command does.
    """
    path = config_path()
    try:
        with open(open_config_file(path), "rb") as file:
            if config_file_problem(path, os.fstat(file.fileno())) is not None:
                return True
            text = file.read(MAX_CONFIG_BYTES + 1)
            return len(text) > MAX_CONFIG_BYTES or b"api_key" in text \
                or not was_checked(path, text)
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


def _ask_agent(request: dict[str, object], deadline: float) -> str | tuple[str, str] | None:
    """The token; or (message, command) for an error response; or None to fall back.

    Raises _TimedOut when the request was sent and no answer came by ``deadline``.
    """
    response = exchange(request, deadline)
    if response is None:
        return None
    if response.startswith(_TOKEN_PREFIX):
        token, quote, _ = response[len(_TOKEN_PREFIX):].partition(b'"')
        if quote and b"\\" not in token and token:
            return token.decode()
    return _token_from_json(response)


def exchange(request: dict[str, object], deadline: float) -> bytes | None:
    """Send one ``token`` request (a dict of plain strings, string lists and floats) to
    the agent and return its response line; None when nothing was sent or no
    answer came that the full CLI could not read better (it then redoes the work).

    The socket checks of :mod:`compozy_client.peercheck` run first. Raises
    _TimedOut when the request was sent and no answer came by ``deadline``.
    """
    if deadline <= time.monotonic() or _encode(request) is None:
        return None
    path = socket_path()
    if socket_path_problem(path) is not None:
        return None
    sent_at = None
    sock = _connect(path, deadline)
    if sock is None:
        return None
    try:
        # Again: the directory may have been created while an agent was starting.
        if socket_path_problem(path) is not None or peer_problem(sock, path) is not None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # The agent answers this long before the caller gives up (its own ANSWER_MARGIN).
        request["timeout"] = float(left)
        line = _encode(request)
        if line is None:
            return None
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sent_at = time.monotonic()
        sock.sendall(line)
        buffer = b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk or len(buffer) + len(chunk) > _MAX_ANSWER_BYTES:
                return None  # gone, or not an answer to a token request: the full CLI says
            buffer += chunk
    except TimeoutError:
        if sent_at is None:
            return None  # nothing was sent: the full CLI may try, within the same budget
        raise _TimedOut(time.monotonic() - sent_at) from None
    except OSError:
        return None
    finally:
        sock.close()
    return buffer.partition(b"\n")[0]


def _connect(path: str, deadline: float) -> _socket.socket | None:
    """A socket connected to ``path``; None when nothing answers there in time.

    When no agent listens and autostart is allowed, start one here rather than
    leave it to the full CLI: loading the full CLI first would only delay the
    start. The full CLI, if it must take over, waits for this agent instead of
    starting another (:func:`compozy_client.autostart.start_once`).
    """
    started_by = None
    delay = 0.005
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, min(deadline - time.monotonic(), 5.0)))
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except OSError:
            sock.close()
            return None
        if started_by is None:
            from compozy_client import autostart

            if not autostart.autostart_allowed():
                return None
            started_by = min(autostart.start_once(path) + autostart.AUTOSTART_TIMEOUT,
                             deadline)
        if time.monotonic() >= started_by:
            return None  # the full CLI waits out what is left and says what went wrong
        time.sleep(delay)
        # A failed connect costs microseconds; a coarse poll would add up to its
        # interval to every cold start (bench/cold_start.py).
        delay = min(delay * 2, 0.02)


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
