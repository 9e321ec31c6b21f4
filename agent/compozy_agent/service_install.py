"""`compozy-agent install-service` / `uninstall-service`: let the login session own the agent.

Linux: the systemd user units (``systemd/`` in the source tree) go to
``$XDG_CONFIG_HOME/systemd/user``. macOS: the LaunchAgent plist (``launchd/``)
goes to ``~/Library/LaunchAgents``. ``@COMPOZY_AGENT@`` becomes the installed
executable. Without ``--now`` the commands that enable them are printed, not run.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Final

SYSTEMD_UNITS: Final = ("compozy-agent.socket", "compozy-agent.service")
PLIST: Final = "dev.compozy.agent.plist"
LABEL: Final = "dev.compozy.agent"


def template(kind: str, name: str) -> str:
    """A unit or plist template: packaged with the wheel, or from the source tree."""
    packaged = resources.files("compozy_agent") / "service_files" / kind / name
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source = Path(__file__).resolve().parents[2] / kind / name
    return source.read_text(encoding="utf-8")


def agent_command() -> str:
    """The installed executable, or this interpreter running the module."""
    found = shutil.which("compozy-agent")
    if found:
        return os.path.realpath(found)
    return f"{shlex.quote(sys.executable)} -m compozy_agent"


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def systemd_dir() -> Path:
    return _config_home() / "systemd" / "user"


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / PLIST


def render(text: str) -> str:
    return text.replace("@COMPOZY_AGENT@", agent_command()).replace("@HOME@", str(Path.home()))


def render_plist(text: str) -> bytes:
    """The plist with the real command as separate ProgramArguments items."""
    plist = plistlib.loads(text.encode())
    arguments = plist["ProgramArguments"]
    plist["ProgramArguments"] = [*shlex.split(agent_command()), *arguments[1:]]
    plist["StandardErrorPath"] = plist["StandardErrorPath"].replace("@HOME@", str(Path.home()))
    return plistlib.dumps(plist)


def install(platform: str) -> tuple[list[Path], list[list[str]]]:
    """Write the files; return them and the commands that enable them."""
    if platform == "darwin":
        target = plist_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(render_plist(template("launchd", PLIST)))
        domain = f"gui/{os.getuid()}"
        return [target], [["launchctl", "bootstrap", domain, str(target)]]
    directory = systemd_dir()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SYSTEMD_UNITS:
        target = directory / name
        target.write_text(render(template("systemd", name)), encoding="utf-8")
        written.append(target)
    return written, [["systemctl", "--user", "daemon-reload"],
                     ["systemctl", "--user", "enable", "--now", "compozy-agent.socket"]]


def uninstall(platform: str) -> tuple[list[Path], list[list[str]]]:
    """The commands that stop the service first, and the files to remove after."""
    if platform == "darwin":
        return [plist_path()], [["launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"]]
    return ([systemd_dir() / name for name in SYSTEMD_UNITS],
            [["systemctl", "--user", "disable", "--now", "compozy-agent.socket",
              "compozy-agent.service"]])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"compozy-agent {argv[0]}",
        description="Install (or remove) the systemd user units or the launchd agent that "
        "start compozy-agent with your login session.",
        epilog="examples:\n  compozy-agent install-service          # write the files, print "
        "the commands\n  compozy-agent install-service --now    # and run them\n"
        "  compozy-agent uninstall-service --now",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--now", action="store_true", help="also run the commands")
    options = parser.parse_args(argv[1:])
    platform = "darwin" if sys.platform == "darwin" else "linux"
    if argv[0] == "install-service":
        files, commands = install(platform)
        for path in files:
            print(f"wrote {path}", file=sys.stderr)
        return _run_or_print(commands, options.now)
    files, commands = uninstall(platform)
    code = _run_or_print(commands, options.now) if options.now else 0
    for path in files:
        if path.exists():
            path.unlink()
            print(f"removed {path}", file=sys.stderr)
    if not options.now:
        _run_or_print(commands, False)
    return code


def _run_or_print(commands: list[list[str]], now: bool) -> int:
    for command in commands:
        line = shlex.join(command)
        if not now:
            print(line)
            continue
        print(f"+ {line}", file=sys.stderr)
        if subprocess.run(command, check=False).returncode != 0:
            print(f"compozy-agent: `{line}` failed", file=sys.stderr)
            return 1
    return 0
