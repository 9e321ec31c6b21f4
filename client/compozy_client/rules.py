"""Profile rules: which profile (and audience) a request for a host, URL or API uses.

The config file's ``rules:`` list (:mod:`compozy_client.config`) lets git on
host A and kubectl on cluster B get the right session with no global "current
account"::

    rules:
      - match: {host: git.example.com, path: team}   # git: host[:port], and path with
        profile: work                                 #   credential.useHttpPath
        bearer: true                                  # the host takes Authorization: Bearer
      - match: {url_prefix: "https://api.example.com/v2/"}
        profile: work
        audience: https://api.example.com             # ask for a token for this API
      - match: {audience: "https://k8s.example.com"}
        profile: ops

Each rule matches on exactly one of:

- ``host``: a host as git sends it (the name, lower case, with ``:port`` when the
  URL has one), optionally narrowed by ``path``, a prefix of the repository path
  in whole segments (``team`` matches ``team/app.git``, not ``teamwork/app``);
  git sends the path only with ``credential.useHttpPath`` (``compozy auth
  setup-git`` sets it for hosts whose rules name a path). A URL matches a host
  rule by its host and path. A path with a ``.`` or ``..`` segment (``%2e%2e``
  too) is below no path: the server resolves it elsewhere.
- ``url_prefix``: an ``http(s)://`` URL prefix; scheme and host compare
  case-insensitively, the path by whole segments unless the prefix ends in ``/``
  (``https://api.example.com`` never matches ``https://api.example.com.evil.test``).
  Userinfo, query and fragment are ignored.
- ``audience``: an API identifier (RFC 8707 resource), compared exactly.

The first rule that matches wins, in file order. A rule gives a ``profile``
and/or an ``audience``; what the caller named explicitly wins over the rule,
and the rule over ``$COMPOZY_PROFILE`` and ``default`` (a host's rule is more
specific than a shell's setting). ``bearer`` and ``username`` only matter to the
git credential helper (:mod:`compozy_client.gitcredential`).

Standard library only, and nothing of it at import: the git credential helper
imports this on its hot path.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Protocol

    # Read-only views of compozy_client.config's RuleConfig (not imported: msgspec).
    class RuleMatchSpec(Protocol):
        @property
        def host(self) -> str | None: ...
        @property
        def path(self) -> str | None: ...
        @property
        def url_prefix(self) -> str | None: ...
        @property
        def audience(self) -> str | None: ...

    class RuleSpec(Protocol):
        @property
        def match(self) -> RuleMatchSpec: ...
        @property
        def profile(self) -> str | None: ...
        @property
        def audience(self) -> str | None: ...
        @property
        def bearer(self) -> bool: ...
        @property
        def username(self) -> str | None: ...

    class HasRules(Protocol):
        @property
        def rules(self) -> Sequence[RuleSpec]: ...


_DEFAULT_PORTS = {"https": "443", "http": "80"}


class RuleMatch:
    """What the first matching rule says: the profile and audience to ask for, and how
    git should send the token (``bearer``, ``username``); ``index`` is the rule's place."""

    __slots__ = ("audience", "bearer", "index", "profile", "username")

    def __init__(self, index: int, profile: str | None, audience: str | None,
                 bearer: bool = False, username: str | None = None) -> None:
        self.index = index
        self.profile = profile
        self.audience = audience
        self.bearer = bearer
        self.username = username

    def __repr__(self) -> str:
        return (f"RuleMatch(index={self.index}, profile={self.profile!r}, "
                f"audience={self.audience!r}, bearer={self.bearer}, username={self.username!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleMatch):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def split_url(url: str) -> tuple[str, str, str] | None:
    """(scheme, host, path) of an ``http(s)`` URL, normalised for comparison: scheme and
    host lower case, userinfo and a default port dropped, the path without query or
    fragment and starting with ``/``. None for anything else."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, remainder = rest[:end], rest[end:]
    host = authority.rpartition("@")[2].lower()  # RFC 3986 3.2.1: userinfo ends at the last @
    if host.endswith(":" + _DEFAULT_PORTS[scheme]):
        host = host[: -len(_DEFAULT_PORTS[scheme]) - 1]
    if not host or any(c in host for c in " \\\t\r\n"):
        return None
    path = remainder
    for stop in "?#":
        path = path.partition(stop)[0]
    return scheme, host, path or "/"


def _climbs(path: str) -> bool:
    """Whether ``path`` has a ``.`` or ``..`` segment, in any form a server may resolve:
    ``%2e`` (git sends the path percent-decoded once, curl sends the URL as written,
    and the server decodes and resolves it: ``team/%2e%2e/other`` reaches ``other``),
    ``..;param`` (servlet containers drop path parameters first), or between
    backslashes (which some servers read as ``/``). Such a path is not below any
    prefix it seems to start with (RFC 3986 section 5.2.4)."""
    for segment in path.replace("\\", "/").split("/"):
        if segment.partition(";")[0].lower().replace("%2e", ".") in (".", ".."):
            return True
    return False


def _path_within(path: str, prefix: str) -> bool:
    """Whether repository path ``path`` is ``prefix`` or below it, in whole segments;
    a segment's ``.git`` suffix is ignored (``team/app`` covers ``team/app.git/info/refs``).
    A path with dot segments is below no prefix (:func:`_climbs`)."""
    if _climbs(path):
        return False
    wanted = [_bare(segment) for segment in prefix.split("/") if segment]
    seen = [_bare(segment) for segment in path.split("/") if segment]
    return seen[: len(wanted)] == wanted


def _bare(segment: str) -> str:
    return segment[:-4] if segment.endswith(".git") else segment


def _url_within(url: tuple[str, str, str], prefix: tuple[str, str, str]) -> bool:
    if url[:2] != prefix[:2]:
        return False
    path, wanted = url[2], prefix[2]
    if wanted != "/" and _climbs(path):
        return False
    if wanted.endswith("/"):
        return path.startswith(wanted)
    return path == wanted or path.startswith(wanted + "/")


def match_rule(
    config: HasRules,
    *,
    url: str | None = None,
    host: str | None = None,
    path: str | None = None,
    audience: str | None = None,
) -> RuleMatch | None:
    """The first of ``config.rules`` that matches what is known of the request, or None.

    ``host`` and ``path`` are what git sends (``path`` only with useHttpPath);
    ``url`` is a request URL (an ``http(s)`` URL; anything else matches no host or
    URL rule); ``audience`` the API asked for. A rule with a ``path`` never matches
    a request without one.
    """
    parsed = split_url(url) if url is not None else None
    if host is not None:
        host = host.lower()
    for index, rule in enumerate(config.rules):
        wanted = rule.match
        if wanted.host is not None:
            candidates = []
            if host is not None:
                candidates.append((host, path))
            if parsed is not None:
                candidates.append((parsed[1], parsed[2]))
            matched = any(
                seen_host == wanted.host.lower()
                and (wanted.path is None or (seen_path is not None
                                             and _path_within(seen_path, wanted.path)))
                for seen_host, seen_path in candidates
            )
        elif wanted.url_prefix is not None:
            prefix = split_url(wanted.url_prefix)
            matched = parsed is not None and prefix is not None and _url_within(parsed, prefix)
        elif wanted.audience is not None:
            matched = audience is not None and audience == wanted.audience
        else:
            matched = False
        if matched:
            return RuleMatch(index, rule.profile, rule.audience or (
                audience if wanted.audience is not None else None),
                rule.bearer, rule.username)
    return None


def rule_problem(rule: RuleSpec) -> str | None:
    """What is wrong with one rule, for the config file's error message; None when fine."""
    wanted = rule.match
    keys = [name for name in ("host", "url_prefix", "audience") if getattr(wanted, name)]
    if len(keys) != 1:
        return "match needs exactly one of host, url_prefix, audience"
    if wanted.path is not None and wanted.host is None:
        return "match.path narrows a host and needs match.host"
    if wanted.host is not None:
        host = wanted.host
        if "/" in host or "@" in host or not host.strip() or host != host.strip():
            return "match.host is a host name, with :port if not the default (no scheme, path)"
    if wanted.url_prefix is not None and split_url(wanted.url_prefix) is None:
        return "match.url_prefix must be an http:// or https:// URL with a host"
    if not rule.profile and not rule.audience:
        return "a rule needs a profile or an audience"
    if wanted.audience is not None and rule.audience is not None:
        return "a rule matching an audience names a profile, not another audience"
    if rule.username is not None and (not rule.username or any(
            c in rule.username for c in "\r\n\0")):
        return "username must be one line"
    return None


__all__ = ["RuleMatch", "match_rule", "rule_problem", "split_url"]
