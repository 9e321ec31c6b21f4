"""`compozy auth token`: print a valid access token to stdout.

Most calls never reach this module: ``compozy auth token`` goes through
:mod:`compozy_client.fasttoken` first (only os, socket and json imported), and
anything unusual there (no agent yet, an error to explain, a key in the config
file) falls through to here, which redoes the work with proper messages.
"""

from __future__ import annotations

import sys

from compozy_client.commands.common import (
    EXIT_OK,
    add_command,
    command_config,
    connect,
    profile_option,
    split_scopes,
    time_left,
)

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  curl -H "Authorization: Bearer $(compozy auth token)" https://api.compozy.dev/v1/me
  compozy auth token --profile prod --min-valid 300
  compozy auth token --scope compozy:read --audience https://api.compozy.dev
  compozy auth token --force-new     # the last token was refused with 401
  compozy auth token --json          # with token_type (Bearer or DPoP) and expiry

A profile whose tokens are DPoP-bound (token_binding: dpop) is refused here
without --json: such a token works only with a proof from the agent, so
`Authorization: Bearer $(compozy auth token)` could only fail later. Use
`compozy auth dpop-proof --json` (token and proof together)."""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "token", "Print a valid access token to stdout", EXAMPLES)
    profile_option(parser)
    parser.add_argument(
        "--scope", action="append", metavar="SCOPE", help="ask for a narrower token (repeatable)"
    )
    parser.add_argument("--audience", metavar="URI", help="ask for a token for this API (RFC 8707)")
    parser.add_argument(
        "--min-valid", type=float, default=0.0, metavar="SECONDS",
        help="refresh first unless the token stays valid this long",
    )
    parser.add_argument(
        "--force-new", action="store_true",
        help="get a token issued now (within 5 s of the last forced one: that one)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print the token with its type (Bearer or DPoP), expiry and session as JSON",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile, static_credential
    from compozy_client.protocol import Token, TokenResult

    static = static_credential(command_config(args))
    if static is not None:
        if args.json:
            import msgspec

            from compozy_client.commands.output import print_json

            print_json(msgspec.structs.asdict(TokenResult(access_token=static.api_key,
                                                          kind="api_key")))
            return EXIT_OK
        sys.stdout.write(static.api_key + "\n")
        return EXIT_OK
    request = Token(
        id=0,
        profile=resolve_profile(args.profile),
        scope=split_scopes(args.scope),
        audience=args.audience,
        min_valid=args.min_valid,
        force_new=args.force_new,
        # With --json the caller sees token_type and can tell a DPoP token (RFC 9449).
        accept_dpop=args.json,
    )
    with connect(budgeted=True) as conn:
        request.timeout = time_left()
        result = conn.call(request, TokenResult)
    if args.json:
        import msgspec

        from compozy_client.commands.output import print_json

        # Every field, token_type included (the wire leaves out defaults such as Bearer).
        print_json(msgspec.structs.asdict(result))
        return EXIT_OK
    sys.stdout.write(result.access_token + "\n")
    return EXIT_OK
