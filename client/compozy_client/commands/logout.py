"""`compozy logout`: revoke and remove a profile's session (or every profile's)."""

from __future__ import annotations

from compozy_client.commands.common import add_command, profile_option
from compozy_client.commands.revoking import revoking

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy logout                     # revoke and forget the default profile's session
  compozy logout --profile staging
  compozy logout --all --force       # every profile, even if the provider is unreachable"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "logout", "Log out and remove stored credentials", EXAMPLES)
    profile_option(parser)
    parser.add_argument("--all", action="store_true", help="every profile")
    parser.add_argument(
        "--force", action="store_true",
        help="forget locally even when the provider cannot be reached to revoke",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile
    from compozy_client.protocol import Logout

    profile = resolve_profile(args.profile)
    what = "every profile's session" if args.all else f"profile {profile}'s session"
    return revoking(
        lambda force: Logout(id=0, profile=profile, all=args.all, force=force),
        args.force, what,
    )
