"""`compozy auth token` in the common case, importing almost nothing.

A token helper runs before every command a person or script sends, so this
path imports no argparse, typing, msgspec, YAML, ``socket`` (its wrapper pulls
in enum and selectors) or ``json`` (which pulls in ``re``): it talks through
``_socket``, writes the request by hand and reads the token from the agent's
known response shape. Anything else before the request is sent (an unusual
flag, a config file holding a key or not to be trusted, a socket that is not
provably our agent's) returns None and the full CLI does the work, with its
messages, within what is left of the same time budget. The socket checks of
:mod:`compozy_client.peercheck` run here too, before a byte is sent.

This module holds only what a successful token request needs: where bytecode
is not cached (an editable install, ``PYTHONDONTWRITEBYTECODE=1``) every line
of it is compiled on every call (docs/performance.md, benchmark 1). The rare
turns are in modules imported only when taken: starting an agent when none
answers (:mod:`compozy_client.autostart`); flags, the agent's error answers, an
answer in another shape and a timeout (:mod:`compozy_client.fasttoken_rare`).

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

from compozy_client.paths import (
    MAX_CONFIG_BYTES,
    config_file_problem,
    config_path,
    open_config_file,
    socket_path,
)
from compozy_client.peercheck import peer_problem, socket_path_problem

#: msgspec writes the struct's fields in order, so a token response starts so
#: (the other light paths, compozy_client.gitcredential and helpertoken, read it too).
TOKEN_PREFIX = b'{"id":1,"ok":true,"result":{"access_token":"'

#: As compozy_client.connection.DEFAULT_TIMEOUT and TIMEOUT_ENV (not imported: cost).
_DEFAULT_BUDGET = 30.0
_TIMEOUT_ENV = "COMPOZY_TIMEOUT"
#: A token answer is a few KiB; anything longer is left to the full CLI, which bounds it too.
_MAX_ANSWER_BYTES = 1024 * 1024


class TimedOut(Exception):
    """The agent took the request and did not answer within the budget (``args[0]``: the
    seconds waited since it was sent)."""


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
    request: dict[str, object] | None = {}
    if args:
        from compozy_client.fasttoken_rare import parse_flags

        request = parse_flags(args)
    # Before the environment's key too: the full CLI and get_token refuse an
    # untrusted config file whatever else is set, and warn about a readable key.
    if request is None or light_config() is None:
        return None
    key = os.environ.get("FLYZT_API_KEY", "").strip()
    if key:
        os.write(1, key.encode() + b"\n")
        return 0
    request.setdefault("profile", os.environ.get("COMPOZY_PROFILE", "").strip() or "default")
    try:
        response = exchange(request, deadline)
    except TimedOut as timed_out:
        from compozy_client.fasttoken_rare import timed_out_error

        return timed_out_error(timed_out.args[0])
    if response is None:
        return None
    token, quote, _ = response.removeprefix(TOKEN_PREFIX).partition(b'"')
    if response.startswith(TOKEN_PREFIX) and quote and token and b"\\" not in token:
        os.write(1, token + b"\n")
        return 0
    from compozy_client.fasttoken_rare import answer  # an error answer, or another shape

    return answer(response)


def light_config() -> bytes | None:
    """The config file's bytes (empty when there is none) when no YAML is needed to use
    it: a file to be trusted, holding no key, whose exact bytes the full CLI validated
    (:mod:`compozy_client.configcheck`). None otherwise: the full CLI then uses the
    key, or refuses the file and says why, as every command does."""
    path = config_path()
    try:
        with open(open_config_file(path), "rb") as file:
            if config_file_problem(path, os.fstat(file.fileno())) is not None:
                return None
            text = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return b""  # nothing to check: configcheck is not even loaded
    except OSError:
        return None
    from compozy_client.configcheck import was_checked

    if len(text) > MAX_CONFIG_BYTES or b"api_key" in text or not was_checked(path, text):
        return None
    return text


def _encode(request: dict[str, object]) -> bytes | None:
    """The request as JSON without its closing brace, or None when a value needs escapes
    (left to the full CLI)."""
    line = '{"id":1,"op":"token"'
    for key, value in request.items():
        if isinstance(value, float):
            line += f',"{key}":{value!r}'
            continue
        items = [str(item) for item in value] if isinstance(value, list) else [str(value)]
        text = "".join(items)
        if '"' in text or "\\" in text or not text.isprintable():
            return None
        text = ",".join(f'"{item}"' for item in items)
        line += f',"{key}":[{text}]' if isinstance(value, list) else f',"{key}":{text}'
    return line.encode()


def exchange(request: dict[str, object], deadline: float) -> bytes | None:
    """Send one ``token`` request (a dict of plain strings, string lists and floats) to
    the agent and return its response line; None when nothing was sent or no
    answer came that the full CLI could not read better (it then redoes the work).

    The socket checks of :mod:`compozy_client.peercheck` run first. Raises
    TimedOut when the request was sent and no answer came by ``deadline``.
    """
    line = _encode(request)
    path = socket_path()
    if line is None or deadline <= time.monotonic() or socket_path_problem(path) is not None:
        return None
    try:
        sock = connect(path, deadline)
        if sock is None:
            # No agent listens: start one here rather than leave it to the full CLI
            # (loading it first would only delay the start).
            from compozy_client.autostart import connect_once_started

            sock = connect_once_started(path, deadline, connect)
    except OSError:
        return None
    if sock is None:
        return None  # the full CLI waits out what is left and says what went wrong
    sent_at = None
    try:
        # Again: the directory may have been created while an agent was starting.
        if socket_path_problem(path) is not None or peer_problem(sock, path) is not None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        sent_at = time.monotonic()
        # The agent answers this long before the caller gives up (its own ANSWER_MARGIN).
        sock.sendall(line + f',"timeout":{left!r}}}\n'.encode())
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
        raise TimedOut(time.monotonic() - sent_at) from None
    except OSError:
        return None
    finally:
        sock.close()
    return buffer.partition(b"\n")[0]


def connect(path: str, deadline: float) -> _socket.socket | None:
    """A socket connected to ``path``, or None when nothing listens there (no socket, or
    connection refused); raises ``OSError`` for anything else."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, min(deadline - time.monotonic(), 5.0)))
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    return sock
