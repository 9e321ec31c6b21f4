"""What a config file parsed to, kept so the next reader of the same bytes needs no YAML.

Importing PyYAML costs about 12 ms, which every command and the agent's cold
start paid for a file that rarely changes (docs/performance.md, issue 15).
After :func:`compozy_client.config.parse_config` has parsed and validated a
file, it keeps the parsed data as JSON in ``config-parsed``, beside the
fast path's ``config-checked`` record (:mod:`compozy_client.configcheck`), in
the socket's private directory, together with the exact bytes it came from,
the file's path and the client's version. The next reader of exactly those
bytes at that path takes the data from there and validates it as always
(the schema, the rules); only the YAML parsing is skipped. Anything else (an
edit, another path or version, no record, a record that is not ours) parses
the file again.

A file holding ``api_key`` is never kept (a key is copied nowhere), and
neither is data JSON cannot carry unchanged (YAML dates, non-string keys).
As for ``config-checked``, the record is not a security boundary: it is
only read from, and written to, a directory that is ours and not writable by
others, and whoever can write there can edit the config file itself.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from compozy_client import __version__
from compozy_client.configcheck import private_directory, write_private_record
from compozy_client.paths import MAX_CONFIG_BYTES

RECORD_NAME = "config-parsed"
_HEADER = b"compozy-config-parsed "
#: The record holds the file (at most MAX_CONFIG_BYTES) and its data as JSON.
_MAX_RECORD_BYTES = 4 * MAX_CONFIG_BYTES


def _prefix(path: str, raw: bytes) -> bytes:
    return (_HEADER + __version__.encode() + b"\n" + os.fsencode(path) + b"\n"
            + str(len(raw)).encode() + b"\n" + raw)


def cached(path: str, raw: bytes) -> dict[str, Any] | None:
    """The data ``raw``, read from ``path``, parsed to when it was last parsed; None when
    no usable record holds exactly those bytes."""
    directory = private_directory()
    if directory is None:
        return None
    try:
        fd = os.open(os.path.join(directory, RECORD_NAME),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode) \
                or info.st_size > _MAX_RECORD_BYTES:
            return None
        record = b""
        while len(record) < info.st_size:
            chunk = os.read(fd, info.st_size - len(record))
            if not chunk:
                break
            record += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    prefix = _prefix(path, raw)
    if not record.startswith(prefix):
        return None
    try:
        data = json.loads(record[len(prefix):])
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def remember(path: str, raw: bytes, data: dict[str, Any]) -> None:
    """Keep what ``raw``, read from ``path``, parsed to (best effort; see the module)."""
    if b"api_key" in raw or len(raw) > MAX_CONFIG_BYTES:
        return
    try:
        encoded = json.dumps(data, allow_nan=False, separators=(",", ":"))
        if json.loads(encoded) != data:
            return  # JSON would change it (a YAML date, an integer key): parse it each time
    except (TypeError, ValueError, RecursionError):
        return
    write_private_record(RECORD_NAME, _prefix(path, raw) + encoded.encode())
