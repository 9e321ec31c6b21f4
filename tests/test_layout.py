"""The layout docs/architecture.md describes holds: rooms import only downwards, and each
`compozy` command lives in a module named after it."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

from compozy_client import cli

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent" / "compozy_agent"
COMMANDS = ROOT / "client" / "compozy_client" / "commands"

#: The session rooms, lowest first: each may import those before it, never those after.
AGENT_ROOMS = ["scheduler", "sessions", "tokens", "revocation", "logins", "manager"]
#: What every command module may share; nothing else in commands/ is imported by another.
SHARED_COMMAND_MODULES = {"common", "output", "revoking", "waiting"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at load time or inside a function or TYPE_CHECKING."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_each_agent_room_imports_no_room_above_it() -> None:
    for position, room in enumerate(AGENT_ROOMS):
        imported = imported_modules(AGENT / f"{room}.py")
        above = {f"compozy_agent.{higher}" for higher in AGENT_ROOMS[position + 1:]}
        assert not imported & above, f"{room}.py imports {sorted(imported & above)}"


def test_the_scheduler_knows_nothing_of_sessions_logins_or_revocation() -> None:
    imported = {name for name in imported_modules(AGENT / "scheduler.py")
                if name.startswith("compozy_agent")}
    assert imported <= {"compozy_agent.clock", "compozy_agent.clock.Clock"}, imported


def test_no_command_module_imports_another_command() -> None:
    modules = {path.stem for path in COMMANDS.glob("*.py")} - {"__init__"}
    for path in COMMANDS.glob("*.py"):
        imported = {name.split(".")[2] for name in imported_modules(path)
                    if name.startswith("compozy_client.commands.")}
        assert imported <= SHARED_COMMAND_MODULES & modules, f"{path.name} imports {imported}"


def commands_of(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, object]:
    """Every leaf command under ``parser`` ("auth revoke-all"), with its handler."""
    found: dict[str, object] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands_of(sub, f"{prefix}{name} ") or
                             {f"{prefix}{name}": sub.get_default("handler")})
    return found


def test_every_command_is_the_module_named_after_it() -> None:
    """`compozy auth revoke-all` is commands/auth_revoke_all.py: its parser, its run."""
    found = commands_of(cli.build_parser())
    # Every module of commands/ but the shared ones is a command, and the other way round.
    shared = {"__init__", *SHARED_COMMAND_MODULES}
    modules = {path.stem for path in (Path(cli.__file__).parent / "commands").glob("*.py")}
    assert "login" in found and "auth revoke-all" in found, found
    assert {c.replace(" ", "_").replace("-", "_") for c in found} == modules - shared, found
    for command, handler in found.items():
        module = importlib.import_module(
            "compozy_client.commands." + command.replace(" ", "_").replace("-", "_"))
        assert handler is module.run, command
