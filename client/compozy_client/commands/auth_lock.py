"""`compozy auth lock`: the agent hands out nothing until unlocked with the same passphrase."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_passphrase_command, connect, read_passphrase
from compozy_client.commands.output import info

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth lock                      # asks for a passphrase twice, on the terminal
  compozy auth unlock
  pass show compozy-lock | compozy auth lock --passphrase-stdin"""


def add_parser(subparsers: Any) -> None:
    add_passphrase_command(subparsers, "lock",
                           "Lock the agent: no token is handed out until unlocked", EXAMPLES, run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.protocol import Empty, Lock

    passphrase = read_passphrase(args.passphrase_stdin, confirm=True)
    with connect() as conn:
        conn.call(Lock(id=0, passphrase=passphrase), Empty)
    info("Agent locked: no token is handed out until `compozy auth unlock`")
    return EXIT_OK
