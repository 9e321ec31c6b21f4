"""Tokens for the credential helpers other programs run: kubectl's exec plugin
(``compozy auth kube-token``) and ``docker-credential-compozy``.

Those programs run a helper before their own work, sometimes once per command,
so the common case here costs what ``compozy auth token``'s fast path costs
(:mod:`compozy_client.fasttoken`, whose request encoding and config check this
reuses): ``_socket``, a hand-written request, the agent's known answer shape
read by hand, here with the token's expiry as well. Anything unusual (no agent
yet, a config file holding a key or not to be trusted, a socket that is not
provably our agent's, an answer in another shape) goes to the full client
library, which starts the agent, refuses unsafe sockets and config files with
their own messages, and is never asked twice for one request.

Never interactive: nothing here starts a login, opens a browser or reads the
terminal. A session that needs a login is a :class:`Refusal` naming the
``compozy login`` to run. The socket checks of :mod:`compozy_client.peercheck`
run before a byte is sent, on both paths: a helper never talks to a socket
that another uid serves. A refresh token never reaches a helper: the agent
hands out access tokens only.
"""

from __future__ import annotations

import _socket
import os
import time

from compozy_client import fasttoken
from compozy_client.paths import socket_path
from compozy_client.peercheck import peer_problem, socket_path_problem

_EXPIRES_KEY = b'"expires_at":'


class Answer:
    """An access token (or API key, ``expires_at`` None) and when it expires (Unix time)."""

    __slots__ = ("expires_at", "token")

    def __init__(self, token: str, expires_at: float | None) -> None:
        self.token = token
        self.expires_at = expires_at

    def __repr__(self) -> str:  # the token is a secret
        return f"Answer(expires_at={self.expires_at!r}, token=<redacted>)"


class Refusal:
    """No token: the agent's error ``code`` (empty when no agent answered), its
    message, and the command that fixes it (``compozy login ...``) or ""."""

    __slots__ = ("code", "command", "message")

    def __init__(self, code: str, message: str, command: str = "") -> None:
        self.code = code
        self.message = message
        self.command = command

    def __repr__(self) -> str:
        return f"Refusal(code={self.code!r}, message={self.message!r}, command={self.command!r})"

    @property
    def needs_login(self) -> bool:
        return self.code in ("not_logged_in", "login_required")

    def line(self) -> str:
        """One line for a person: what is wrong and what to run."""
        from compozy_client.safetext import one_line  # agent messages quote provider text

        message = one_line(self.message, 1000)
        if self.command:
            return f"compozy: {message}; run: {one_line(self.command, 200)}"
        return f"compozy: {message}"


def get(
    profile: str | None,
    audience: str | None = None,
    min_valid: float = 0.0,
    rejected_token: str | None = None,
    deadline: float | None = None,
) -> Answer | Refusal:
    """A token of ``profile`` (default: ``$COMPOZY_PROFILE`` or ``default``) valid for
    ``min_valid`` seconds, or why not. ``rejected_token`` is one a server refused."""
    if deadline is None:
        deadline = time.monotonic() + fasttoken.budget()
    profile = profile or os.environ.get("COMPOZY_PROFILE", "").strip() or "default"
    if not fasttoken._config_needs_full_cli():
        key = os.environ.get("FLYZT_API_KEY", "").strip()
        if key:
            return Answer(key, None)
        request: dict[str, object] = {"profile": profile, "min_valid": float(min_valid)}
        if audience:
            request["audience"] = audience
        if rejected_token:
            request["rejected_token"] = rejected_token
        try:
            answer = _ask_agent(request, deadline)
        except fasttoken._TimedOut as timed_out:
            return Refusal("", f"the agent took the request but did not answer within "
                               f"{timed_out.args[0]:.0f} s; it was not asked again",
                           "compozy auth status")
        if answer is not None:
            return answer
    return _get_full(profile, audience, min_valid, rejected_token, deadline)


def _ask_agent(request: dict[str, object], deadline: float) -> Answer | Refusal | None:
    """The agent's answer; None to leave it to the full library (nothing was sent, or
    the answer was not in a known shape). Raises fasttoken._TimedOut once sent."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    request["timeout"] = float(left)
    line = fasttoken._encode(request)
    if line is None:
        return None
    path = socket_path()
    if socket_path_problem(path) is not None:
        return None  # the full library refuses it and says why
    sent_at = None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(min(left, 5.0))
        sock.connect(path)
        if peer_problem(sock, path) is not None:
            return None  # nothing sent; the full library refuses it and says why
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
            if not chunk or len(buffer) + len(chunk) > fasttoken._MAX_ANSWER_BYTES:
                return None
            buffer += chunk
    except TimeoutError:
        if sent_at is None:
            return None
        raise fasttoken._TimedOut(time.monotonic() - sent_at) from None
    except OSError:
        if sent_at is None:
            return None
        return Refusal("", f"the agent on {path} closed the connection without an answer")
    finally:
        sock.close()
    return _parse_answer(buffer.partition(b"\n")[0])


def _parse_answer(response: bytes) -> Answer | Refusal | None:
    if response.startswith(fasttoken._TOKEN_PREFIX):
        rest = response[len(fasttoken._TOKEN_PREFIX):]
        token, quote, rest = rest.partition(b'"')
        if quote and token and b"\\" not in token:
            expires_at: float | None = None
            _, found, tail = rest.partition(_EXPIRES_KEY)
            if found:
                number = tail.split(b",", 1)[0].split(b"}", 1)[0]
                try:
                    expires_at = float(number)
                except ValueError:
                    return None
            return Answer(token.decode(), expires_at)
    import json  # the general case: any valid answer, success or error

    try:
        document = json.loads(response)
        if document.get("ok") is True:
            result = document["result"]
            token_value = result["access_token"]
            expires = result.get("expires_at")
            if not isinstance(token_value, str) or not token_value:
                return None
            if expires is not None and not isinstance(expires, int | float):
                return None
            return Answer(token_value, None if expires is None else float(expires))
        error = document["error"]
        details = error.get("details") or {}
        return Refusal(str(error["code"]), str(error["message"]),
                       str(details.get("command", "")))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _get_full(
    profile: str, audience: str | None, min_valid: float, rejected_token: str | None,
    deadline: float,
) -> Answer | Refusal:
    """The full library: the config file's key, an agent started when none runs, every
    refusal with its own message. Never interactive either."""
    from compozy_client import protocol
    from compozy_client.chain import static_credential
    from compozy_client.config import load_config
    from compozy_client.connection import connect
    from compozy_client.errors import AgentError, CompozyError

    try:
        static = static_credential(load_config())
        if static is not None:
            return Answer(static.api_key, None)
        request = protocol.Token(id=1, profile=profile, audience=audience or None,
                                 min_valid=min_valid, rejected_token=rejected_token or None)
        with connect(timeout=max(0.001, deadline - time.monotonic()),
                     deadline=deadline) as conn:
            request.timeout = max(0.0, deadline - time.monotonic())
            result = conn.call(request, protocol.TokenResult)
    except AgentError as exc:
        return Refusal(exc.code, str(exc), str(exc.details.get("command", "") or ""))
    except CompozyError as exc:
        return Refusal("", str(exc))
    return Answer(result.access_token, result.expires_at)
