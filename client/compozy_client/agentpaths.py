"""The path rules the agent and whoever starts it need, and the token fast path does not.

The socket's private directory (:func:`ensure_private_dir`, :func:`check_private_dir`)
and the path variables an agent must read as its caller did
(:func:`absolute_path_variables`). :mod:`compozy_client.paths` still offers each under
its name, loading this module when one is first used: the fast path loads ``paths`` on
every call, where bytecode is not cached compiles it, and needs none of these.
"""

from __future__ import annotations

import os
import stat

from compozy_client.paths import CONFIG_ENV, SOCKET_ENV

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["PATH_VARIABLES", "UnsafePathError", "absolute_path_variables",
           "check_private_dir", "ensure_private_dir"]

#: Variables naming one path each, which the agent must read as the CLI did.
PATH_VARIABLES = (
    SOCKET_ENV, CONFIG_ENV, "COMPOZY_STATE_DIR", "XDG_RUNTIME_DIR", "XDG_STATE_HOME",
    "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME",
)


class UnsafePathError(Exception):
    """A directory that would hold the socket is not private to this user."""


def ensure_private_dir(directory: str) -> None:
    """Create ``directory`` 0700 if missing; refuse one that is not private to us.

    Refused: a directory owned by another user, group or world writable, or
    not a directory at all (a symlink to one included).
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        ensure_private_dir(os.path.dirname(directory))
        os.mkdir(directory, 0o700)
    check_private_dir(directory)


def check_private_dir(directory: str) -> None:
    """Raise :class:`UnsafePathError` unless ``directory`` is ours and not writable by others."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafePathError(
            f"{directory} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); "
            "refusing to use it for the agent socket"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"{directory} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run: chmod 700 {directory}"
        )


def absolute_path_variables(environ: MutableMapping[str, str]) -> None:
    """Make each of :data:`PATH_VARIABLES` in ``environ`` absolute, against the current directory.

    For a process about to leave that directory (the agent works in ``/``):
    a relative ``COMPOZY_STATE_DIR=state`` must keep naming the same place.
    """
    for name in PATH_VARIABLES:
        value = environ.get(name, "").strip()
        if value and not os.path.isabs(value):
            environ[name] = os.path.abspath(value)
