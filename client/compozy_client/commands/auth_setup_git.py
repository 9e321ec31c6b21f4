"""`compozy auth setup-git`: make git ask compozy for its credentials for some hosts.

Writes to the user's global git config (``git config --global``, so
``GIT_CONFIG_GLOBAL`` is honoured), per host, what ``gh auth setup-git`` writes::

    [credential "https://git.example.com"]
        helper =
        helper = compozy [--profile NAME]
        useHttpPath = true      # only when a rule for the host names a path

The empty ``helper =`` first clears the helpers configured before it for that
URL (``credential.helper store`` in ``~/.gitconfig``, say), so no storing helper
keeps a copy of our short-lived token, and none answers in our place.
``--unset`` removes the host's helpers (and the ``useHttpPath`` it set).
"""

from __future__ import annotations

import os

from compozy_client.commands.common import add_command, profile_option

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from compozy_client.config import Config


EXAMPLES = """examples:
  compozy auth setup-git --host git.example.com
  compozy auth setup-git --host git.example.com --profile work
  compozy auth setup-git                     # every host the config's rules name
  compozy auth setup-git --host git.example.com --unset"""

HELPER = "compozy"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "setup-git",
        "Configure git to use compozy as the credential helper for a host", EXAMPLES)
    parser.add_argument(
        "--host", action="append", metavar="HOST",
        help="a git host (git.example.com[:port]), or a URL for plain http to this machine "
             "(http://127.0.0.1:8080); repeat for more (default: the hosts of the config's "
             "rules)")
    profile_option(parser)
    parser.add_argument("--unset", action="store_true", help="remove compozy from those hosts")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.commands.output import info, warn

    config: Config | None = args.config
    hosts = [credential_url(host) for host in (args.host or [])]
    if not hosts:
        hosts = [credential_url(host) for host in _rule_hosts(config)]
    if not hosts:
        from compozy_client.errors import UsageError

        raise UsageError("name the git host: compozy auth setup-git --host git.example.com "
                         "(or add a rule for it to the config file's rules:)")
    if args.profile and not _shell_safe(args.profile):
        from compozy_client.errors import UsageError

        # git runs the helper line through the shell.
        raise UsageError("--profile: setup-git takes profile names of letters, digits, "
                         "'.', '_' and '-'; name others in a rule of the config file")
    helper = HELPER + (f" --profile {args.profile}" if args.profile else "")
    for url in hosts:
        section = f"credential.{url}"
        if args.unset:
            _git_config("--unset-all", f"{section}.helper", missing_ok=True)
            if _needs_http_path(config, url):
                _git_config("--unset-all", f"{section}.useHttpPath", missing_ok=True)
            info(f"git no longer asks compozy for {url}")
            continue
        # As `gh auth setup-git`: replace every helper for the URL with an empty one
        # (clearing those inherited), then add ours.
        _git_config("--replace-all", f"{section}.helper", "")
        _git_config("--add", f"{section}.helper", helper)
        if _needs_http_path(config, url):
            _git_config("--replace-all", f"{section}.useHttpPath", "true")
        info(f"git now asks compozy for {url}"
             + (f" (profile {args.profile})" if args.profile else ""))
    if not args.unset and not _on_path("git-credential-compozy"):
        warn("git-credential-compozy is not on PATH, so git will not find the helper; "
             "add the directory compozy is installed in to PATH")
    return 0


def credential_url(host: str) -> str:
    """``https://HOST`` for a host; a URL is kept when it is https, or http to this
    machine (the only plain http the helper answers). Raises UsageError otherwise."""
    from compozy_client.errors import UsageError
    from compozy_client.rules import split_url

    text = host.strip()
    if "://" not in text:
        text = "https://" + text
    parsed = split_url(text)
    if parsed is None or parsed[2] not in ("", "/"):
        raise UsageError(f"--host {host!r}: give a host name (git.example.com[:port]) or "
                         "a URL without a path")
    scheme, name, _ = parsed
    if scheme == "http" and name.rsplit(":", 1)[0] not in _LOOPBACK_HOSTS:
        raise UsageError(f"--host {host!r}: the helper sends tokens over https only (plain "
                         "http only to this machine)")
    return f"{scheme}://{name}"


def _rule_hosts(config: Config | None) -> list[str]:
    hosts: list[str] = []
    for rule in config.rules if config is not None else []:
        if rule.match.host is not None and rule.match.host not in hosts:
            hosts.append(rule.match.host)
    return hosts


def _needs_http_path(config: Config | None, url: str) -> bool:
    """Whether a rule for this URL's host names a path: git then has to send it."""
    host = url.split("://", 1)[1]
    return any(rule.match.host is not None and rule.match.host.lower() == host
               and rule.match.path is not None
               for rule in (config.rules if config is not None else []))


def _git_config(*args: str, missing_ok: bool = False) -> None:
    import subprocess

    from compozy_client.errors import CompozyError

    try:
        done = subprocess.run(["git", "config", "--global", *args], capture_output=True,
                              text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise CompozyError("git is not installed (or not on PATH)") from None
    # git config --unset-all exits 5 when there was nothing to unset.
    if done.returncode != 0 and not (missing_ok and done.returncode == 5):
        raise CompozyError(f"git config --global {' '.join(args[:2])} failed: "
                         f"{done.stderr.strip() or f'exit {done.returncode}'}")


def _shell_safe(name: str) -> bool:
    return all(char.isascii() and (char.isalnum() or char in "._-") for char in name) \
        and not name.startswith("-")


def _on_path(program: str) -> bool:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if directory and os.access(os.path.join(directory, program), os.X_OK):
            return True
    return False
