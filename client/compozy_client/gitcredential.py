"""`git-credential-compozy`: git's credential helper protocol, answered from the agent.

git runs ``git-credential-compozy get|store|erase`` (``git config
credential.https://HOST.helper compozy``; ``compozy auth setup-git`` writes
that) with ``key=value`` lines on stdin (git-credential(1), "INPUT/OUTPUT
FORMAT"). What each operation does:

- ``get``: the host (and ``path``, with ``credential.useHttpPath``) picks a
  profile and audience by the config's ``rules:`` (:mod:`compozy_client.rules`;
  else ``$COMPOZY_PROFILE`` or ``default``), and the agent hands out a token that
  stays valid at least 5 minutes (``min_valid``). The answer is ``username`` and
  ``password`` with ``password_expiry_utc``, so git (2.40+) never uses it past its
  expiry. When git announces ``capability[]=authtype`` (2.46+) and the host takes
  Bearer tokens (its rule says ``bearer: true``, or git passed a
  ``WWW-Authenticate: Bearer`` challenge as ``wwwauth[]``), the answer is
  ``authtype=Bearer``, ``credential`` and ``ephemeral=1`` instead: no storing
  helper keeps it. The credential chain applies as for ``compozy auth token``:
  ``FLYZT_API_KEY``, then the config file's key, then the agent; except for a
  host whose profile was named (a matching rule, or ``--profile``): that host
  gets that profile's token from the agent, never the chain's API key.
- ``erase`` (git got 401 with that token): the agent is told the token was
  rejected (the ``token`` op's ``rejected_token``), so it drops it and the next
  ``get`` gets a new one. Never a logout.
- ``store``: nothing; the agent keeps the session. Unknown operations: nothing.

Never interactive: no browser, no prompt. When there is no token to give (login
needed, agent locked, provider unreachable) one line on stderr says why and
what to run (``compozy login --profile work``), and the answer is ``quit=1``,
which makes git stop rather than ask for a password at the terminal.

What is never written to git: a refresh token (the agent never hands one out,
and ``oauth_refresh_token`` is never emitted), a token over plain ``http`` to
another machine (only ``https``, or ``http`` to 127.0.0.1/::1/localhost, get
one), or a token with characters outside RFC 6750's token set (a line break in
a provider-supplied token would forge protocol lines).

The common case (no ``rules:`` or key in the config, an agent answering) takes
the same light path as ``compozy auth token`` (:mod:`compozy_client.fasttoken`:
no argparse, msgspec or YAML, the peer checks before a byte is sent); anything
else goes through the library, which starts an agent when none runs and says
precisely what is wrong.
"""

from __future__ import annotations

import os
import time

from compozy_client import fasttoken
from compozy_client.portowner import foreign_listener

TYPE_CHECKING = False
if TYPE_CHECKING:
    from compozy_client.rules import HasRules

#: git asks for a token that stays valid this long: a clone or push of a large
#: repository runs many requests with it.
MIN_VALID = 300.0
#: The user name sent with the token when neither git nor the rule names one.
DEFAULT_USERNAME = "compozy"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: git sends a few hundred bytes; anything this long is not git.
_MAX_INPUT = 64 * 1024


class _Plan:
    """Who to ask for the token and how to hand it to git. ``named``: the profile was
    named for this host (a rule, or the helper's ``--profile``), so an API key the
    credential chain would put first is not what this host gets."""

    __slots__ = ("audience", "bearer", "named", "profile", "username")

    def __init__(self, profile: str, audience: str | None, bearer: bool,
                 username: str | None, named: bool = False) -> None:
        self.profile = profile
        self.audience = audience
        self.bearer = bearer
        self.username = username
        self.named = named


