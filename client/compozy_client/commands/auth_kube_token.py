"""`compozy auth kube-token`: kubectl's exec credential plugin (an ExecCredential on stdout).

Most calls never reach this module: the ``compozy`` launcher runs
:mod:`compozy_client.kubetoken` first, and only ``--help`` or an unknown flag
come here, to be parsed properly.
"""

from __future__ import annotations

from compozy_client.commands.common import add_command, profile_option

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """kubectl runs it (set up with `compozy auth setup-kube --cluster NAME`);
by hand it prints the ExecCredential kubectl would read:
  compozy auth kube-token --profile prod --audience https://k8s.example.com
It never starts a login: a session that needs one is one line naming the
`compozy login` to run, and exit 1."""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "kube-token",
                         "kubectl exec credential plugin: print an ExecCredential", EXAMPLES)
    profile_option(parser)
    parser.add_argument("--audience", metavar="URI",
                        help="ask for a token for this API (RFC 8707), e.g. the cluster's")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client import kubetoken

    return kubetoken.emit(args.profile, args.audience)
