"""`compozy auth revoke TOKEN_ID`: revoke one session at its provider, then remove it."""

from __future__ import annotations

from compozy_client.commands.common import add_command
from compozy_client.commands.revoking import revoking

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth revoke 3f9a1c2e
  compozy auth revoke 3f9a1c2e --force   # forget it even if the provider is unreachable"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "revoke", "Revoke a specific token", EXAMPLES)
    parser.add_argument("token_id", metavar="TOKEN_ID", help="from `compozy auth list`")
    parser.add_argument("--force", action="store_true", help="forget it even if not revoked")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.protocol import Revoke

    return revoking(lambda force: Revoke(id=0, token_id=args.token_id, force=force),
                    args.force, f"session {args.token_id}")