def main(argv: list[str]) -> int:
    """Run one operation on the description git writes to stdin; the exit code.

    ``argv`` is ``[--profile NAME] OPERATION``: git appends the operation to the
    helper's configured command line (``helper = compozy --profile work``).
    """
    operation = argv[-1] if argv else ""
    if operation not in ("get", "erase", "store"):
        return 0  # git-credential(1): a helper ignores operations it does not know
    profile = _profile_option(argv[:-1])
    fields, capabilities, challenges = _read_description()
    if operation == "store":
        return 0
    protocol = fields.get("protocol", "")
    host = fields.get("host", "")
    if not host or not _may_carry_a_token(protocol, host):
        if operation == "get" and host:
            _say(f"not answering for {protocol}://{host}: a token goes only over https "
                 "(or http to this machine)")
        return 0
    if operation == "get" and protocol == "http":
        owner = foreign_listener(_port_of(host))
        if owner is not None:
            # quit=1: git must not ask for a password to send there either.
            _say(f"not answering for http://{host}: that port is served by uid {owner}, not "
                 "by you; another user may have taken it (a token over plain http goes "
                 "only to your own server)")
            return _quit()
    if operation == "erase":
        rejected = fields.get("password") or fields.get("credential")
        if rejected:
            _erase(host, fields.get("path"), rejected, profile)
        return 0
    return _get(fields, capabilities, challenges, profile)


def _profile_option(options: list[str]) -> str | None:
    """``--profile NAME`` (or ``--profile=NAME``) from the helper's command line."""
    profile = None
    index = 0
    while index < len(options):
        name, eq, value = options[index].partition("=")
        if name == "--profile" and not eq and index + 1 < len(options):
            index += 1
            value = options[index]
        elif name != "--profile" or not eq:
            _say(f"ignoring unknown option {options[index]!r} (the helper takes --profile NAME)")
            index += 1
            continue
        profile = value.strip() or None
        index += 1
    return profile


def _read_description() -> tuple[dict[str, str], set[str], list[str]]:
    """git's ``key=value`` lines, up to a blank line or the end of input: the single
    values, the ``capability[]`` values and the ``wwwauth[]`` values."""
    data = b""
    while b"\n\n" not in data and len(data) <= _MAX_INPUT:
        try:
            chunk = os.read(0, 65536)
        except OSError:  # no stdin at all: an empty description
            break
        if not chunk:
            break
        data += chunk
    fields: dict[str, str] = {}
    capabilities: set[str] = set()
    challenges: list[str] = []
    for raw in data[:_MAX_INPUT].split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if not line:
            break
        key, eq, value = line.partition("=")
        if not eq:
            continue
        if key == "capability[]":
            capabilities.add(value)
        elif key == "wwwauth[]":
            challenges.append(value)
        else:
            fields[key] = value
    return fields, capabilities, challenges


def _may_carry_a_token(protocol: str, host: str) -> bool:
    """https anywhere; plain http only to this machine (a token in clear text on a
    network is anyone's)."""
    if protocol == "https":
        return True
    if protocol != "http":
        return False
    # A name or v4 address, with :port or not; or [v6 address], with :port or not.
    # Nothing else after the name: git takes the host up to the first "/" after the
    # first "@", so a URL such as http://u@localhost:1@evil.test/ would reach here as
    # "localhost:1@evil.test", a host the client's HTTP library may read otherwise.
    name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
    port = host[len(name):]
    digits = port[1:]
    if port and not (port[0] == ":" and digits.isascii() and (digits.isdigit() or not digits)):
        return False
    return name.lower() in _LOOPBACK_HOSTS


def _port_of(host: str) -> int:
    """The port of a host :func:`_may_carry_a_token` let through (80 when none is given)."""
    after_name = host[host.find("]") + 1:] if host.startswith("[") else host.partition(":")[2]
    digits = after_name.lstrip(":") if host.startswith("[") else after_name
    return int(digits) if digits else 80


