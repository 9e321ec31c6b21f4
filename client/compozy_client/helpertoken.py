"""Tokens for the credential helpers other programs run: kubectl's exec plugin
(``compozy auth kube-token``) and ``docker-credential-compozy``.

Those programs run a helper before their own work, sometimes once per command,
so the common case here costs what ``compozy auth token``'s fast path costs
(:mod:`compozy_client.fasttoken`, whose ``exchange`` this uses): ``_socket``,
a hand-written request, the agent's known answer shape read by hand, here with
the token's expiry as well. Anything unusual (no agent yet, a config file
holding a key or not to be trusted, ``rules:`` not yet in the rules cache of
:mod:`compozy_client.rulecache`, a socket that is not provably our agent's, an
answer in another shape) goes to the full client library, which parses the
config (and caches its rules for the next run), starts the agent, and refuses
unsafe sockets and config files with their own messages.

Never interactive: nothing here starts a login, opens a browser or reads the
terminal. A session that needs a login is a :class:`Refusal` naming the
``compozy login`` to run. The socket checks of :mod:`compozy_client.peercheck`
run before a byte is sent, on both paths: a helper never talks to a socket
that another uid serves. A refresh token never reaches a helper: the agent
hands out access tokens only.
"""

from __future__ import annotations

import os
import time

from compozy_client import fasttoken
from compozy_client.paths import config_path, socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from compozy_client.rules import HasRules

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
    *,
    host: str | None = None,
    url: Callable[[], str | None] | None = None,
) -> Answer | Refusal:
    """A token valid for ``min_valid`` seconds, or why not. ``rejected_token`` is one a
    server refused.

    The profile and audience: those named, else what the config's first matching
    ``rules:`` entry says for ``host`` (a registry's ``host[:port]``), the URL
    ``url()`` returns (a cluster's server) or ``audience``; else
    ``$COMPOZY_PROFILE`` or ``default``, as :mod:`compozy_client.rules` orders them.
    """
    if deadline is None:
        deadline = time.monotonic() + fasttoken.budget()
    text = fasttoken.light_config()  # None: a key, or a file to leave to the library
    if text is not None:
        key = os.environ.get("FLYZT_API_KEY", "").strip()
        if key:
            return Answer(key, None)
        if b"rules" in text:
            from compozy_client.rulecache import read_cache

            cached = read_cache(socket_path(), text)
            if cached is None:  # not cached for these very bytes: the library parses them
                return _get_full(profile, audience, min_valid, rejected_token, deadline,
                                 host, url)
            profile, audience = _by_rules(cached, profile, audience, host, url)
        request: dict[str, object] = {
            "profile": profile or os.environ.get("COMPOZY_PROFILE", "").strip() or "default",
            "min_valid": float(min_valid)}
        if audience:
            request["audience"] = audience
        if rejected_token:
            request["rejected_token"] = rejected_token
        try:
            response = fasttoken.exchange(request, deadline)
        except fasttoken.TimedOut as timed_out:
            return Refusal("", f"the agent took the request but did not answer within "
                               f"{timed_out.args[0]:.0f} s; it was not asked again",
                           "compozy auth status")
        answer = None if response is None else _parse_answer(response)
        if answer is not None:
            return answer
    return _get_full(profile, audience, min_valid, rejected_token, deadline, host, url)


def _by_rules(
    config: HasRules, profile: str | None, audience: str | None, host: str | None,
    url: Callable[[], str | None] | None,
) -> tuple[str | None, str | None]:
    """The profile and audience: those named, else the first matching rule's."""
    if profile is not None and audience is not None:
        return profile, audience
    from compozy_client.rules import match_rule

    rule = match_rule(config, host=host, url=url() if url is not None else None,
                      audience=audience)
    if rule is None:
        return profile, audience
    return profile or rule.profile, audience or rule.audience


def _parse_answer(response: bytes) -> Answer | Refusal | None:
    if response.startswith(fasttoken.TOKEN_PREFIX):
        rest = response[len(fasttoken.TOKEN_PREFIX):]
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
    profile: str | None, audience: str | None, min_valid: float, rejected_token: str | None,
    deadline: float, host: str | None, url: Callable[[], str | None] | None,
) -> Answer | Refusal:
    """The full library: the config file's key and rules, an agent started when none
    runs, every refusal with its own message. Never interactive either."""
    from compozy_client import protocol
    from compozy_client.chain import resolve_profile, static_credential
    from compozy_client.config import Config, parse_config, read_config_file
    from compozy_client.configcheck import record_checked
    from compozy_client.connection import connect
    from compozy_client.errors import AgentError, CompozyError
    from compozy_client.rulecache import write_cache

    try:
        read = read_config_file(config_path())
        config = Config() if read is None else parse_config(*read, config_path())
        if read is not None:
            record_checked(config_path(), read[0])  # the next run needs no YAML
        if read is not None and config.rules:
            write_cache(socket_path(), read[0], config.rules)  # the next run skips YAML
        static = static_credential(config)
        if static is not None:
            return Answer(static.api_key, None)
        profile, audience = _by_rules(config, profile, audience, host, url)
        request = protocol.Token(id=1, profile=resolve_profile(profile),
                                 audience=audience or None, min_valid=min_valid,
                                 rejected_token=rejected_token or None)
        with connect(timeout=max(0.001, deadline - time.monotonic()),
                     deadline=deadline) as conn:
            request.timeout = max(0.0, deadline - time.monotonic())
            result = conn.call(request, protocol.TokenResult)
    except AgentError as exc:
        return Refusal(exc.code, str(exc), str(exc.details.get("command", "") or ""))
    except CompozyError as exc:
        return Refusal("", str(exc))
    return Answer(result.access_token, result.expires_at)
