"""`compozy auth log`: recent token requests from the agent's audit log: who asked, what
they got."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_command, connect, profile_option
from compozy_client.commands.output import info, print_json, print_table

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth log                       # the 20 most recent token requests
  compozy auth log --limit 100 --profile prod
  compozy auth log --issued              # only tokens handed out (failures kept apart)
  compozy auth log --json | jq '.entries[] | select(.outcome != "issued")'"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "log",
                         "Show recent token requests: who asked, what they got", EXAMPLES)
    profile_option(parser)
    parser.add_argument("--limit", type=int, default=20, metavar="N",
                        help="show the N most recent (default 20, at most 1000)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--issued", dest="outcome", action="store_const", const="issued",
                       help="only requests that got a token")
    which.add_argument("--failed", dest="outcome", action="store_const", const="failed",
                       help="only requests that got none")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.protocol import AuditLog, AuditLogResult
    from compozy_client.safetext import for_terminal

    with connect() as conn:
        result = conn.call(AuditLog(id=0, limit=max(0, min(args.limit, 1000)),
                                    profile=args.profile, outcome=args.outcome),
                           AuditLogResult)
    if args.json:
        print_json(result)
        return EXIT_OK
    if not result.entries:
        info("No token requests yet.")
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
    print_table(rows)
    if result.path:
        failed = f"; failed requests: {for_terminal(result.failed_path)}" \
            if result.failed_path else ""
        info(f"(the full log is {for_terminal(result.path)}{failed})")
    return EXIT_OK
