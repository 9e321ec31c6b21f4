"""`compozy auth revoke-all`: revoke every session of every profile (asks first)."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_FAILURE, add_command, confirm, is_interactive
from compozy_client.commands.output import info
from compozy_client.commands.revoking import revoking

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth revoke-all
  compozy auth revoke-all --yes          # no question asked (needed without a terminal)"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "revoke-all", "Revoke all active tokens", EXAMPLES)
    parser.add_argument("--force", action="store_true", help="forget them even if not revoked")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.errors import UsageError
    from compozy_client.protocol import RevokeAll

    if not args.yes:
        if not is_interactive():
            raise UsageError("revoke-all needs --yes when not run from a terminal")
        if not confirm("Revoke every session of every profile?"):
            info("Nothing revoked.")
            return EXIT_FAILURE
    return revoking(lambda force: RevokeAll(id=0, force=force), args.force, "every session")
