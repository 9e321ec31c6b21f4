"""`compozy auth list`: every session the agent holds, as a table or JSON."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_command, connect
from compozy_client.commands.output import info, print_json, print_table, token_binding, when

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth list
  compozy auth list --json | jq '.sessions[].token_id'"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "list", "List all active sessions", EXAMPLES)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.protocol import List, ListResult

    with connect() as conn:
        result = conn.call(List(id=0), ListResult)
    if args.json:
        print_json(result)
        return EXIT_OK
    if not result.sessions:
        info("No sessions. Log in with `compozy login`.")
        return EXIT_OK
    def relative(epoch: float | None) -> str:
        return when(epoch).split(" (")[0] if epoch else "-"

    rows = [["TOKEN ID", "PROFILE", "KIND", "ACCOUNT", "ISSUER", "STATE", "EXPIRES", "CREATED",
             "LAST USED", "TOKENS", "SCOPES"]]
    for s in result.sessions:
        rows.append([
            s.token_id, s.profile, s.kind, s.account or "-", s.issuer or "-", s.state,
            relative(s.expires_at), relative(s.created_at), relative(s.last_used_at),
            token_binding(s, short=True), " ".join(s.scopes) or "-",
        ])
    print_table(rows)
    return EXIT_OK
