"""`compozy`: parse the command line, forward it to the agent, print the answer.

Data goes to stdout, messages to stderr. Exit codes: 0 success, 1 a handled
failure (not logged in, provider unreachable, ...), 2 a usage error.
``NO_COLOR`` (https://no-color.org) and non-terminals get no colour.

Each command is a module of :mod:`compozy_client.commands`, named after it
(``compozy auth status`` is ``commands/auth_status.py``); this module builds the
parser from them and runs one.

The module imports only sys and time at load time: ``compozy auth token``
goes through :mod:`compozy_client.fasttoken` first and most calls never load the
rest.

``compozy auth token`` and ``compozy auth refresh`` answer within one budget
(30 s, or ``$COMPOZY_TIMEOUT``) counted from the command's start, agent start-up
included; they tell the agent how long they wait, so its answer, which says what
is slow, comes first (docs/architecture.md, "Deadlines"). The budget is kept in
:mod:`compozy_client.commands.common`.
"""

from __future__ import annotations

import sys
import time

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import NoReturn


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the ``compozy`` console script."""
    started = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    deadline = None
    if args[:2] == ["auth", "token"]:
        try:
            from compozy_client import fasttoken

            # One budget: what the fast path used is gone for the full CLI too.
            deadline = started + fasttoken.budget()
            code = fasttoken.run(args[2:], deadline)
        except KeyboardInterrupt:
            sys.exit(130)  # see finish()
        if code is not None:
            sys.exit(code)
    finish(args, deadline)


def finish(args: list[str], deadline: float | None) -> NoReturn:
    """Run the full CLI and exit with its code (the ``compozy`` launcher calls this
    after its own token fast path)."""
    try:
        code = run(args, deadline)
    except KeyboardInterrupt:
        # Ctrl-C outside a command's own handling (parsing, the config file): the
        # person's choice, not a failure to diagnose; 128 + SIGINT, no traceback.
        code = 130
    sys.exit(code)


def run(argv: list[str], deadline: float | None = None) -> int:
    """Run one command; returns the exit code. ``deadline`` (``time.monotonic()``) ends
    the command's budget; by default it is the budget from now."""
    if argv[:1] == ["__complete"]:
        # The completion scripts' helper (commands/completion.py): hidden, no config
        # warnings, no agent started, nothing asked.
        from compozy_client.commands import completion

        return completion.complete(build_parser(), argv[1:], completion.dynamic_values)
    from compozy_client.commands.common import EXIT_FAILURE, EXIT_USAGE, read_config, start_budget
    from compozy_client.commands.output import error, report
    from compozy_client.errors import CompozyError, UsageError

    start_budget(deadline)

    parser = build_parser()
    options = parser.parse_args(argv)
    if not hasattr(options, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        options.config = read_config(options)
        code: int = options.handler(options)
    except UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except CompozyError as exc:
        report(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    return code


EXAMPLES = """examples:
  compozy login                      # sign in with your browser
  compozy auth status                # who am I, and how long is my token good for
  compozy auth token                 # print an access token (for scripts)
  compozy exec -- ./deploy.sh        # run a command that asks for tokens as it needs them
  FLYZT_API_KEY=... compozy deploy   # CI/CD: an API key, no login needed
  source <(compozy completion bash)  # Tab completion (also zsh, fish)"""
AUTH_EXAMPLES = """examples:
  compozy auth status
  compozy auth list --json
  compozy auth token --scope compozy:read
  compozy auth revoke 3f9a1c2e
  compozy auth log                   # who got tokens lately
  compozy auth setup-git --host git.example.com   # git gets its tokens from compozy
  compozy auth lock                  # hand out nothing until `compozy auth unlock`"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command adds its own parser, in help order."""
    import argparse

    from compozy_client import __version__
    from compozy_client.commands import (
        auth_dpop_proof,
        auth_kube_token,
        auth_list,
        auth_lock,
        auth_log,
        auth_refresh,
        auth_revoke,
        auth_revoke_all,
        auth_setup_docker,
        auth_setup_git,
        auth_setup_kube,
        auth_status,
        auth_token,
        auth_unlock,
        completion,
        login,
        logout,
    )
    from compozy_client.commands import exec as exec_command
    from compozy_client.commands.common import add_command

    parser = argparse.ArgumentParser(
        prog="compozy",
        description="Compozy Cloud command-line authentication, served by compozy-agent.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"compozy {__version__}")
    top = parser.add_subparsers(title="commands", metavar="COMMAND")
    login.add_parser(top)
    logout.add_parser(top)
    exec_command.add_parser(top)

    auth = add_command(top, "auth", "Manage authentication: status, sessions, tokens",
                       AUTH_EXAMPLES)
    auth_sub = auth.add_subparsers(title="commands", metavar="COMMAND")
    auth.set_defaults(handler=lambda _o: _usage(auth))
    for command in (auth_status, auth_list, auth_refresh, auth_revoke, auth_revoke_all,
                    auth_lock, auth_unlock, auth_log, auth_token, auth_setup_git,
                    auth_dpop_proof):
        command.add_parser(auth_sub)
    # Other tools' plug-in points (README "Use it from other tools").
    for command in (auth_kube_token, auth_setup_kube, auth_setup_docker):
        command.add_parser(auth_sub)
    completion.add_parser(top)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    from compozy_client.commands.common import EXIT_USAGE

    parser.print_help(sys.stderr)
    return EXIT_USAGE
