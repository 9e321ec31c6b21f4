"""Profile rules: the config's ``rules:`` section, how a rule matches, and get_token(url=...)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from compozy_client import async_get_token, get_token
from compozy_client.config import load_config
from compozy_client.errors import ConfigError
from compozy_client.rules import RuleMatch, match_rule
from support.fake_agent import answering_socket

RULES = """\
rules:
  - match: {host: git.example.com, path: team/app}
    profile: app
    bearer: true
    username: oauth2
  - match: {host: git.example.com}
    profile: work
  - match: {host: "127.0.0.1:8080"}
    profile: local
  - match: {url_prefix: "https://api.example.com/v2"}
    profile: work
    audience: https://api.example.com
  - match: {url_prefix: "https://files.example.com/"}
    audience: https://files.example.com
  - match: {audience: "https://k8s.example.com"}
    profile: ops
"""


def config_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def rules(tmp_path: Path) -> Any:
    return load_config(str(config_with(tmp_path, RULES)))


@pytest.mark.parametrize(
    ("ask", "profile", "audience"),
    [
        ({"host": "git.example.com"}, "work", None),
        ({"host": "GIT.Example.com", "path": "other/repo.git"}, "work", None),
        ({"host": "git.example.com", "path": "team/app.git"}, "app", None),
        ({"host": "git.example.com", "path": "team/app/sub"}, "app", None),
        # Whole segments: team/application is not team/app.
        ({"host": "git.example.com", "path": "team/application.git"}, "work", None),
        ({"host": "127.0.0.1:8080"}, "local", None),
        ({"url": "https://git.example.com/team/app.git/info/refs"}, "app", None),
        ({"url": "https://user@GIT.example.com:443/x"}, "work", None),
        ({"url": "https://api.example.com/v2"}, "work", "https://api.example.com"),
        ({"url": "https://API.example.com/v2/items?x=1"}, "work", "https://api.example.com"),
        ({"url": "https://files.example.com/a/b"}, None, "https://files.example.com"),
        ({"audience": "https://k8s.example.com"}, "ops", "https://k8s.example.com"),
    ],
)
def test_the_first_matching_rule_gives_profile_and_audience(
    rules: Any, ask: dict[str, str], profile: str | None, audience: str | None
) -> None:
    found = match_rule(rules, **ask)
    assert found is not None
    assert (found.profile, found.audience) == (profile, audience)


def test_a_match_carries_the_git_options(rules: Any) -> None:
    assert match_rule(rules, host="git.example.com", path="team/app") == RuleMatch(
        0, "app", None, bearer=True, username="oauth2")
    assert match_rule(rules, host="git.example.com") == RuleMatch(1, "work", None)


@pytest.mark.parametrize(
    "ask",
    [
        {"host": "git.example.com.evil.test"},
        {"host": "127.0.0.1"},  # another port is another host
        {"host": "127.0.0.1:80800"},
        {"url": "https://api.example.com/v2x"},  # not a whole segment
        {"url": "https://api.example.com/v1/items"},
        {"url": "https://api.example.com.evil.test/v2"},
        {"url": "https://api.example.com@evil.test/v2"},  # userinfo, then the real host
        {"url": "http://api.example.com/v2"},  # another scheme
        {"url": "ftp://git.example.com/x"},
        {"audience": "https://k8s.example.com/"},  # audiences compare exactly
        {"audience": "https://api.example.com"},
        {},
    ],
)
def test_nothing_else_matches(rules: Any, ask: dict[str, str]) -> None:
    assert match_rule(rules, **ask) is None


@pytest.mark.parametrize(
    "path",
    ["team/app/../../other/x.git", "team/app/%2e%2e/%2E%2E/other/x.git",
     "team/app/..;/..;/other/x.git", "team/app/x\\..\\..\\..\\other", "team/app/./x"],
)
def test_a_path_that_climbs_out_of_a_path_rule_does_not_match_it(
    rules: Any, path: str
) -> None:
    """git sends the path percent-decoded (``team/app/%2e%2e/...`` arrives as ``..``)
    while curl sends the URL as written and the server resolves it elsewhere: the
    path rule's profile must not go with it (a gateway may route ``other`` to
    another party). The host's general rule applies instead."""
    found = match_rule(rules, host="git.example.com", path=path)
    assert found is not None and found.profile == "work"
    found = match_rule(rules, url=f"https://git.example.com/{path}")
    assert found is not None and found.profile == "work"


