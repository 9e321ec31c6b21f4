"""`compozy-agent install-service` / `uninstall-service`: let the login session own the agent.

Linux: the systemd user units (``systemd/`` in the source tree) go to
``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config/systemd/user``).
macOS: the LaunchAgent plist (``launchd/``) goes to
``~/Library/LaunchAgents``. ``@COMPOZY_AGENT@`` becomes the command that runs
this installation of the agent, ``@HOME@`` the home directory.

Without ``--now`` the files are written (or removed) and the service-manager
commands are printed on standard output, one per line, for the user to run;
with ``--now`` they are run. Messages go to standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import plistlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Final

from compozy_client.paths import SOCKET_ENV, default_socket_path

SOCKET_UNIT: Final = "compozy-agent.socket"
SERVICE_UNIT: Final = "compozy-agent.service"
SYSTEMD_UNITS: Final = (SOCKET_UNIT, SERVICE_UNIT)
PLIST: Final = "dev.compozy.agent.plist"
LABEL: Final = "dev.compozy.agent"
PLACEHOLDER: Final = "@COMPOZY_AGENT@"
HOME_PLACEHOLDER: Final = "@HOME@"
#: The state directory the service unit pins (Environment=COMPOZY_STATE_DIR=...).
STATE_DIR_IN_UNIT: Final = (".local", "state", "compozy")

_EPILOG = """examples:
  compozy-agent install-service          # write the files, print the commands that start it
  compozy-agent install-service --now    # and run them
  compozy-agent uninstall-service --now  # stop it and remove the files

Linux: ~/.config/systemd/user/compozy-agent.{socket,service} ($XDG_CONFIG_HOME honoured);
logs: journalctl --user -u compozy-agent
macOS: ~/Library/LaunchAgents/dev.compozy.agent.plist; logs: ~/Library/Logs/compozy-agent.log
"""


class InstallError(Exception):
    """The service files cannot be installed here."""


@dataclass
class Plan:
    """What a subcommand does: files it wrote or will remove, and the commands."""

    files: list[Path] = field(default_factory=list)
    #: Printed without --now, run with --now (stopping at the first failure).
    commands: list[list[str]] = field(default_factory=list)
    #: Run quietly before ``commands`` with --now only; failures are expected.
    quiet_first: list[list[str]] = field(default_factory=list)


def template(kind: str, name: str) -> str:
    """A unit or plist template: packaged in the wheel, or from the source tree."""
    packaged = resources.files("compozy_agent") / "service_files" / kind / name
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source = Path(__file__).resolve().parents[2] / kind / name
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InstallError(
            f"the {kind} template {name} is missing from this installation "
            f"(looked in {packaged} and {source})"
        ) from None


def agent_command() -> list[str]:
    """The command that runs this installation of the agent, as absolute paths.

    The console script beside this interpreter (a virtualenv's, pipx's, the
    system's), else this interpreter running the module. Not whichever
    ``compozy-agent`` comes first on PATH: that may be another installation.
    """
    python = os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink
    beside = os.path.join(os.path.dirname(python), "compozy-agent")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [beside]
    return [python, "-m", "compozy_agent"]


def systemd_quote(word: str) -> str:
    """One command-line word for ``ExecStart=`` (systemd.service(5), "Command lines").

    ``%`` is a specifier and ``$`` a variable there, so both are doubled;
    anything beyond a plain path character is double-quoted, C-style.
    """
    escaped = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%$+=:,./-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(text: str, command: list[str]) -> str:
    """A unit template with its ``ExecStart=`` placeholder filled in."""
    return text.replace(PLACEHOLDER, " ".join(systemd_quote(word) for word in command))


def render_plist(text: str, command: list[str], home: str) -> bytes:
    """The plist with the command as separate ``ProgramArguments`` items."""
    plist = plistlib.loads(text.encode())
    arguments: list[str] = []
    for item in plist["ProgramArguments"]:
        arguments += command if item == PLACEHOLDER else [item]
    plist["ProgramArguments"] = arguments
    for key in ("StandardOutPath", "StandardErrorPath"):
        if key in plist:
            plist[key] = plist[key].replace(HOME_PLACEHOLDER, home)
    return plistlib.dumps(plist)


def systemd_dir() -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``, the user units systemd reads first."""
    config_home = os.environ.get("XDG_CONFIG_HOME", "").strip()
    base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
    return base / "systemd" / "user"


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / PLIST


def platform() -> str:
    """``linux`` (systemd) or ``darwin`` (launchd)."""
    if sys.platform == "darwin":
        return "darwin"
    if sys.platform.startswith("linux"):
        return "linux"
    raise InstallError(
        f"no service manager support on {sys.platform}; use `eval \"$(compozy-agent --sh)\"` "
        "in your shell's startup file instead"
    )


def install(system: str) -> Plan:
    """Write the files for ``system``; the plan holds them and the commands."""
    command = agent_command()
    if system == "darwin":
        home = str(Path.home())
        target = plist_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path.home() / "Library" / "Logs").mkdir(parents=True, exist_ok=True)
        target.write_bytes(render_plist(template("launchd", PLIST), command, home))
        domain = f"gui/{os.getuid()}"
        # bootstrap refuses a label that is loaded: unload an older install first.
        return Plan([target], [["launchctl", "bootstrap", domain, str(target)]],
                    [["launchctl", "bootout", f"{domain}/{LABEL}"]])
    directory = systemd_dir()
    directory.mkdir(parents=True, exist_ok=True)
    plan = Plan()
    for name in SYSTEMD_UNITS:
        target = directory / name
        target.write_text(render_unit(template("systemd", name), command), encoding="utf-8")
        plan.files.append(target)
    # ReadWritePaths= exempts the state directory from ProtectHome=read-only
    # only if it exists; the sandboxed agent could not create it.
    Path.home().joinpath(*STATE_DIR_IN_UNIT).mkdir(mode=0o700, parents=True, exist_ok=True)
    plan.commands = [["systemctl", "--user", "daemon-reload"],
                     ["systemctl", "--user", "enable", "--now", SOCKET_UNIT]]
    return plan


