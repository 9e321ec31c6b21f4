"""`compozy completion bash|zsh|fish`: print a shell completion script; and the hidden
``compozy __complete SHELL WORD... CURRENT`` that script runs for every Tab.

The scripts are thin, as gh's (cobra's) are: they hand the words typed so far to
``__complete``, which reads the answer off the real parser (commands, options,
an option's choices) and so never goes stale. Values that only exist at run time
come from :func:`dynamic_values`: profile names from the agent's session list,
if an agent already answers within ``AGENT_ANSWER_LIMIT``, plus the config
file's profiles; token ids (for ``auth revoke``) from the agent alone.
``__complete`` never starts an agent, never asks anything, and prints nothing
but candidates; an option whose value is a path gets the shell's own file
completion (the answer ``:files``).

Every value offered is one the shell may insert as typed: the scripts do not
quote, so a profile name or token id with other characters than letters,
digits and ``._@+-`` is left out rather than inserted raw into a command line
(``SAFE_VALUE``). Descriptions (zsh and fish show them) quote the provider's
account name, so they are made printable first (``safetext.one_line``).

``compozy-agent completion SHELL`` uses the same machinery for the agent's
options (see ``compozy_agent/__main__.py``). Imports only sys at load time;
``compozy auth token``'s fast path never loads this module.
"""

from __future__ import annotations

import sys

from compozy_client.commands.common import EXIT_OK, EXIT_USAGE, add_command

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    #: A value to offer, and what it is ("" for nothing to say).
    Candidate = tuple[str, str]

#: The shells a completion script is printed for.
SHELLS = ("bash", "zsh", "fish")
#: The hidden subcommand the scripts run.
COMPLETE_COMMAND = "__complete"
#: The answer that asks the shell for its own file-name completion.
FILES = ":files"
#: How long a Tab waits for a running agent's session list (it is never started).
AGENT_ANSWER_LIMIT = 0.5
#: What a value may be to be offered (the scripts insert values unquoted).
SAFE_VALUE = r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,127}"
#: Which options and arguments take a profile name or a token id.
VALUE_KINDS = {"profile": "profile", "forward_profile": "profile", "token_id": "token_id"}

