"""The config file's ``rules:``, kept pre-parsed so a credential helper reads them without YAML.

git runs its credential helper before its requests; reading the rules with
PyYAML and msgspec costs several times a bare interpreter's start
(bench/cli_cost.py). So the first helper run that parses the config writes its
rules to ``rules.cache`` beside the agent socket, together with a copy of the
exact config bytes they came from, and later runs use the cache only while the
config file holds those very bytes (compared byte for byte, so an edit is seen
at once, whatever the file times say).

Trust is that of the config file: the cache is used only from the socket's
directory when that directory passes :func:`~compozy_client.peercheck.socket_path_problem`
(ours, not writable by others), and only when the cache file itself is a
regular file of our uid that nobody else can write; it is written 0600 and
renamed into place. It holds no secret (a config with a key is never cached:
the helper then takes the library path, as the token fast path does).

Format (version 1)::

    compozy-rules 1
    <length of the config bytes>
    <the config bytes>
    <one line per rule: host, path, url_prefix, match audience, profile, audience,
     bearer (0/1), username, tab-separated; an empty field is none>

Rules whose values hold a tab, a line break or are empty strings are not
cached (the helper keeps parsing the config). Standard library only.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from compozy_client.rules import RuleSpec

CACHE_NAME = "rules.cache"
_MAGIC = b"compozy-rules 1"
_FIELDS = 8


class CachedMatch:
    __slots__ = ("audience", "host", "path", "url_prefix")

    def __init__(self, host: str | None, path: str | None, url_prefix: str | None,
                 audience: str | None) -> None:
        self.host = host
        self.path = path
        self.url_prefix = url_prefix
        self.audience = audience


class CachedRule:
    """One rule read back from the cache (the shape :func:`~compozy_client.rules.match_rule`
    reads)."""

    __slots__ = ("audience", "bearer", "match", "profile", "username")

    def __init__(self, match: CachedMatch, profile: str | None, audience: str | None,
                 bearer: bool, username: str | None) -> None:
        self.match = match
        self.profile = profile
        self.audience = audience
        self.bearer = bearer
        self.username = username


class CachedRules:
    """What :func:`~compozy_client.rules.match_rule` takes: an object with ``rules``."""

    __slots__ = ("rules",)

    def __init__(self, rules: list[CachedRule]) -> None:
        self.rules = rules


def cache_path(socket: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(socket)), CACHE_NAME)


def read_cache(socket: str, config_bytes: bytes) -> CachedRules | None:
    """The rules cached for exactly ``config_bytes``, or None (no cache, another config,
    a file not to be trusted, anything unexpected)."""
    from compozy_client.peercheck import socket_path_problem

    if socket_path_problem(socket) is not None:
        return None
    path = cache_path(socket)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not _ours(info):
            return None
        data = file.read(4 * len(config_bytes) + 65536)
    magic, _, rest = data.partition(b"\n")
    length, _, rest = rest.partition(b"\n")
    if magic != _MAGIC or not length.isdigit() or int(length) != len(config_bytes):
        return None
    if rest[: len(config_bytes)] != config_bytes or rest[len(config_bytes):][:1] != b"\n":
        return None
    rules = []
    for line in rest[len(config_bytes) + 1:].split(b"\n"):
        if not line:
            continue
        try:
            fields = [value.decode() or None for value in line.split(b"\t")]
        except UnicodeDecodeError:
            return None
        if len(fields) != _FIELDS or fields[6] not in ("0", "1"):
            return None
        host, path_prefix, url_prefix, match_audience, profile, audience, bearer, user = fields
        rules.append(CachedRule(CachedMatch(host, path_prefix, url_prefix, match_audience),
                                profile, audience, bearer == "1", user))
    return CachedRules(rules)


def write_cache(socket: str, config_bytes: bytes, rules: Sequence[RuleSpec]) -> None:
    """Cache ``rules`` (parsed from ``config_bytes``) beside ``socket``; quietly nothing when
    the directory is not there or not ours, or a value cannot be written in the format."""
    from compozy_client.peercheck import socket_path_problem

    directory = os.path.dirname(os.path.abspath(socket))
    if b"api_key" in config_bytes or socket_path_problem(socket) is not None \
            or not os.path.isdir(directory):
        return
    lines = [_MAGIC, str(len(config_bytes)).encode(), config_bytes]
    for rule in rules:
        values = [rule.match.host, rule.match.path, rule.match.url_prefix, rule.match.audience,
                  rule.profile, rule.audience, None, rule.username]
        if any(v is not None and (v == "" or any(c in v for c in "\t\n\r")) for v in values):
            return
        encoded = [(v or "").encode() for v in values]
        encoded[6] = b"1" if rule.bearer else b"0"
        lines.append(b"\t".join(encoded))
    path = cache_path(socket)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as file:
            file.write(b"\n".join(lines) + b"\n")
        os.replace(temporary, path)
    except OSError:
        import contextlib

        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _ours(info: os.stat_result) -> bool:
    return (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
