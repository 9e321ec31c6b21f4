"""What the commands share besides printing: the parser's shape, the config file, the
agent connection and the command's time budget, questions on the terminal. Imports only
os, sys and time at load time.
"""

from __future__ import annotations

import os
import sys
import time

from compozy_client.commands.output import warn

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from compozy_client.config import Config
    from compozy_client.connection import AgentConnection

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

#: When this command's time budget ends (``time.monotonic()``); set by start_budget().
_deadline: float | None = None


def start_budget(deadline: float | None) -> None:
    """Start the command's budget: it ends at ``deadline`` (``time.monotonic()``), by
    default the budget from now (30 s, or ``$COMPOZY_TIMEOUT``)."""
    global _deadline
    from compozy_client.connection import budget

    _deadline = deadline if deadline is not None else time.monotonic() + budget()


def add_command(subparsers: Any, name: str, help_text: str,
                examples: str | None) -> argparse.ArgumentParser:
    """A command's parser: its help, and its examples below the options."""
    import argparse

    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def profile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="the profile (default: $COMPOZY_PROFILE, else 'default')",
    )


def read_config(options: argparse.Namespace) -> Config:
    """The config file, read and validated once for every command, before the command
    does anything, whether it uses the file or not.

    A file another uid owns or others can write stops every command
    (:class:`~compozy_client.errors.UnsafeConfigFile`), as ssh refuses an
    unprotected key, and so does a malformed one (an unknown key, a wrong type:
    :class:`~compozy_client.errors.ConfigError`), the same way for every command
    (exit 1). A valid file is recorded for the token fast path
    (:mod:`compozy_client.configcheck`). A key in a file others can read is
    warned about on every command.
    """
    from compozy_client.chain import config_warnings
    from compozy_client.config import load_config_and_bytes
    from compozy_client.configcheck import record_checked

    config, raw = load_config_and_bytes()
    if raw is not None and config.path is not None:
        record_checked(config.path, raw)
    # `compozy auth status` lists them with its own (and in --json).
    if not getattr(options, "lists_config_warnings", False):
        for warning in config_warnings(config):
            warn(warning)
    return config


def command_config(options: argparse.Namespace) -> Config:
    """The config :func:`read_config` read (read now when a caller skipped it)."""
    from compozy_client.config import load_config

    config: Config | None = getattr(options, "config", None)
    return config if config is not None else load_config()


def connect(autostart: bool = True, *, budgeted: bool = False) -> AgentConnection:
    """A connection to the agent (started on demand unless ``autostart`` is False);
    ``budgeted``: every call ends by the command's deadline."""
    from compozy_client.connection import connect as connect_to_agent

    return connect_to_agent(autostart=autostart, deadline=_deadline if budgeted else None)


def time_left() -> float | None:
    """Seconds left of the command's budget, for the agent to answer within."""
    return None if _deadline is None else max(0.0, _deadline - time.monotonic())


def is_interactive() -> bool:
    return sys.stdin.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


def confirm(question: str) -> bool:
    if not is_interactive():
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def split_scopes(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [scope for value in values for scope in value.replace(",", " ").split()]


def add_passphrase_command(subparsers: Any, name: str, help_text: str, examples: str,
                           run: Callable[[argparse.Namespace], int]) -> None:
    """The parser of a command that sends the agent a passphrase (lock, unlock)."""
    parser = add_command(subparsers, name, help_text, examples)
    parser.add_argument("--passphrase-stdin", action="store_true",
                        help="read the passphrase from the first line of stdin")
    parser.set_defaults(handler=run)


def read_passphrase(from_stdin: bool, confirm: bool) -> str:
    """The passphrase from the terminal (never from argv), or from stdin when asked to."""
    from compozy_client.errors import UsageError

    if from_stdin:
        passphrase = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        except OSError:
            raise UsageError("no terminal to ask for the passphrase on; "
                             "pipe it in with --passphrase-stdin") from None
        passphrase = getpass.getpass("Passphrase: ")
        if confirm and getpass.getpass("Again: ") != passphrase:
            raise UsageError("the passphrases differ; nothing changed")
    if not passphrase:
        raise UsageError("the passphrase must not be empty")
    return passphrase