@pytest.mark.parametrize(
    "url", ["https://api.example.com/v2/../admin", "https://api.example.com/v2/%2E%2e/admin",
            "https://api.example.com/v2/..;/admin"])
def test_a_url_that_climbs_out_of_a_url_prefix_does_not_match_it(rules: Any, url: str) -> None:
    assert match_rule(rules, url=url) is None
    # A prefix of the whole host still covers every path on it.
    assert match_rule(rules, url="https://files.example.com/a/../b") is not None


def test_a_path_rule_needs_the_path(rules: Any) -> None:
    """Without credential.useHttpPath git sends no path: the host's general rule applies."""
    found = match_rule(rules, host="git.example.com")
    assert found is not None and found.profile == "work"


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("- match: {}\n  profile: x", "match needs exactly one of host, url_prefix, audience"),
        ("- match: {host: a, audience: b}\n  profile: x", "match needs exactly one"),
        ("- match: {path: team}\n  profile: x", "match needs exactly one"),
        ("- match: {url_prefix: 'https://a/', path: team}\n  profile: x",
         "match.path narrows a host and needs match.host"),
        ("- match: {host: 'https://git.example.com'}\n  profile: x", "match.host is a host name"),
        ("- match: {url_prefix: 'git.example.com/x'}\n  profile: x",
         "match.url_prefix must be an http:// or https:// URL"),
        ("- match: {host: a}", "a rule needs a profile or an audience"),
        ("- match: {audience: a}\n  audience: b", "names a profile, not another audience"),
        ("- match: {host: a}\n  profile: x\n  username: \"a\\nb\"", "username must be one line"),
    ],
)
def test_a_bad_rule_is_a_config_error_naming_it(tmp_path: Path, rule: str, problem: str) -> None:
    path = config_with(tmp_path, "rules:\n  - match: {host: ok}\n    profile: ok\n"
                       + "".join("  " + line + "\n" for line in rule.splitlines()))
    with pytest.raises(ConfigError, match="rules\\[1\\]: ") as refused:
        load_config(str(path))
    assert problem in str(refused.value) and str(path) in str(refused.value)


@pytest.mark.parametrize("text", [
    "rules:\n  - match: {hots: a}\n    profile: x\n",
    "rules:\n  - match: {host: a}\n    profil: x\n",
    "rules:\n  - host: a\n    profile: x\n",
])
def test_unknown_keys_in_rules_stay_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="rules"):
        load_config(str(config_with(tmp_path, text)))


def _recording_agent(seen: list[dict[str, Any]]) -> Any:
    def answer(request: dict[str, Any]) -> bytes:
        seen.append(request)
        return json.dumps({"id": request["id"], "ok": True,
                           "result": {"access_token": "tok", "expires_at": 1.0}}).encode() + b"\n"
    return answer


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(
    ("call", "sent"),
    [
        ({"url": "https://api.example.com/v2/items"}, ("work", "https://api.example.com")),
        ({"url": "https://git.example.com/team/app.git"}, ("app", None)),
        ({"audience": "https://k8s.example.com"}, ("ops", "https://k8s.example.com")),
        # Explicit wins: the audience given, the rule's profile.
        ({"url": "https://api.example.com/v2", "audience": "https://x.test"},
         ("work", "https://x.test")),
        # A rule for another profile than the one named does not apply at all.
        ({"url": "https://api.example.com/v2", "profile": "mine"}, ("mine", None)),
        ({"url": "https://nothing.example.com/"}, ("from-env", None)),
        ({}, ("from-env", None)),
    ],
)
def test_get_token_asks_for_the_profile_and_audience_a_rule_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavour: str,
    call: dict[str, str], sent: tuple[str, str | None],
) -> None:
    """$COMPOZY_PROFILE is set: a matching rule wins over it, an explicit profile over both."""
    monkeypatch.setenv("COMPOZY_CONFIG", str(config_with(tmp_path, RULES)))
    monkeypatch.setenv("COMPOZY_PROFILE", "from-env")
    monkeypatch.delenv("FLYZT_API_KEY", raising=False)
    seen: list[dict[str, Any]] = []
    with answering_socket(str(tmp_path / "agent.sock"), _recording_agent(seen)) as path:
        monkeypatch.setenv("COMPOZY_AGENT_SOCK", path)
        if flavour == "sync":
            token = get_token(**call, timeout=10)  # type: ignore[arg-type]
        else:
            token = asyncio.run(async_get_token(**call, timeout=10))  # type: ignore[arg-type]
    assert token == "tok"
    assert [(r["profile"], r.get("audience")) for r in seen] == [sent]
