"""`compozy auth dpop-proof`: a DPoP proof (RFC 9449) for one request, for scripts.

The agent signs the proof with the session's key (which never leaves it), for
the method and URL given, bound to the session's current access token
(``ath``). Plain output is the proof alone; ``--json`` adds the access token it
is bound to, so a script sends the two together::

    Authorization: DPoP <access_token>
    DPoP: <proof>
"""

from __future__ import annotations

import sys

from compozy_client.commands.common import (
    EXIT_OK,
    add_command,
    connect,
    profile_option,
    time_left,
)

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth dpop-proof --method GET --url https://api.compozy.dev/v1/me --json
  compozy auth dpop-proof --method POST --url https://api.compozy.dev/v1/deploy \\
      --nonce "$NONCE"          # the server answered 401 with a DPoP-Nonce header

  answer=$(compozy auth dpop-proof --method GET --url "$URL" --json)
  curl -H "Authorization: DPoP $(jq -r .access_token <<<"$answer")" \\
       -H "DPoP: $(jq -r .proof <<<"$answer")" "$URL"

Each proof is good for one request: ask again for the next one."""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "dpop-proof",
                         "Print a DPoP proof for one request (profiles with token_binding: dpop)",
                         EXAMPLES)
    profile_option(parser)
    parser.add_argument("--method", required=True, metavar="METHOD",
                        help="the request's HTTP method (htm), e.g. GET")
    parser.add_argument("--url", required=True, metavar="URL",
                        help="the request's URL (htu; its query and fragment are dropped)")
    parser.add_argument("--nonce", metavar="NONCE",
                        help="the server's DPoP-Nonce, when it demanded one")
    parser.add_argument("--min-valid", type=float, default=0.0, metavar="SECONDS",
                        help="refresh first unless the token stays valid this long")
    parser.add_argument("--json", action="store_true",
                        help="print the proof with the access token it is bound to, as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile
    from compozy_client.protocol import DpopProof, DpopProofResult

    request = DpopProof(id=0, profile=resolve_profile(args.profile), htm=args.method,
                        htu=args.url, nonce=args.nonce, min_valid=args.min_valid)
    with connect(budgeted=True) as conn:
        request.timeout = time_left()
        result = conn.call(request, DpopProofResult)
    if args.json:
        import msgspec

        from compozy_client.commands.output import print_json

        # Every field, token_type included (the wire leaves out defaults such as Bearer).
        print_json(msgspec.structs.asdict(result))
        return EXIT_OK
    sys.stdout.write(result.proof + "\n")
    return EXIT_OK