def _get(fields: dict[str, str], capabilities: set[str], challenges: list[str],
         profile: str | None) -> int:
    deadline = time.monotonic() + fasttoken.budget()
    host, path = fields["host"], fields.get("path")
    plan = _light_plan(profile, host, path)
    answer: tuple[str, float | None] | tuple[str, str] | None = None
    if plan is not None:
        request: dict[str, object] = {"profile": plan.profile, "min_valid": MIN_VALID}
        if plan.audience is not None:
            request["audience"] = plan.audience
        try:
            response = fasttoken.exchange(request, deadline)
        except fasttoken.TimedOut as timed_out:
            _say(f"the agent took the request but did not answer within "
                 f"{timed_out.args[0]:.0f} s; see: compozy auth status")
            return _quit()
        if response is not None:
            answer = _read_answer(response)
    if answer is None:  # rules, a key, no agent, a socket to refuse: the library says
        plan, answer = _library_answer(host, path, profile, deadline)
    token, detail = answer
    if isinstance(detail, str):  # (message, command): the agent said no
        _say(token + (f"; run: {detail}" if detail else ""))
        return _quit()
    if not _token_shaped(token):
        _say("the agent's token has characters a token cannot have; not handing it to git")
        return _quit()
    assert plan is not None
    lines = []
    bearer = plan.bearer or any(c.split(" ", 1)[0].lower() == "bearer" for c in challenges)
    if "authtype" in capabilities and bearer:
        # git-credential(1): capabilities first; a pre-encoded credential for the
        # Authorization header; ephemeral: not to be stored by any helper.
        lines += ["capability[]=authtype", "authtype=Bearer", f"credential={token}",
                  "ephemeral=1"]
    else:
        username = fields.get("username") or plan.username or DEFAULT_USERNAME
        lines += [f"username={username}", f"password={token}"]
    if detail is not None:
        lines.append(f"password_expiry_utc={int(detail)}")
    os.write(1, ("\n".join(lines) + "\n").encode())
    return 0


def _light_plan(profile: str | None, host: str, path: str | None) -> _Plan | None:
    """The plan without YAML, or None for the library path: when the config file has no
    rules, or rules cached for its exact bytes (:mod:`compozy_client.rulecache`), and no
    key. Same checks as the token fast path: a config file not to be trusted is left
    to the library, which refuses it and says why."""
    from compozy_client.paths import (
        MAX_CONFIG_BYTES,
        config_file_problem,
        config_path,
        open_config_file,
        socket_path,
    )

    config = config_path()
    text = b""
    try:
        with open(open_config_file(config), "rb") as file:
            if config_file_problem(config, os.fstat(file.fileno())) is not None:
                return None
            text = file.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES or b"api_key" in text:
            return None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    if os.environ.get("FLYZT_API_KEY", "").strip():
        return None
    if b"rules" not in text:
        return _Plan(_resolve_profile(profile), None, False, None)
    from compozy_client.rulecache import read_cache

    cached = read_cache(socket_path(), text)
    return None if cached is None else _plan_by_rules(cached, host, path, profile)


def _resolve_profile(explicit: str | None) -> str:
    """As compozy_client.chain.resolve_profile (not imported: it loads msgspec)."""
    return explicit or os.environ.get("COMPOZY_PROFILE", "").strip() or "default"


def _read_answer(response: bytes) -> tuple[str, float | None] | tuple[str, str] | None:
    """(token, expires_at) or (message, command) from the agent's response line; None
    when it is in no shape this path reads (the library reads it again)."""
    # msgspec writes the result's fields in order: the token, then (token_type being
    # the default, omitted) expires_at. That common shape is read without json.
    if response.startswith(fasttoken.TOKEN_PREFIX):
        token, quote, rest = response[len(fasttoken.TOKEN_PREFIX):].partition(b'"')
        if quote and token and b"\\" not in token and rest.startswith(b',"expires_at":'):
            number = rest[len(b',"expires_at":'):].split(b",", 1)[0].split(b"}", 1)[0]
            try:
                expires_at = float(number)
            except ValueError:
                expires_at = 0.0
            if 0 < expires_at < 1e11:  # not nan, inf or nonsense
                return token.decode(), expires_at
    import json

    try:
        document = json.loads(response)
        if document.get("ok") is True:
            result = document["result"]
            value, expiry = result["access_token"], result.get("expires_at")
            if not isinstance(value, str) or not value:
                return None
            finite = isinstance(expiry, int | float) and not isinstance(expiry, bool) \
                and 0 < expiry < 1e11
            return value, float(expiry) if finite else None
        error = document["error"]
        details = error.get("details") or {}
        return str(error["message"]), str(details.get("command", ""))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _plan_by_rules(config: HasRules, host: str, path: str | None,
                   profile: str | None) -> _Plan:
    """The profile named on the helper's command line, else the first matching rule's,
    else ``$COMPOZY_PROFILE`` or ``default``; a rule for another profile than the one
    named does not apply."""
    from compozy_client.rules import match_rule

    rule = match_rule(config, host=host, path=path)
    if rule is None or (profile is not None and rule.profile not in (None, profile)):
        return _Plan(_resolve_profile(profile), None, False, None, named=profile is not None)
    return _Plan(_resolve_profile(profile or rule.profile), rule.audience, rule.bearer,
                 rule.username, named=True)