EXAMPLES = """examples:
  source <(compozy completion bash)      # in ~/.bashrc
  source <(compozy completion zsh)       # in ~/.zshrc, after compinit
  compozy completion fish > ~/.config/fish/completions/compozy.fish"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "completion", "Print a shell completion script",
                         EXAMPLES)
    parser.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(script(args.shell, "compozy"))
    return EXIT_OK


# --------------------------------------------------------------------------
# The scripts. PROG is the command completed; FUNC a shell-safe name for it.

_BASH = r"""# bash completion for PROG: source <(PROG completion bash)
_FUNC_complete() {
    local current=${COMP_WORDS[COMP_CWORD]} answer
    local IFS=$'\n'
    answer=$(PROG __complete bash "${COMP_WORDS[@]:1:COMP_CWORD-1}" "$current" 2>/dev/null) \
        || return 0
    if [[ $answer == ":files" ]]; then
        compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -f -- "$current"))
    else
        COMPREPLY=($answer)
    fi
}
# -o nosort keeps the parser's order (bash 4.4 and later).
complete -o nosort -F _FUNC_complete PROG 2>/dev/null || complete -F _FUNC_complete PROG
"""

_ZSH = r"""#compdef PROG
# zsh completion for PROG: source <(PROG completion zsh) after compinit, or save it as
# _PROG in a directory of $fpath.
_FUNC() {
    local answer
    local -a candidates
    answer=$(PROG __complete zsh "${(@)words[2,CURRENT-1]}" "${words[CURRENT]}" 2>/dev/null) \
        || return 1
    if [[ $answer == ":files" ]]; then
        _files
        return
    fi
    candidates=("${(@f)answer}")
    (( ${#candidates} )) && [[ -n $answer ]] && _describe -V 'PROG' candidates
}
if [[ ${funcstack[1]} == _FUNC || ${funcstack[1]} == _PROG ]]; then  # autoloaded from $fpath
    _FUNC "$@"
else
    compdef _FUNC PROG
fi
"""

_FISH = r"""# fish completion for PROG: PROG completion fish > ~/.config/fish/completions/PROG.fish
function __FUNC_complete
    set -l typed (commandline -opc)
    set -l current (commandline -ct)
    set -l answer (PROG __complete fish $typed[2..-1] $current 2>/dev/null)
    or return
    if test "$answer" = ":files"
        __fish_complete_path $current
        return
    end
    printf '%s\n' $answer
end
complete -c PROG -f -a '(__FUNC_complete)'
"""


def script(shell: str, prog: str) -> str:
    """The completion script of ``prog`` (``compozy`` or ``compozy-agent``) for ``shell``."""
    template = {"bash": _BASH, "zsh": _ZSH, "fish": _FISH}[shell]
    return template.replace("FUNC", prog.replace("-", "_")).replace("PROG", prog)


# --------------------------------------------------------------------------
# __complete: what may come next, read off the parser.


def complete(parser: argparse.ArgumentParser, argv: list[str],
             values: Callable[[str], list[Candidate]]) -> int:
    """``__complete SHELL WORD... CURRENT``: print the candidates for CURRENT, one per
    line, formatted for SHELL; :data:`FILES` when a path is expected."""
    if len(argv) < 2 or argv[0] not in SHELLS:
        print(f"usage: {parser.prog} {COMPLETE_COMMAND} {{{','.join(SHELLS)}}} "
              "[WORD...] CURRENT", file=sys.stderr)
        return EXIT_USAGE
    shell, typed, current = argv[0], argv[1:-1], argv[-1]
    if shell == "bash":
        # bash splits `--profile=dev` at `=` (COMP_WORDBREAKS) and replaces only
        # what follows it: `=` is not a word, and a lone `=` is an empty value.
        typed = [word for word in typed if word != "="]
        current = "" if current == "=" else current
    found = candidates(parser, typed, current, values)
    if found is None:
        sys.stdout.write(FILES + "\n")
        return EXIT_OK
    lines = []
    for value, description in found:
        if shell == "zsh" and description:
            lines.append(f"{value.replace(':', chr(92) + ':')}:{description}")
        elif shell == "fish" and description:
            lines.append(f"{value}\t{description}")
        else:
            lines.append(value)
    sys.stdout.write("".join(line + "\n" for line in lines))
    return EXIT_OK


def candidates(parser: argparse.ArgumentParser, typed: list[str], current: str,
               values: Callable[[str], list[Candidate]]) -> list[Candidate] | None:
    """What may replace ``current`` after the words ``typed``; None for a file name.

    Walks ``typed`` as argparse would: into subcommands, past options and their
    values, counting positional arguments.
    """
    import argparse

    expecting: argparse.Action | None = None  # an option whose value comes next
    positionals_seen = 0
    options_ended = False  # after `--`
    for word in typed:
        if expecting is not None:
            expecting = None
        elif word == "--" and not options_ended:
            options_ended = True
        elif word.startswith("-") and word != "-" and not options_ended:
            action = parser._option_string_actions.get(word)
            if action is not None and action.nargs != 0:
                expecting = action
        elif (commands := _subcommands(parser)) is not None and word in commands.choices:
            parser = commands.choices[word]
            positionals_seen = 0
            options_ended = False
        else:
            positionals_seen += 1
    if expecting is not None:
        return _values_of(expecting, current, values)
    if current.startswith("-") and not options_ended:
        if current.startswith("--") and "=" in current:
            name, partial = current.split("=", 1)
            action = parser._option_string_actions.get(name)
            if action is None or action.nargs == 0:
                return []
            given = _values_of(action, partial, values) or []
            return [(f"{name}={value}", description) for value, description in given]
        return _options(parser, current, long_only=False)
    found: list[Candidate] | None = []
    commands = _subcommands(parser)
    if commands is not None:
        if positionals_seen == 0:
            described = {choice.dest: choice.help or "" for choice in commands._choices_actions}
            found = [(name, described.get(name, "")) for name in commands.choices
                     if name.startswith(current) and name in described]
    else:
        arguments = [action for action in parser._actions
                     if not action.option_strings and action.help != argparse.SUPPRESS]
        if positionals_seen < len(arguments):
            found = _values_of(arguments[positionals_seen], current, values)
    if found == [] and not current and not options_ended:
        # Nothing else may come here: what the command can still be told.
        return _options(parser, current, long_only=True)
    return found


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _options(parser: argparse.ArgumentParser, current: str, long_only: bool) -> list[Candidate]:
    import argparse

    found = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for name in action.option_strings:
            if name.startswith(current) and (name.startswith("--") or not long_only):
                found.append((name, _describe(action.help or "")))
    return found


def _values_of(action: argparse.Action, current: str,
               values: Callable[[str], list[Candidate]]) -> list[Candidate] | None:
    """What ``action`` (an option or argument) may be given that starts with ``current``."""
    import re

    if action.choices is not None:
        return [(str(choice), "") for choice in action.choices
                if str(choice).startswith(current)]
    kind = VALUE_KINDS.get(action.dest)
    if kind is None:
        return None if action.metavar == "PATH" else []
    seen: set[str] = set()
    found = []
    for value, description in values(kind):
        if value.startswith(current) and value not in seen and re.fullmatch(SAFE_VALUE, value):
            seen.add(value)
            found.append((value, _describe(description)))
    return found


def _describe(text: str) -> str:
    """A description as one printable line (it may quote the provider's account name)."""
    from compozy_client.safetext import one_line

    return one_line(text, 80).replace("\t", " ")


# --------------------------------------------------------------------------
# Values known only at run time.


def dynamic_values(kind: str) -> list[Candidate]:
    """Profile names (``kind`` "profile") or token ids ("token_id") to offer.

    The agent's sessions, if an agent already answers within AGENT_ANSWER_LIMIT
    (none is started); profile names also from the config file. Anything that
    fails gives fewer candidates, never an error: this runs on every Tab.
    """
    sessions = _agent_sessions()
    if kind == "token_id":
        return [(s.token_id, f"{s.profile}: {s.account or s.kind}") for s in sessions]
    found = [(s.profile, s.account or "") for s in sessions]
    found += [(profile, "in the config file") for profile in _config_profiles()]
    return found


def _agent_sessions() -> list[Any]:
    from compozy_client.connection import connect
    from compozy_client.errors import CompozyError
    from compozy_client.protocol import List, ListResult

    try:
        with connect(timeout=AGENT_ANSWER_LIMIT, autostart=False) as conn:
            return list(conn.call(List(id=0), ListResult).sessions)
    except (CompozyError, OSError, ValueError):
        return []


def _config_profiles() -> list[str]:
    from compozy_client.config import load_config
    from compozy_client.errors import CompozyError

    try:
        return list(load_config().profiles)
    except (CompozyError, OSError, ValueError):
        return []
