"""Which config file the full CLI validated, so the token fast path may trust it.

Every command validates the config file the same way before doing anything
(``config.load_config``: YAML, the schema, unknown keys refused). The token
fast path (``fasttoken.py``) cannot parse YAML without paying for PyYAML and
msgspec on every call, so it relies on this record instead: after the full CLI
validated a file, it writes the exact bytes it validated, with the file's path
and the client's version, to ``config-checked`` in the socket's private
directory. The fast path goes ahead only when the config file's bytes are
exactly those; anything else (an edit, another path, another version, no
record) goes to the full CLI, which validates, refuses a bad file with its
error, and records a good one.

A file holding ``api_key`` is never recorded (the fast path hands such files
to the full CLI anyway, and a key is copied nowhere). The record is not a
security boundary: the config file's own owner and mode are checked on every
call; a forged record could only make the fast path skip the schema check of
a file that is yours. It is still only written to, and read from, a
directory that is ours and not writable by others, and a record that is not
ours is ignored.

Standard library only, and cheap to import: the fast path uses it.
"""

from __future__ import annotations

import os
import stat

from compozy_client import __version__
from compozy_client.paths import MAX_CONFIG_BYTES, socket_path

RECORD_NAME = "config-checked"
_HEADER = b"compozy-config-checked "


def _record(path: str, raw: bytes) -> bytes:
    return _HEADER + __version__.encode() + b"\n" + os.fsencode(path) + b"\n" + raw


def private_directory() -> str | None:
    """The socket's directory, if it exists, is ours and is writable by nobody else."""
    directory = os.path.dirname(os.path.abspath(socket_path()))
    try:
        info = os.stat(directory)
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) \
            or not stat.S_ISDIR(info.st_mode):
        return None
    return directory


def was_checked(path: str, raw: bytes) -> bool:
    """Whether the full CLI validated exactly ``raw`` as the config file ``path``."""
    directory = private_directory()
    if directory is None:
        return False
    expected = _record(path, raw)
    try:
        fd = os.open(os.path.join(directory, RECORD_NAME),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode) \
                or info.st_size != len(expected):
            return False
        return os.read(fd, len(expected) + 1) == expected
    except OSError:
        return False
    finally:
        os.close(fd)


def record_checked(path: str, raw: bytes) -> None:
    """Record that ``raw``, read from ``path``, is a valid config file (best effort)."""
    if b"api_key" in raw or len(raw) > MAX_CONFIG_BYTES or was_checked(path, raw):
        return
    write_private_record(RECORD_NAME, _record(path, raw))


def write_private_record(name: str, data: bytes) -> None:
    """Write ``data`` to ``name`` in :func:`private_directory`, 0600 and atomically
    (best effort: a record is only ever a saving)."""
    directory = private_directory()
    if directory is None:
        return
    target = os.path.join(directory, name)
    temp = f"{target}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(temp, target)
    except OSError:
        try:  # noqa: SIM105 - contextlib would be one more import on the fast path
            os.unlink(temp)
        except OSError:
            pass