def uninstall(system: str, now: bool) -> Plan:
    """The files to remove and the commands that stop the service.

    With ``now`` the commands run first (``systemctl disable`` needs the unit
    files); without it the files go at once, ``enable``'s symlink with them,
    and the printed commands stop what is still loaded.
    """
    if system == "darwin":
        return Plan([plist_path()], [["launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"]])
    directory = systemd_dir()
    files = [directory / name for name in SYSTEMD_UNITS]
    if now:
        return Plan(files, [["systemctl", "--user", "disable", "--now", *SYSTEMD_UNITS]])
    return Plan([*files, directory / "sockets.target.wants" / SOCKET_UNIT],
                [["systemctl", "--user", "stop", *SYSTEMD_UNITS]])


def build_parser(command: str) -> argparse.ArgumentParser:
    verb = "Install" if command == "install-service" else "Remove"
    parser = argparse.ArgumentParser(
        prog=f"compozy-agent {command}",
        description=f"{verb} the systemd user units (Linux) or the launchd agent (macOS) "
        "that start compozy-agent with your login session.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--now", action="store_true",
                        help="also run the systemctl/launchctl commands instead of printing them")
    return parser


def main(argv: list[str]) -> int:
    """``argv[0]`` is ``install-service`` or ``uninstall-service``."""
    options = build_parser(argv[0]).parse_args(argv[1:])
    try:
        system = platform()
        if argv[0] == "install-service":
            plan = install(system)
            for path in plan.files:
                _say(f"wrote {path}")
            _warn_about_socket_override(system)
            if options.now:
                return _run(plan)
            _say("to start it now, run (or use --now):")
            _print(plan)
            return 0
        plan = uninstall(system, options.now)
        code = _run(plan) if options.now else 0
        for path in plan.files:
            if path.is_symlink() or path.exists():
                path.unlink()
                _say(f"removed {path}")
        # systemd still has the removed units loaded until it reloads.
        reload = [["systemctl", "--user", "daemon-reload"]] if system == "linux" else []
        if options.now:
            return code or _run(Plan(commands=reload))
        _say("to stop what is still running, run:")
        _print(Plan(commands=plan.commands + reload))
        return 0
    except (InstallError, OSError) as exc:
        _say(f"compozy-agent: {exc}")
        return 1


def _warn_about_socket_override(system: str) -> None:
    explicit = os.environ.get(SOCKET_ENV, "").strip()
    if system == "linux" and explicit and os.path.abspath(explicit) != default_socket_path():
        _say(f"note: {SOCKET_ENV}={explicit} points elsewhere; the socket systemd holds is "
             f"{default_socket_path()}: unset {SOCKET_ENV} so the CLI finds it")


def _print(plan: Plan) -> None:
    for command in plan.commands:
        print(shlex.join(command))


def _run(plan: Plan) -> int:
    """Run the plan's commands, stopping at the first failure; 1 if one failed."""
    for command in plan.quiet_first:
        with contextlib.suppress(OSError):
            subprocess.run(command, check=False, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    for command in plan.commands:
        line = shlex.join(command)
        _say(f"+ {line}")
        try:
            returncode = subprocess.run(command, check=False).returncode
        except FileNotFoundError:
            _say(f"compozy-agent: {command[0]} not found")
            return 1
        if returncode != 0:
            _say(f"compozy-agent: `{line}` failed (exit {returncode})")
            return 1
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)
