"""Where the agent's socket and the config file live, and the rules they obey.

Standard library only, and no pathlib: the CLI's token fast path computes the
socket path on every call, so paths are plain strings here. What only the agent
and its starters need (the private socket directory, path variables made
absolute) lives in :mod:`compozy_client.agentpaths` and is still importable from
here: where bytecode is not cached, the fast path compiles this module on every
call. The runtime
directory rule follows ``platformdirs.user_runtime_dir`` (a test holds the two
together) so the agent, which uses platformdirs for its other directories, and
the CLI always agree.
"""

from __future__ import annotations

import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # the names __getattr__ (at the end) hands out
    from compozy_client.agentpaths import *  # noqa: F403

# Plain constants, no typing.Final: importing typing alone would double this path's cost.
SOCKET_ENV = "COMPOZY_AGENT_SOCK"
CONFIG_ENV = "COMPOZY_CONFIG"
APP_NAME = "compozy"
SOCKET_NAME = "agent.sock"


def runtime_dir() -> str | None:
    """The user's runtime directory, or None when the platform has none.

    Linux and the BSDs: ``$XDG_RUNTIME_DIR``, else ``/run/user/<uid>`` when it
    exists. macOS: ``~/Library/Caches/TemporaryItems`` as platformdirs says.
    """
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/TemporaryItems")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg:
        return xdg
    bsd = sys.platform.startswith(("freebsd", "openbsd", "netbsd"))
    candidate = f"{'/var/run/user' if bsd else '/run/user'}/{os.getuid()}"
    return candidate if os.path.isdir(candidate) else None


def default_socket_path() -> str:
    """``<runtime dir>/compozy/agent.sock``.

    With no runtime directory, ``$TMPDIR/runtime-<uid>`` stands in for it (the
    fallback platformdirs uses too); it lives in a shared temporary directory,
    so :func:`ensure_private_dir` refuses it when another user created it first.
    """
    base = runtime_dir()
    if base is None:
        tmp = os.environ.get("TMPDIR") or "/tmp"  # noqa: S108 - checked by ensure_private_dir
        base = os.path.join(tmp, f"runtime-{os.getuid()}")
    return os.path.join(base, APP_NAME, SOCKET_NAME)


def socket_path() -> str:
    """The socket the CLI talks to: ``$COMPOZY_AGENT_SOCK`` if set, else the default."""
    return os.environ.get(SOCKET_ENV, "").strip() or default_socket_path()


def config_path() -> str:
    """``$COMPOZY_CONFIG`` if set, else ``~/.compozy/config.yaml`` (the public docs' path)."""
    return os.environ.get(CONFIG_ENV, "").strip() or os.path.expanduser(
        "~/.compozy/config.yaml"
    )


#: The most of a config file read; a few KiB is a large one.
MAX_CONFIG_BYTES = 1 << 20


def open_config_file(path: str) -> int:
    """Open the config file for reading; raises ``OSError`` (``FileNotFoundError`` if missing).

    Without blocking: a FIFO someone planted at the path would otherwise hold
    the open until a writer came, before :func:`config_file_problem` could
    refuse it (and with it every command). ``O_NOCTTY``: a terminal named
    there does not become ours.
    """
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)


def config_file_problem(path: str, info: os.stat_result) -> str | None:
    """Why the config file at ``path`` (with ``fstat`` result ``info``) must not be used, or None.

    The file may set the issuer (where logins go) and an API key (what every
    tool sends), so as ssh does with its config and keys it must belong to you
    (or root, who can change what you run anyway) and be writable by nobody
    else. Its directory is not checked: a file put there by someone else would
    be theirs, and refused. It must be a regular file (a FIFO, device or
    directory there is refused; see :func:`open_config_file`).
    """
    uid = os.getuid()
    if info.st_uid not in (uid, 0):
        return (f"config file {path} belongs to uid {info.st_uid}, not to you (uid {uid}); "
                "it could set your issuer or API key, so it is not used. If it is yours, "
                f"run: chown {uid} {path}; otherwise remove it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"config file {path} is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):03o}); whoever can write it could set "
                f"your issuer or API key, so it is not used; run: chmod 600 {path}")
    if not stat.S_ISREG(info.st_mode):
        return (f"config file {path} is not a regular file; it is not used. "
                "Put your settings in a plain file there, or remove it")
    return None


if not TYPE_CHECKING:  # mypy sees the names themselves (above), not a catch-all

    def __getattr__(name: str) -> object:
        """The agent's path rules (compozy_client.agentpaths) under their names here,
        where the agent imports them from, loaded on first use."""
        if name in ("PATH_VARIABLES", "UnsafePathError", "absolute_path_variables",
                    "check_private_dir", "ensure_private_dir"):
            from compozy_client import agentpaths

            return getattr(agentpaths, name)
        raise AttributeError(f"module 'compozy_client.paths' has no attribute {name!r}")