def _library_answer(
    host: str, path: str | None, profile: str | None, deadline: float
) -> tuple[_Plan, tuple[str, float | None] | tuple[str, str]]:
    """The plan and the answer, the general way (config file, rules, chain, agent start)."""
    from compozy_client import protocol
    from compozy_client.chain import static_credential
    from compozy_client.config import Config, parse_config, read_config_file
    from compozy_client.connection import connect
    from compozy_client.errors import AgentError, CompozyError
    from compozy_client.paths import config_path, socket_path
    from compozy_client.rulecache import write_cache

    plan = _Plan(_resolve_profile(profile), None, False, None)
    try:
        read = read_config_file(config_path())
        config = Config() if read is None else parse_config(*read, config_path())
        if read is not None and config.rules:
            write_cache(socket_path(), read[0], config.rules)  # the next run skips YAML
        plan = _plan_by_rules(config, host, path, profile)
        static = static_credential(config)
        # The chain's API key (FLYZT_API_KEY, auth.api_key) is a Compozy key: it goes
        # to a host only when nothing named that host's profile. A rule or --profile
        # for the host says which login it gets; a key set for other tools must not
        # reach it instead (it outlives any token, and the host was never meant to
        # see it).
        if static is not None and not plan.named:
            return plan, (static.api_key, None)
        request = protocol.Token(id=1, profile=plan.profile, audience=plan.audience,
                                 min_valid=MIN_VALID)
        with connect(timeout=max(0.0, deadline - time.monotonic()), deadline=deadline) as conn:
            request.timeout = max(0.0, deadline - time.monotonic())
            result = conn.call(request, protocol.TokenResult)
    except AgentError as exc:
        return plan, (exc.message, exc.details.get("command", ""))
    except CompozyError as exc:
        return plan, (str(exc), "")
    return plan, (result.access_token, result.expires_at)


def _erase(host: str, path: str | None, rejected: str, profile: str | None) -> None:
    """Tell the agent the token git just had refused (401) was rejected."""
    from compozy_client import protocol
    from compozy_client.chain import static_credential
    from compozy_client.config import load_config
    from compozy_client.connection import connect
    from compozy_client.errors import AgentError, AgentUnavailable, CompozyError

    deadline = time.monotonic() + fasttoken.budget()
    try:
        config = load_config()
        plan = _plan_by_rules(config, host, path, profile)
        if static_credential(config) is not None and not plan.named:
            return  # a key: nothing the agent could renew
        request = protocol.Token(id=1, profile=plan.profile, audience=plan.audience,
                                 rejected_token=rejected)
        # No agent running: it cannot have handed this token out, and none is started.
        with connect(timeout=max(0.0, deadline - time.monotonic()), deadline=deadline,
                     autostart=False) as conn:
            request.timeout = max(0.0, deadline - time.monotonic())
            conn.call(request, protocol.TokenResult)
    except AgentUnavailable:
        return
    except AgentError as exc:
        command = exc.details.get("command", "")
        _say(exc.message + (f"; run: {command}" if command else ""))
    except CompozyError as exc:
        _say(str(exc))


def _token_shaped(token: str) -> bool:
    """Only visible ASCII (RFC 6750 section 2.1's b64token is narrower still): no line
    break can end the credential line and start another."""
    return bool(token) and all("!" <= char <= "~" for char in token)


def _quit() -> int:
    """Tell git to stop here rather than prompt for a password (git-credential(1) ``quit``);
    exit 1, which git ignores once it has read the answer."""
    os.write(1, b"quit=1\n")
    return 1


def _say(message: str) -> None:
    """One line on stderr; the text may be the provider's, so only printable characters."""
    shown = "".join(char if char.isprintable() else "?" for char in message)[:2000]
    os.write(2, f"compozy: {shown}\n".encode())
