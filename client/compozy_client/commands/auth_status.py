"""`compozy auth status`: who am I, where does my credential come from, how long is it good.

Asks a running agent (or starts one, unless a static API key wins anyway) and
prints the agent, the credential source, the profile's session and every
warning, or all of it as JSON (``--json``). Exit 1 when no usable credential.
When the agent holds sessions of two or more profiles, the text output opens
with one aligned line per session (profile, account, state, expiry), the state
coloured on a terminal.
"""

from __future__ import annotations

import contextlib
import sys

from compozy_client.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    add_command,
    command_config,
    connect,
    profile_option,
)
from compozy_client.commands.output import (
    print_json,
    span_from_now,
    table_lines,
    token_binding,
    warn,
    when,
)

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from compozy_client.chain import StaticCredential
    from compozy_client.protocol import SessionInfo, StatusResult


EXAMPLES = """examples:
  compozy auth status
  compozy auth status --profile staging --json"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "status", "Check authentication status", EXAMPLES)
    profile_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run, lists_config_warnings=True)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile, shadowing_warnings, static_credential
    from compozy_client.errors import AgentError, AgentUnavailable
    from compozy_client.protocol import Status, StatusResult

    profile = resolve_profile(args.profile)
    config = command_config(args)
    static = static_credential(config)
    status: StatusResult | None = None
    everyone: list[SessionInfo] = []
    agent_problem: str | None = None
    try:
        # With a static key winning, only look at an agent that already runs.
        with connect(autostart=static is None) as conn:
            status = conn.call(Status(id=0, profile=profile), StatusResult)
            if not args.json:
                # A second question, not profile=None in the first: a profile the
                # socket does not forward must stay an error, not read "not logged in".
                # The glance is extra: if it fails, the details below still stand.
                with contextlib.suppress(AgentError, AgentUnavailable):
                    everyone = conn.call(Status(id=0, profile=None), StatusResult).sessions
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
    if args.json:
        print_json(_status_document(profile, static, status, session, warnings, agent_problem,
                                    usable))
        return EXIT_OK if usable else EXIT_FAILURE
    for line in summary_lines(everyone, sys.stdout):
        sys.stdout.write(line + "\n")
    _print_status(profile, static, status, session, warnings, agent_problem)
    return EXIT_OK if usable else EXIT_FAILURE


#: Each state's word in the summary and its colour (SGR): green usable, yellow
#: usable but changing, red needs the person.
_SUMMARY_STATES = {
    "fresh": ("valid", "32"),
    "expiring": ("expiring", "33"),
    "refreshing": ("refreshing", "33"),
    "expired": ("expired", "33"),  # refreshed on next use
    "login_required": ("login required", "31"),
    "revoked": ("revoked", "31"),
}


def summary_lines(sessions: list[SessionInfo], stream: Any) -> list[str]:
    """One aligned line per session under a heading, sorted by profile, when the
    sessions span two or more profiles (with one, the details say it all); the
    state coloured when ``stream`` is a terminal and ``NO_COLOR`` is unset."""
    from compozy_client.safetext import one_line

    if len({s.profile for s in sessions}) < 2:
        return []
    rows = [["PROFILE", "ACCOUNT", "STATE", "EXPIRES"]]
    colors = [["", "", "", ""]]
    for s in sorted(sessions, key=lambda s: (s.profile, s.token_id)):
        word, code = _SUMMARY_STATES.get(s.state, (s.state, ""))
        account = s.account or ("API key" if s.kind == "api_key" else "-")
        expires = span_from_now(s.expires_at) if s.kind == "oidc" else "-"
        # Account and state come from the provider or the agent: escaped, capped.
        rows.append([one_line(s.profile, 64), one_line(account, 64), one_line(word, 32),
                     expires])
        colors.append(["", "", code, ""])
    return table_lines(rows, colors, stream)


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
            out.write(f"  Tokens: {token_binding(session)}\n")
            out.write(f"  Access token expires: {when(session.expires_at)}\n")
            if session.last_refresh_at is not None:
                outcome = session.last_refresh_outcome or "ok"
                out.write(f"  Last refresh: {when(session.last_refresh_at)}: {outcome}\n")
        if not session.persisted:
            out.write("  Not saved: this session ends when the agent stops\n")
    elif static is None:
        out.write(f"Profile {profile}: not logged in; run `compozy login"
                  f"{'' if profile == 'default' else f' --profile {profile}'}`\n")
    for warning in warnings:
        warn(warning)


def _state_text(state: str) -> str:
    return {
        "fresh": "valid",
        "expiring": "valid, refreshing soon",
        "refreshing": "refreshing",
        "expired": "access token expired; it is refreshed on next use",
        "login_required": "login required (the provider no longer accepts this session)",
        "revoked": "revoked",
    }.get(state, state)
