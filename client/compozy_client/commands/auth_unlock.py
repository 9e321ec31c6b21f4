"""`compozy auth unlock`: unlock the agent with the passphrase it was locked with."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_passphrase_command, connect, read_passphrase
from compozy_client.commands.output import info

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth unlock
  pass show compozy-lock | compozy auth unlock --passphrase-stdin"""


def add_parser(subparsers: Any) -> None:
    add_passphrase_command(subparsers, "unlock",
                           "Unlock the agent with the passphrase it was locked with", EXAMPLES,
                           run)


def run(args: argparse.Namespace) -> int:
    import time

    from compozy_client.errors import AgentBusy
    from compozy_client.protocol import Empty, Unlock

    passphrase = read_passphrase(args.passphrase_stdin, confirm=False)
    with connect(autostart=False) as conn:
        for attempt in range(3):
            try:
                conn.call(Unlock(id=0, passphrase=passphrase), Empty)
                break
            except AgentBusy as exc:
                # After a wrong passphrase the agent checks the next attempt only after a
                # delay, and refuses earlier ones unchecked: wait it out here, not there.
                wait = _retry_after(exc.details)
                if wait is None or attempt == 2:
                    raise
                info(f"A wrong passphrase was given before: the agent checks this one in "
                     f"{wait:.1f} s; waiting")
                time.sleep(wait)
    info("Agent unlocked")
    return EXIT_OK


def _retry_after(details: dict[str, str]) -> float | None:
    """The agent's ``retry_after_seconds`` when it is a sane wait (at most a minute)."""
    try:
        wait = float(details.get("retry_after_seconds", ""))
    except ValueError:
        return None
    return wait if 0.0 <= wait <= 60.0 else None
