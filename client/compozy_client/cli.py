"""`compozy`: parse the command line, forward it to the agent, print the answer.

Data goes to stdout, messages to stderr. Exit codes: 0 success, 1 a handled
failure (not logged in, provider unreachable, ...), 2 a usage error.
``NO_COLOR`` (https://no-color.org) and non-terminals get no colour.

The module imports only os, sys and time at load time: ``compozy auth token``
goes through :mod:`compozy_client.fasttoken` first and most calls never load the
rest.

``compozy auth token`` and ``compozy auth refresh`` answer within one budget
(30 s, or ``$COMPOZY_TIMEOUT``) counted from the command's start, agent start-up
included; they tell the agent how long they wait, so its answer, which says what
is slow, comes first (docs/architecture.md, "Deadlines").
"""

from __future__ import annotations

import os
import sys
import time

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, Literal, NoReturn

    from compozy_client.chain import StaticCredential
    from compozy_client.config import Config
    from compozy_client.connection import AgentConnection
    from compozy_client.protocol import SessionInfo, StatusResult

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: How long `compozy login` waits for the person, unless --timeout says otherwise.
LOGIN_TIMEOUT = 300.0
#: When this command's time budget ends (``time.monotonic()``); set by main() or run().
_deadline: float | None = None


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the ``compozy`` console script."""
    started = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    deadline = None
    if args[:2] == ["auth", "token"]:
        from compozy_client import fasttoken

        # One budget: what the fast path used is gone for the full CLI too.
        deadline = started + fasttoken.budget()
        code = fasttoken.run(args[2:], deadline)
        if code is not None:
            sys.exit(code)
    sys.exit(run(args, deadline))


def run(argv: list[str], deadline: float | None = None) -> int:
    """Run one command; returns the exit code. ``deadline`` (``time.monotonic()``) ends
    the command's budget; by default it is the budget from now."""
    global _deadline
    from compozy_client.connection import budget
    from compozy_client.errors import CompozyError, UsageError

    _deadline = deadline if deadline is not None else time.monotonic() + budget()

    parser = build_parser()
    options = parser.parse_args(argv)
    if not hasattr(options, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        options.config = _read_config(options)
        code: int = options.handler(options)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except CompozyError as exc:
        _report(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    return code


# --------------------------------------------------------------------------
# The parser.

_EXAMPLES = {
    "compozy": """examples:
  compozy login                      # sign in with your browser
  compozy auth status                # who am I, and how long is my token good for
  compozy auth token                 # print an access token (for scripts)
  FLYZT_API_KEY=... compozy deploy   # CI/CD: an API key, no login needed""",
    "login": """examples:
  compozy login                         # browser login (authorization code + PKCE)
  compozy login --device                # show a code to enter on another device
  compozy login --no-browser            # print the URL instead of opening it
  compozy login --profile staging --issuer https://auth.staging.example
  echo "$KEY" | compozy login --with-api-key --profile prod""",
    "logout": """examples:
  compozy logout                     # revoke and forget the default profile's session
  compozy logout --profile staging
  compozy logout --all --force       # every profile, even if the provider is unreachable""",
    "auth": """examples:
  compozy auth status
  compozy auth list --json
  compozy auth token --scope compozy:read
  compozy auth revoke 3f9a1c2e
  compozy auth log                   # who got tokens lately
  compozy auth lock                  # hand out nothing until `compozy auth unlock`""",
    "status": """examples:
  compozy auth status
  compozy auth status --profile staging --json""",
    "list": """examples:
  compozy auth list
  compozy auth list --json | jq '.sessions[].token_id'""",
    "refresh": """examples:
  compozy auth refresh                 # the default profile
  compozy auth refresh --profile dev
  compozy auth refresh 3f9a1c2e        # by token id (from `compozy auth list`)""",
    "revoke": """examples:
  compozy auth revoke 3f9a1c2e
  compozy auth revoke 3f9a1c2e --force   # forget it even if the provider is unreachable""",
    "revoke-all": """examples:
  compozy auth revoke-all
  compozy auth revoke-all --yes          # no question asked (needed without a terminal)""",
    "lock": """examples:
  compozy auth lock                      # asks for a passphrase twice, on the terminal
  compozy auth unlock
  pass show compozy-lock | compozy auth lock --passphrase-stdin""",
    "unlock": """examples:
  compozy auth unlock
  pass show compozy-lock | compozy auth unlock --passphrase-stdin""",
    "log": """examples:
  compozy auth log                       # the 20 most recent token requests
  compozy auth log --limit 100 --profile prod
  compozy auth log --issued              # only tokens handed out (failures kept apart)
  compozy auth log --json | jq '.entries[] | select(.outcome != "issued")'""",
    "token": """examples:
  curl -H "Authorization: Bearer $(compozy auth token)" https://api.compozy.dev/v1/me
  compozy auth token --profile prod --min-valid 300
  compozy auth token --scope compozy:read --audience https://api.compozy.dev
  compozy auth token --force-new     # the last token was refused with 401""",
}


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from compozy_client import __version__

    def new(sub: Any, name: str, help_text: str, example_key: str | None = None) -> Any:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXAMPLES.get(example_key or name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def profile_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--profile",
            metavar="NAME",
            help="the profile (default: $COMPOZY_PROFILE, else 'default')",
        )

    parser = argparse.ArgumentParser(
        prog="compozy",
        description="Compozy Cloud command-line authentication, served by compozy-agent.",
        epilog=_EXAMPLES["compozy"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"compozy {__version__}")
    top = parser.add_subparsers(title="commands", metavar="COMMAND")

    login = new(top, "login", "Log in to Compozy Cloud")
    profile_option(login)
    login.add_argument("--issuer", metavar="URL", help="the OpenID provider ($COMPOZY_ISSUER)")
    login.add_argument("--client-id", metavar="ID", help="the OAuth client id ($COMPOZY_CLIENT_ID)")
    login.add_argument(
        "--scope", action="append", metavar="SCOPE", help="a scope to ask for (repeatable)"
    )
    flow = login.add_mutually_exclusive_group()
    flow.add_argument("--device", action="store_true", help="use the device code flow")
    flow.add_argument(
        "--no-browser", action="store_true", help="print the login URL instead of opening it"
    )
    flow.add_argument(
        "--with-api-key",
        action="store_true",
        help="read an API key from stdin and keep it in the agent's secure storage",
    )
    login.add_argument(
        "--timeout", type=float, default=LOGIN_TIMEOUT, metavar="SECONDS",
        help=f"give up after this long (default {LOGIN_TIMEOUT:.0f})",
    )
    login.set_defaults(handler=cmd_login)

    logout = new(top, "logout", "Log out and remove stored credentials")
    profile_option(logout)
    logout.add_argument("--all", action="store_true", help="every profile")
    logout.add_argument(
        "--force", action="store_true",
        help="forget locally even when the provider cannot be reached to revoke",
    )
    logout.set_defaults(handler=cmd_logout)

    auth = new(top, "auth", "Manage authentication: status, sessions, tokens")
    auth_sub = auth.add_subparsers(title="commands", metavar="COMMAND")
    auth.set_defaults(handler=lambda _o: _usage(auth))

    status = new(auth_sub, "status", "Check authentication status")
    profile_option(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)

    listing = new(auth_sub, "list", "List all active sessions")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=cmd_list)

    refresh = new(auth_sub, "refresh", "Manually refresh authentication token")
    profile_option(refresh)
    refresh.add_argument("token_id", nargs="?", metavar="TOKEN_ID", help="a session's token id")
    refresh.set_defaults(handler=cmd_refresh)

    revoke = new(auth_sub, "revoke", "Revoke a specific token")
    revoke.add_argument("token_id", metavar="TOKEN_ID", help="from `compozy auth list`")
    revoke.add_argument("--force", action="store_true", help="forget it even if not revoked")
    revoke.set_defaults(handler=cmd_revoke)

    revoke_all = new(auth_sub, "revoke-all", "Revoke all active tokens")
    revoke_all.add_argument("--force", action="store_true", help="forget them even if not revoked")
    revoke_all.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    revoke_all.set_defaults(handler=cmd_revoke_all)

    lock = new(auth_sub, "lock", "Lock the agent: no token is handed out until unlocked")
    lock.add_argument("--passphrase-stdin", action="store_true",
                      help="read the passphrase from the first line of stdin")
    lock.set_defaults(handler=cmd_lock)

    unlock = new(auth_sub, "unlock", "Unlock the agent with the passphrase it was locked with")
    unlock.add_argument("--passphrase-stdin", action="store_true",
                        help="read the passphrase from the first line of stdin")
    unlock.set_defaults(handler=cmd_unlock)

    audit = new(auth_sub, "log", "Show recent token requests: who asked, what they got")
    profile_option(audit)
    audit.add_argument("--limit", type=int, default=20, metavar="N",
                       help="show the N most recent (default 20, at most 1000)")
    which = audit.add_mutually_exclusive_group()
    which.add_argument("--issued", dest="outcome", action="store_const", const="issued",
                       help="only requests that got a token")
    which.add_argument("--failed", dest="outcome", action="store_const", const="failed",
                       help="only requests that got none")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(handler=cmd_log)

    token = new(auth_sub, "token", "Print a valid access token to stdout")
    profile_option(token)
    token.add_argument(
        "--scope", action="append", metavar="SCOPE", help="ask for a narrower token (repeatable)"
    )
    token.add_argument("--audience", metavar="URI", help="ask for a token for this API (RFC 8707)")
    token.add_argument(
        "--min-valid", type=float, default=0.0, metavar="SECONDS",
        help="refresh first unless the token stays valid this long",
    )
    token.add_argument(
        "--force-new", action="store_true",
        help="get a token issued now (within 5 s of the last forced one: that one)",
    )
    token.set_defaults(handler=cmd_token)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


# --------------------------------------------------------------------------
# Output helpers.


def _color(code: str, text: str, stream: Any) -> str:
    if os.environ.get("NO_COLOR") or not stream.isatty():
        return text
    return f"\033[{code}m{text}\033[0m"


#: The longest message printed; a login URL of many scopes still fits.
MESSAGE_LIMIT = 16384


def _one_line(message: str) -> str:
    """Agent messages quote provider text: print none of its control characters raw
    (a newline would forge a line, an escape sequence would drive the terminal)."""
    from compozy_client.safetext import one_line

    return one_line(message, MESSAGE_LIMIT)


def _error(message: str) -> None:
    print(f"{_color('31;1', 'error:', sys.stderr)} {_one_line(message)}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{_color('33', 'warning:', sys.stderr)} {_one_line(message)}", file=sys.stderr)


def _info(message: str) -> None:
    print(_one_line(message), file=sys.stderr)


def _report(exc: Exception) -> None:
    from compozy_client.errors import AgentError, AgentTimedOut, AgentUnavailable

    _error(str(exc))
    if isinstance(exc, AgentError) and exc.details.get("command"):
        _info(f"  run: {exc.details['command']}")
    elif isinstance(exc, AgentTimedOut):
        # The agent is there and took the request: asking whether it may start is wrong.
        _info("  it answers in time whenever it is only waiting for the provider, so it may "
              "be stuck; see: compozy auth status")
    elif isinstance(exc, AgentUnavailable):
        _info("  is the agent allowed to start? (COMPOZY_AGENT_AUTOSTART=0 stops the CLI from "
              "starting one); start it by hand with `compozy-agent`")


def _print_json(value: Any) -> None:
    import msgspec

    from compozy_client.safetext import json_bytes

    # JSON leaves DEL, C1 and bidi overrides raw; escaped, they cannot drive a terminal.
    encoded = json_bytes(msgspec.json.format(msgspec.json.encode(value), indent=2))
    sys.stdout.write(encoded.decode() + "\n")


def _when(epoch: float | None) -> str:
    """'in 54m (2026-11-22 12:34:56 UTC)' style."""
    import time

    if epoch is None:
        return "unknown"
    delta = epoch - time.time()
    absolute = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    span = _span(abs(delta))
    return f"in {span} ({absolute})" if delta >= 0 else f"{span} ago ({absolute})"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def _read_config(options: argparse.Namespace) -> Config | None:
    """The config file, read once for every command, whether the command uses it or not.

    A file another uid owns or others can write stops every command
    (:class:`~compozy_client.errors.UnsafeConfigFile`), as ssh refuses an
    unprotected key; a key in a file others can read is warned about on every
    command. A malformed file is left to the commands that use it (None).
    """
    from compozy_client.chain import config_warnings
    from compozy_client.config import load_config
    from compozy_client.errors import ConfigError, UnsafeConfigFile

    try:
        config = load_config()
    except UnsafeConfigFile:
        raise
    except ConfigError:
        return None
    if options.handler is not cmd_status:  # status lists them with its own (and in --json)
        for warning in config_warnings(config):
            _warn(warning)
    return config


def _config(options: argparse.Namespace) -> Config:
    """The config :func:`_read_config` read, or its error."""
    from compozy_client.config import load_config

    config: Config | None = getattr(options, "config", None)
    return config if config is not None else load_config()


def _connect(autostart: bool = True, *, budgeted: bool = False) -> AgentConnection:
    """A connection to the agent; ``budgeted``: every call ends by the command's deadline."""
    from compozy_client.connection import connect

    return connect(autostart=autostart, deadline=_deadline if budgeted else None)


def _time_left() -> float | None:
    """Seconds left of the command's budget, for the agent to answer within."""
    return None if _deadline is None else max(0.0, _deadline - time.monotonic())


def _is_interactive() -> bool:
    return sys.stdin.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


def _confirm(question: str) -> bool:
    if not _is_interactive():
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


# --------------------------------------------------------------------------
# Commands.


def cmd_token(options: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile, static_credential
    from compozy_client.protocol import Token, TokenResult

    static = static_credential(_config(options))
    if static is not None:
        sys.stdout.write(static.api_key + "\n")
        return EXIT_OK
    request = Token(
        id=0,
        profile=resolve_profile(options.profile),
        scope=_split_scopes(options.scope),
        audience=options.audience,
        min_valid=options.min_valid,
        force_new=options.force_new,
    )
    with _connect(budgeted=True) as conn:
        request.timeout = _time_left()
        result = conn.call(request, TokenResult)
    sys.stdout.write(result.access_token + "\n")
    return EXIT_OK


def _split_scopes(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [scope for value in values for scope in value.replace(",", " ").split()]


def cmd_status(options: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile, shadowing_warnings, static_credential
    from compozy_client.errors import AgentUnavailable
    from compozy_client.protocol import Status, StatusResult

    profile = resolve_profile(options.profile)
    config = _config(options)
    static = static_credential(config)
    status: StatusResult | None = None
    agent_problem: str | None = None
    try:
        # With a static key winning, only look at an agent that already runs.
        with _connect(autostart=static is None) as conn:
            status = conn.call(Status(id=0, profile=profile), StatusResult)
    except AgentUnavailable as exc:
        agent_problem = str(exc)
    session = _session_for(status, profile)
    warnings = shadowing_warnings(static, config, session is not None, profile)
    if status is not None:
        warnings.extend(status.warnings)
        if status.clock_skew_seconds is not None and abs(status.clock_skew_seconds) > 60:
            warnings.append(
                f"your system clock is {abs(status.clock_skew_seconds):.0f} s "
                f"{'behind' if status.clock_skew_seconds > 0 else 'ahead of'} the provider's; "
                "tokens may look expired or not yet valid: verify your system time "
                "(e.g. `timedatectl set-ntp true`)"
            )
    usable = static is not None or (session is not None and session.state not in (
        "login_required", "revoked"))
    if options.json:
        _print_json(_status_document(profile, static, status, session, warnings, agent_problem,
                                     usable))
        return EXIT_OK if usable else EXIT_FAILURE
    _print_status(profile, static, status, session, warnings, agent_problem)
    return EXIT_OK if usable else EXIT_FAILURE


def _session_for(status: StatusResult | None, profile: str) -> SessionInfo | None:
    if status is None:
        return None
    return next((s for s in status.sessions if s.profile == profile), None)


def _status_document(
    profile: str,
    static: StaticCredential | None,
    status: StatusResult | None,
    session: SessionInfo | None,
    warnings: list[str],
    agent_problem: str | None,
    usable: bool,
) -> dict[str, Any]:
    source: dict[str, Any]
    if static is not None:
        source = {"type": static.source, "origin": static.origin}
    elif session is not None:
        source = {"type": "agent", "origin": f"agent session {session.token_id}"}
    else:
        source = {"type": "none", "origin": None}
    agent: dict[str, Any] | None = None
    if status is not None:
        agent = {"running": True, "pid": status.pid, "socket": status.socket,
                 "version": status.agent_version, "locked": status.locked}
    else:
        agent = {"running": False, "problem": agent_problem}
    return {
        "profile": profile,
        "authenticated": usable,
        "credential_source": source,
        "agent": agent,
        "session": session,
        "storage": status.storage if status is not None else None,
        "clock_skew_seconds": status.clock_skew_seconds if status is not None else None,
        "warnings": warnings,
    }


def _print_status(
    profile: str,
    static: StaticCredential | None,
    status: StatusResult | None,
    session: SessionInfo | None,
    warnings: list[str],
    agent_problem: str | None,
) -> None:
    out = sys.stdout
    if status is not None:
        out.write(f"Agent: running (pid {status.pid}, version {status.agent_version})\n")
        if status.locked:
            out.write("  Locked: no token is handed out until `compozy auth unlock`\n")
        out.write(f"  Socket: {status.socket}\n")
        storage = status.storage
        detail = f" ({storage.detail})" if storage.detail else ""
        note = "" if storage.persistent else "; sessions live in memory only and end with the agent"
        out.write(f"  Storage: {storage.backend}{detail}{note}\n")
    else:
        out.write(f"Agent: not running ({agent_problem})\n")
    if static is not None:
        label = "environment variable" if static.source == "env" else "config file"
        out.write(f"Credential source: API key from {static.origin} ({label})\n")
    elif session is not None:
        out.write(f"Credential source: agent session {session.token_id} (profile {profile})\n")
    else:
        out.write("Credential source: none\n")
    if session is not None:
        what = "API key" if session.kind == "api_key" else "logged in"
        account = f" as {session.account}" if session.account else ""
        issuer = f" to {session.issuer}" if session.issuer else ""
        out.write(f"Profile {profile}: {what}{issuer}{account}\n")
        out.write(f"  Token id: {session.token_id}\n")
        out.write(f"  State: {_state_text(session.state)}\n")
        if session.state == "login_required":
            again = "" if profile == "default" else f" --profile {profile}"
            out.write(f"  Run `compozy login{again}` to sign in again\n")
        if session.scopes:
            out.write(f"  Scopes: {' '.join(session.scopes)}\n")
        if session.kind == "oidc":
            out.write(f"  Access token expires: {_when(session.expires_at)}\n")
            if session.last_refresh_at is not None:
                outcome = session.last_refresh_outcome or "ok"
                out.write(f"  Last refresh: {_when(session.last_refresh_at)}: {outcome}\n")
        if not session.persisted:
            out.write("  Not saved: this session ends when the agent stops\n")
    elif static is None:
        out.write(f"Profile {profile}: not logged in; run `compozy login"
                  f"{'' if profile == 'default' else f' --profile {profile}'}`\n")
    for warning in warnings:
        _warn(warning)


def _state_text(state: str) -> str:
    return {
        "fresh": "valid",
        "expiring": "valid, refreshing soon",
        "refreshing": "refreshing",
        "expired": "access token expired; it is refreshed on next use",
        "login_required": "login required (the provider no longer accepts this session)",
        "revoked": "revoked",
    }.get(state, state)


def cmd_list(options: argparse.Namespace) -> int:
    from compozy_client.protocol import List, ListResult

    with _connect() as conn:
        result = conn.call(List(id=0), ListResult)
    if options.json:
        _print_json(result)
        return EXIT_OK
    if not result.sessions:
        _info("No sessions. Log in with `compozy login`.")
        return EXIT_OK
    def relative(epoch: float | None) -> str:
        return _when(epoch).split(" (")[0] if epoch else "-"

    rows = [["TOKEN ID", "PROFILE", "KIND", "ACCOUNT", "ISSUER", "STATE", "EXPIRES", "CREATED",
             "LAST USED", "SCOPES"]]
    for s in result.sessions:
        rows.append([
            s.token_id, s.profile, s.kind, s.account or "-", s.issuer or "-", s.state,
            relative(s.expires_at), relative(s.created_at), relative(s.last_used_at),
            " ".join(s.scopes) or "-",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip() + "\n")
    return EXIT_OK


def cmd_refresh(options: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile
    from compozy_client.errors import UsageError
    from compozy_client.protocol import Refresh, RefreshResult

    if options.token_id and options.profile:
        raise UsageError("give either --profile or a TOKEN_ID, not both")
    request = Refresh(id=0, profile=resolve_profile(options.profile), token_id=options.token_id)
    with _connect(budgeted=True) as conn:
        request.timeout = _time_left()
        result = conn.call(request, RefreshResult)
    _info(f"Refreshed session {result.token_id} (profile {result.profile}); "
          f"the access token expires {_when(result.expires_at)}")
    return EXIT_OK


def _print_revocation(result: Any) -> int:
    for token_id in result.forgotten:
        where = "revoked at the provider and " if token_id in result.revoked_at_provider else ""
        _info(f"Session {token_id}: {where}removed")
    for token_id, reason in result.not_revoked.items():
        _warn(f"session {token_id} was not revoked at the provider: {reason}")
    if not result.forgotten and not result.not_revoked:
        _info("No sessions to remove.")
    return EXIT_OK


def _revoking(make_request: Any, force: bool, what: str) -> int:
    """Send a revoking request; when the provider is unreachable, confirm before forgetting."""
    from compozy_client.errors import ProviderUnavailable
    from compozy_client.protocol import RevokeResult

    with _connect() as conn:
        try:
            result = conn.call(make_request(force), RevokeResult)
        except ProviderUnavailable as exc:
            if force:
                raise
            _error(str(exc))
            if not _confirm(f"Forget {what} locally anyway? It stays valid at the provider."):
                _info("Nothing removed. Pass --force to remove it locally anyway.")
                return EXIT_FAILURE
            result = conn.call(make_request(True), RevokeResult)
    return _print_revocation(result)


def cmd_revoke(options: argparse.Namespace) -> int:
    from compozy_client.protocol import Revoke

    return _revoking(lambda force: Revoke(id=0, token_id=options.token_id, force=force),
                     options.force, f"session {options.token_id}")


def cmd_revoke_all(options: argparse.Namespace) -> int:
    from compozy_client.errors import UsageError
    from compozy_client.protocol import RevokeAll

    if not options.yes:
        if not _is_interactive():
            raise UsageError("revoke-all needs --yes when not run from a terminal")
        if not _confirm("Revoke every session of every profile?"):
            _info("Nothing revoked.")
            return EXIT_FAILURE
    return _revoking(lambda force: RevokeAll(id=0, force=force), options.force, "every session")


def cmd_logout(options: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile
    from compozy_client.protocol import Logout

    profile = resolve_profile(options.profile)
    what = "every profile's session" if options.all else f"profile {profile}'s session"
    return _revoking(
        lambda force: Logout(id=0, profile=profile, all=options.all, force=force),
        options.force, what,
    )


def _read_passphrase(from_stdin: bool, confirm: bool) -> str:
    """The passphrase from the terminal (never from argv), or from stdin when asked to."""
    from compozy_client.errors import UsageError

    if from_stdin:
        passphrase = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        except OSError:
            raise UsageError("no terminal to ask for the passphrase on; "
                             "pipe it in with --passphrase-stdin") from None
        passphrase = getpass.getpass("Passphrase: ")
        if confirm and getpass.getpass("Again: ") != passphrase:
            raise UsageError("the passphrases differ; nothing changed")
    if not passphrase:
        raise UsageError("the passphrase must not be empty")
    return passphrase


def cmd_lock(options: argparse.Namespace) -> int:
    from compozy_client.protocol import Empty, Lock

    passphrase = _read_passphrase(options.passphrase_stdin, confirm=True)
    with _connect() as conn:
        conn.call(Lock(id=0, passphrase=passphrase), Empty)
    _info("Agent locked: no token is handed out until `compozy auth unlock`")
    return EXIT_OK


def cmd_unlock(options: argparse.Namespace) -> int:
    import time

    from compozy_client.errors import AgentBusy
    from compozy_client.protocol import Empty, Unlock

    passphrase = _read_passphrase(options.passphrase_stdin, confirm=False)
    with _connect(autostart=False) as conn:
        for attempt in range(3):
            try:
                conn.call(Unlock(id=0, passphrase=passphrase), Empty)
                break
            except AgentBusy as exc:
                # After a wrong passphrase the agent checks the next attempt only after a
                # delay, and refuses earlier ones unchecked: wait it out here, not there.
                wait = _retry_after(exc.details)
                if wait is None or attempt == 2:
                    raise
                _info(f"A wrong passphrase was given before: the agent checks this one in "
                      f"{wait:.1f} s; waiting")
                time.sleep(wait)
    _info("Agent unlocked")
    return EXIT_OK


def _retry_after(details: dict[str, str]) -> float | None:
    """The agent's ``retry_after_seconds`` when it is a sane wait (at most a minute)."""
    try:
        wait = float(details.get("retry_after_seconds", ""))
    except ValueError:
        return None
    return wait if 0.0 <= wait <= 60.0 else None


def cmd_log(options: argparse.Namespace) -> int:
    from compozy_client.protocol import AuditLog, AuditLogResult
    from compozy_client.safetext import for_terminal

    with _connect() as conn:
        result = conn.call(AuditLog(id=0, limit=max(0, min(options.limit, 1000)),
                                    profile=options.profile, outcome=options.outcome),
                           AuditLogResult)
    if options.json:
        _print_json(result)
        return EXIT_OK
    if not result.entries:
        _info("No token requests yet.")
        return EXIT_OK
    import shlex
    import time

    # PID and EXECUTABLE are what the kernel reported when the caller connected;
    # ARGV is what the program says about itself.
    rows = [["TIME", "PROFILE", "OUTCOME", "TOKEN ID", "SCOPE/AUDIENCE", "PID", "EXECUTABLE",
             "ARGV (SELF-REPORTED)"]]
    for e in result.entries:
        narrower = " ".join([*(e.scope or []), *([e.audience] if e.audience else [])])
        argv = e.self_reported_argv if e.self_reported_argv is not None else e.cmdline
        command = " ".join(shlex.quote(arg) for arg in argv or [])
        outcome = e.outcome if e.count == 1 else f"{e.outcome} x{e.count}"
        pid = "-" if e.pid is None else str(e.pid)
        if e.process_at_request == "gone":
            pid += " (gone)"
        exe = e.exe or "-"
        if e.process_at_request == "exec":
            exe += f" (then exec'd {e.exe_at_request or '?'})"
        cells = [
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time)), e.profile, outcome,
            e.token_id or "-", narrower or "-", pid, exe, command or "-",
        ]
        # Every cell escaped before it is measured: a newline or an escape sequence in a
        # command line (or a profile name) must neither forge a row nor reach the terminal.
        cells = [for_terminal(cell) for cell in cells]
        cells[-1] = (cells[-1][:77] + "...") if len(cells[-1]) > 80 else cells[-1]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip() + "\n")
    if result.path:
        failed = f"; failed requests: {for_terminal(result.failed_path)}" \
            if result.failed_path else ""
        _info(f"(the full log is {for_terminal(result.path)}{failed})")
    return EXIT_OK


def cmd_login(options: argparse.Namespace) -> int:
    from compozy_client.chain import env_api_key, resolve_profile

    profile = resolve_profile(options.profile)
    if options.with_api_key:
        return _login_with_api_key(profile)
    shadow = env_api_key()
    if shadow is not None:
        _warn("FLYZT_API_KEY is set: commands will keep using it instead of this login "
              "until you unset it")
    from compozy_client.protocol import LoginStart, LoginStartResult

    use_device = options.device or (not options.no_browser and not _can_open_browser())
    flow: Literal["browser", "device"] = "device" if use_device else "browser"
    request = LoginStart(
        id=0,
        profile=profile,
        flow=flow,
        issuer=options.issuer or os.environ.get("COMPOZY_ISSUER") or None,
        client_id=options.client_id or os.environ.get("COMPOZY_CLIENT_ID") or None,
        scope=_split_scopes(options.scope),
    )
    launcher: str | None = None  # the private directory of the page the browser opens
    try:
        with _connect() as conn:
            started = conn.call(request, LoginStartResult)
            if started.flow == "browser":
                assert started.authorization_url is not None
                opened = False
                if not options.no_browser:
                    _info(f"Opening your browser to log in to {started.issuer} ...")
                    launcher = _browser_launcher(started.authorization_url)
                    opened = launcher is not None and _open_browser(launcher)
                if not opened:
                    _info("Open this URL in a browser to log in:")
                _info(f"  {started.authorization_url}")
            else:
                _info(f"To log in to {started.issuer}, open {started.verification_uri} and "
                      f"enter the code {started.user_code}")
                if started.verification_uri_complete:
                    _info(f"  or open: {started.verification_uri_complete}")
            session = _wait_for_login(conn, started.login_id, options.timeout)
    finally:
        if launcher is not None:
            import shutil

            shutil.rmtree(launcher, ignore_errors=True)
    account = f" as {session.account}" if session.account else ""
    _info(f"Logged in to {session.issuer}{account} (profile {session.profile})")
    return EXIT_OK


def _wait_for_login(conn: AgentConnection, login_id: str, timeout: float) -> SessionInfo:
    import time

    from compozy_client.errors import LoginFailed
    from compozy_client.protocol import Empty, LoginCancel, LoginWait, LoginWaitResult

    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                conn.call(LoginCancel(id=0, login_id=login_id), Empty)
                raise LoginFailed("login_timeout", f"no login completed within {timeout:.0f} s")
            wait = min(left, 25.0)
            result = conn.call(LoginWait(id=0, login_id=login_id, timeout=wait), LoginWaitResult,
                               timeout=wait + 10.0)
            if result.state == "done" and result.session is not None:
                return result.session
    except KeyboardInterrupt:
        conn.call(LoginCancel(id=0, login_id=login_id), Empty, timeout=5.0)
        raise


def _can_open_browser() -> bool:
    """False where a browser cannot be shown: over SSH or with no display."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform == "darwin" or sys.platform == "win32":
        return not os.environ.get("SSH_CONNECTION")
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


#: The page the browser opens: it sends the browser on to the authorization URL.
_LAUNCH_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="0; url={attribute}">
<title>Compozy login</title>
<script>window.location.replace({script});</script>
</head><body><p>Opening the login page&hellip; <a href="{attribute}">continue</a></p></body>
</html>
"""
LAUNCH_PAGE_NAME = "login.html"


def _browser_launcher(url: str) -> str | None:
    """A private directory holding a page that redirects to ``url``; None if ``url`` is
    not a web address.

    The browser is given this page's path, never the authorization URL: a process's
    argv is readable by every user of the machine (/proc/<pid>/cmdline), and the URL
    holds the login's ``state`` and loopback port, which another user could use to
    complete the login with their own account. The directory is 0700 (``mkdtemp``),
    under the runtime directory when there is one; the page is 0600; the caller
    removes both when the login ends.
    """
    import html
    import json
    import tempfile

    from compozy_client.paths import runtime_dir

    if not url.startswith(("https://", "http://")):
        return None
    base = runtime_dir()
    directory = tempfile.mkdtemp(prefix="compozy-login-",
                                 dir=base if base and os.path.isdir(base) else None)
    script = json.dumps(url).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    page = _LAUNCH_PAGE.format(attribute=html.escape(url, quote=True), script=script)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(os.path.join(directory, LAUNCH_PAGE_NAME), flags, 0o600), "w",
                   encoding="utf-8") as file:
        file.write(page)
    return directory


def _open_browser(launcher: str) -> bool:
    """Open the launcher page (see _browser_launcher) in the person's browser."""
    import webbrowser
    from urllib.parse import quote

    try:
        return webbrowser.open("file://" + quote(os.path.join(launcher, LAUNCH_PAGE_NAME)),
                               new=1)
    except webbrowser.Error:
        return False


def _login_with_api_key(profile: str) -> int:
    from compozy_client.errors import UsageError
    from compozy_client.protocol import SessionInfo, StoreApiKey

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ").strip()
    else:
        key = sys.stdin.read().strip()
    if not key:
        raise UsageError("no API key on standard input")
    if any(ch.isspace() for ch in key):
        raise UsageError("an API key has no spaces or line breaks; pass exactly one key")
    with _connect() as conn:
        session = conn.call(StoreApiKey(id=0, profile=profile, api_key=key), SessionInfo)
    where = "secure storage" if session.persisted else "memory (no secure storage available)"
    _info(f"Stored an API key for profile {profile} in the agent's {where} "
          f"(token id {session.token_id})")
    return EXIT_OK
