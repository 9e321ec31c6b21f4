"""`compozy auth refresh`: refresh a session's access token now (by profile or token id)."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_command, connect, profile_option, time_left
from compozy_client.commands.output import info, when

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth refresh                 # the default profile
  compozy auth refresh --profile dev
  compozy auth refresh 3f9a1c2e        # by token id (from `compozy auth list`)"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "refresh", "Manually refresh authentication token", EXAMPLES)
    profile_option(parser)
    parser.add_argument("token_id", nargs="?", metavar="TOKEN_ID", help="a session's token id")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile
    from compozy_client.errors import UsageError
    from compozy_client.protocol import Refresh, RefreshResult

    if args.token_id and args.profile:
        raise UsageError("give either --profile or a TOKEN_ID, not both")
    request = Refresh(id=0, profile=resolve_profile(args.profile), token_id=args.token_id)
    with connect(budgeted=True) as conn:
        request.timeout = time_left()
        result = conn.call(request, RefreshResult)
    info(f"Refreshed session {result.token_id} (profile {result.profile}); "
         f"the access token expires {when(result.expires_at)}")
    return EXIT_OK
