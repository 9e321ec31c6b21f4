"""git-credential-compozy against a stand-in agent: what git reads, what the agent is asked.

The helper runs as git runs it (the launcher, a description on stdin); the real
git and the real agent are in tests/integration/test_git.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.fake_agent import answering_socket
from support.other_user import port_held_by_another_user

HELPER = Path(__file__).resolve().parents[2] / "client" / "bin" / "git-credential-compozy"
EXPIRES = 1900000000.75
RULES = """\
rules:
  - match: {host: git.example.com, path: team}
    profile: team
    username: oauth2
  - match: {host: git.example.com}
    profile: work
    audience: https://git.example.com
    bearer: true
"""


def token_answer(
    token: str = "tok-123", **extra: Any  # noqa: S107 (a test token)
) -> Callable[[dict[str, Any]], bytes]:
    def answer(request: dict[str, Any]) -> bytes:
        result = {"access_token": token, "expires_at": EXPIRES, "token_id": "t1", **extra}
        return json.dumps({"id": request["id"], "ok": True, "result": result},
                          separators=(",", ":")).encode() + b"\n"
    return answer


class Rig:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.seen: list[dict[str, Any]] = []
        self.answer: Callable[[dict[str, Any]], bytes] = token_answer()
        self.config = home / "config.yaml"

    def respond(self, request: dict[str, Any]) -> bytes:
        self.seen.append(request)
        return self.answer(request)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOZY_", "FLYZT_"))}
        env.update(HOME=str(self.home), COMPOZY_AGENT_SOCK=str(self.home / "agent.sock"),
                   COMPOZY_CONFIG=str(self.config), COMPOZY_AGENT_AUTOSTART="0")
        env.update(extra)
        return env

    def run(self, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HELPER), *args], input=stdin,
                              capture_output=True, text=True, env=self.env(**env), timeout=60)

    def write_config(self, text: str) -> None:
        self.config.write_text(text)
        self.config.chmod(0o600)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    rig = Rig(home)
    with answering_socket(str(home / "agent.sock"), rig.respond):
        yield rig


def describe(*lines: str) -> str:
    return "\n".join(lines) + "\n\n"


GET = describe("protocol=https", "host=git.example.com")


def fields(output: str) -> list[tuple[str, str]]:
    return [(key, value) for key, _, value in
            (line.partition("=") for line in output.splitlines())]


@pytest.mark.parametrize("config", ["", "storage: memory\n"], ids=["no-config", "config"])
def test_get_answers_username_password_and_expiry(rig: Rig, config: str) -> None:
    if config:
        rig.write_config(config)
    result = rig.run("get", stdin=GET)
    assert result.returncode == 0, result.stderr
    assert fields(result.stdout) == [("username", "compozy"), ("password", "tok-123"),
                                     ("password_expiry_utc", "1900000000")]
    assert result.stderr == ""
    [request] = rig.seen
    assert (request["op"], request["profile"], request["min_valid"]) == ("token", "default", 300)
    assert "audience" not in request and "rejected_token" not in request


def test_a_username_git_already_has_is_kept(rig: Rig) -> None:
    result = rig.run("get", stdin=describe("protocol=https", "host=git.example.com",
                                           "username=alice"))
    assert fields(result.stdout)[:2] == [("username", "alice"), ("password", "tok-123")]


def test_rules_pick_profile_audience_and_username(rig: Rig) -> None:
    rig.write_config(RULES)
    with_path = rig.run("get", stdin=describe("protocol=https", "host=git.example.com",
                                              "path=team/app.git"))
    assert fields(with_path.stdout)[:2] == [("username", "oauth2"), ("password", "tok-123")]
    plain = rig.run("get", stdin=GET)  # no capability announced: username and password
    assert fields(plain.stdout)[:2] == [("username", "compozy"), ("password", "tok-123")]
    assert [(r["profile"], r.get("audience")) for r in rig.seen] == [
        ("team", None), ("work", "https://git.example.com")]


def test_the_helpers_profile_option_wins_and_a_rule_for_another_profile_does_not_apply(
    rig: Rig,
) -> None:
    rig.write_config(RULES)
    rig.run("--profile", "mine", "get", stdin=GET)
    rig.run("--profile=work", "get", stdin=GET)
    assert [(r["profile"], r.get("audience")) for r in rig.seen] == [
        ("mine", None), ("work", "https://git.example.com")]


@pytest.mark.parametrize(
    ("config", "extra", "bearer"),
    [
        (RULES, [], True),  # the rule says the host takes Bearer
        ("", ['wwwauth[]=Bearer realm="git"'], True),  # the host's challenge says so
        ("", ['wwwauth[]=Basic realm="git"'], False),
        ("", [], False),
    ],
    ids=["rule", "challenge", "basic-challenge", "nothing-known"],
)
def test_bearer_only_when_git_announces_authtype_and_the_host_takes_it(
    rig: Rig, config: str, extra: list[str], bearer: bool
) -> None:
    if config:
        rig.write_config(config)
    result = rig.run("get", stdin=describe("capability[]=authtype", "protocol=https",
                                           "host=git.example.com", *extra))
    assert result.returncode == 0, result.stderr
    if bearer:
        assert fields(result.stdout) == [
            ("capability[]", "authtype"), ("authtype", "Bearer"), ("credential", "tok-123"),
            ("ephemeral", "1"), ("password_expiry_utc", "1900000000")]
    else:
        assert "authtype" not in result.stdout
        assert ("password", "tok-123") in fields(result.stdout)


def test_login_required_is_one_line_naming_the_login_and_no_credentials(rig: Rig) -> None:
    def login_required(request: dict[str, Any]) -> bytes:
        return json.dumps({"id": request["id"], "ok": False, "error": {
            "code": "login_required",
            "message": "the session for profile 'work' needs a new login",
            "details": {"command": "compozy login --profile work"}}}).encode() + b"\n"
    rig.answer = login_required
    result = rig.run("get", stdin=GET)
    assert result.stdout == "quit=1\n"  # git stops: no terminal prompt for a password
    assert result.stderr == ("compozy: the session for profile 'work' needs a new login; "
                             "run: compozy login --profile work\n")


def test_no_agent_is_a_message_and_no_credentials(rig: Rig, tmp_path: Path) -> None:
    result = rig.run("get", stdin=GET, COMPOZY_AGENT_SOCK=str(tmp_path / "h" / "none.sock"))
    assert result.stdout == "quit=1\n"
    assert result.stderr.startswith("compozy: no agent") and result.stderr.count("\n") == 1


def test_erase_tells_the_agent_the_token_was_rejected(rig: Rig) -> None:
    rig.write_config(RULES)
    result = rig.run("erase", stdin=describe("protocol=https", "host=git.example.com",
                                             "username=compozy", "password=tok-old"))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    [request] = rig.seen
    assert request["rejected_token"] == "tok-old" and request["profile"] == "work"
    assert request["audience"] == "https://git.example.com"
    # git >= 2.46 hands back a Bearer credential the same way.
    rig.run("erase", stdin=describe("capability[]=authtype", "protocol=https",
                                    "host=git.example.com", "authtype=Bearer",
                                    "credential=tok-bearer"))
    assert rig.seen[-1]["rejected_token"] == "tok-bearer"


@pytest.mark.parametrize("operation", ["store", "capability", "nonsense", ""])
def test_store_and_unknown_operations_do_nothing(rig: Rig, operation: str) -> None:
    result = rig.run(*([operation] if operation else []), stdin=describe(
        "protocol=https", "host=git.example.com", "username=compozy", "password=tok-123"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert rig.seen == []


@pytest.mark.parametrize("path", ["team/%2e%2e/attacker/x.git", "team/../attacker/x.git",
                                  "team/..;/attacker/x.git"])
def test_a_path_that_climbs_out_of_a_path_rule_does_not_get_its_profile(
    rig: Rig, path: str
) -> None:
    """A submodule URL ``https://git.example.com/team/%2e%2e/attacker/x.git``: git gives
    the helper the path decoded (``team/../attacker/x.git``), the server resolves it to
    ``attacker/x.git``; the path rule for ``team`` does not apply to it."""
    rig.write_config(RULES)
    for _ in range(2):  # parsed from the config, then from the rules cache
        result = rig.run("get", stdin=describe("protocol=https", "host=git.example.com",
                                               f"path={path}"))
        assert result.returncode == 0, result.stderr
    assert [r["profile"] for r in rig.seen] == ["work", "work"]


@pytest.mark.parametrize(
    ("protocol", "host", "answered"),
    [("http", "git.example.com", False), ("http", "10.0.0.1:8080", False),
     ("ftp", "git.example.com", False), ("http", "127.0.0.1:8080", True),
     ("http", "localhost", True), ("http", "[::1]:9000", True), ("http", "[::1]", True),
     ("http", "[::2]", False), ("http", "LOCALHOST:1", True),
     ("http", "127.0.0.1.evil.test", False),
     # Whatever follows the name must be a port: git reads the host of
     # http://u@localhost:1@evil.test/ as everything after the first "@".
     ("http", "localhost:1@evil.test", False), ("http", "[::1]@evil.test", False),
     ("http", "[::1].evil.test:80", False), ("http", "127.0.0.1:80#@evil.test", False),
     ("http", "localhost:\u0661", False), ("http", "localhost:", True)],
)
def test_plain_http_gets_a_token_only_on_this_machine(
    rig: Rig, protocol: str, host: str, answered: bool
) -> None:
    result = rig.run("get", stdin=describe(f"protocol={protocol}", f"host={host}"))
    assert ("tok-123" in result.stdout) is answered
    assert len(rig.seen) == (1 if answered else 0)
    if not answered:
        assert result.stdout == "" and "only over https" in result.stderr


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::"])
def test_plain_http_to_a_port_another_user_listens_on_gets_nothing(
    rig: Rig, address: str
) -> None:
    """The developer's http://127.0.0.1:PORT server is down and uid 65534 took its port:
    git's next request reaches them (any 401 makes git ask the helper). No token,
    and quit=1 so git does not ask for a password to send there instead."""
    with port_held_by_another_user(address) as port:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            result = rig.run("get", stdin=describe("protocol=http", f"host={host}"))
            assert result.stdout == "quit=1\n", (host, result.stdout)
            assert "served by uid 65534" in result.stderr
        assert rig.seen == []
    # The control: our own server on a port gets the token.
    with socket.create_server(("127.0.0.1", 0)) as own:
        result = rig.run("get", stdin=describe("protocol=http",
                                               f"host=127.0.0.1:{own.getsockname()[1]}"))
    assert "password=tok-123" in result.stdout


@pytest.mark.parametrize("token", ["tok\nhost=evil.test", "tok\r\n", "tok en", "tok\x1b[2J"])
def test_a_token_that_could_forge_protocol_lines_is_not_passed_on(rig: Rig, token: str) -> None:
    """The token is the provider's string: a line break in it would add lines to git's
    credential (another host, another username)."""
    rig.answer = token_answer(token)
    result = rig.run("get", stdin=GET)
    assert result.stdout == "quit=1\n" and "tok" not in result.stdout
    assert "characters a token cannot have" in result.stderr


def test_never_emits_a_refresh_token(rig: Rig) -> None:
    """Even if an agent answered one (ours never does), git never sees it."""
    rig.answer = token_answer(refresh_token="refresh-secret-xyz",
                              oauth_refresh_token="refresh-secret-xyz")
    result = rig.run("get", stdin=describe("capability[]=authtype", "protocol=https",
                                           "host=git.example.com"))
    assert "refresh" not in result.stdout and "refresh-secret-xyz" not in result.stderr
    assert ("password", "tok-123") in fields(result.stdout)


def test_an_api_key_follows_the_credential_chain_without_the_agent(rig: Rig) -> None:
    result = rig.run("get", stdin=GET, FLYZT_API_KEY="key-from-env")
    assert fields(result.stdout) == [("username", "compozy"), ("password", "key-from-env")]
    assert rig.seen == []
    erase = rig.run("erase", stdin=describe("protocol=https", "host=git.example.com",
                                            "password=key-from-env"), FLYZT_API_KEY="key-from-env")
    assert erase.returncode == 0 and rig.seen == []


@pytest.mark.parametrize("source", ["env", "config"])
@pytest.mark.parametrize("named_by", ["rule", "option"])
def test_an_api_key_never_goes_to_a_host_whose_profile_was_named(
    rig: Rig, source: str, named_by: str
) -> None:
    """FLYZT_API_KEY (or auth.api_key) is set for other tools; git.example.com has a rule
    (or setup-git --profile) naming its login. The host gets that login's token, not
    the long-lived Compozy key; erase of that token still reaches the agent."""
    config = RULES if named_by == "rule" else "storage: memory\n"
    env = {"FLYZT_API_KEY": "key-from-env"} if source == "env" else {}
    rig.write_config(config + ("auth:\n  api_key: key-from-config\n" if source == "config"
                               else ""))
    args = ["--profile", "work"] if named_by == "option" else []
    result = rig.run(*args, "get", stdin=GET, **env)
    assert result.returncode == 0, result.stderr
    assert "key-from" not in result.stdout
    assert "tok-123" in result.stdout
    assert [r["profile"] for r in rig.seen] == ["work"]
    rig.run(*args, "erase", stdin=describe("protocol=https", "host=git.example.com",
                                           "username=compozy", "password=tok-123"), **env)
    assert rig.seen[-1].get("rejected_token") == "tok-123"


def test_the_common_get_loads_no_argparse_msgspec_or_yaml(rig: Rig) -> None:
    """git runs the helper before its requests: it stays as light as `compozy auth token`."""
    code = (
        "import sys\n"
        f"sys.argv = [{str(HELPER)!r}, 'get']\n"
        "from compozy_client.gitcredential import main\n"
        "code = main(sys.argv[1:])\n"
        "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], input=GET, capture_output=True,
                            text=True, env=rig.env(), timeout=60)
    assert "password=tok-123" in result.stdout, result.stderr
    loaded = set(result.stderr.split())
    heavy = {m for m in loaded if m.split(".")[0] in ("msgspec", "yaml", "argparse", "typing",
                                                      "compozy_agent", "socket", "re")}
    assert not heavy, heavy


def _modules_of_a_get(rig: Rig) -> set[str]:
    code = (
        "import sys\n"
        f"sys.argv = [{str(HELPER)!r}, 'get']\n"
        "from compozy_client.gitcredential import main\n"
        "code = main(sys.argv[1:])\n"
        "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], input=GET, capture_output=True,
                            text=True, env=rig.env(), timeout=60)
    assert "password=tok-123" in result.stdout, result.stderr
    return set(result.stderr.split())


def test_rules_are_read_without_yaml_once_cached_for_the_exact_config(rig: Rig) -> None:
    rig.write_config(RULES)
    first = _modules_of_a_get(rig)  # parses the YAML, and caches the rules
    assert "yaml" in first
    assert (rig.home / "rules.cache").stat().st_mode & 0o777 == 0o600
    second = _modules_of_a_get(rig)
    assert not {m for m in second if m.split(".")[0] in ("yaml", "msgspec", "re")}
    assert [(r["profile"], r.get("audience")) for r in rig.seen] == [
        ("work", "https://git.example.com")] * 2
    # An edit is seen at once: the cache is for the old bytes.
    rig.write_config(RULES.replace("profile: work", "profile: other"))
    rig.run("get", stdin=GET)
    assert rig.seen[-1]["profile"] == "other"


def _plant_cache(rig: Rig, mode: int, owner: int | None = None) -> None:
    config = RULES.encode()
    rule = b"\t".join([b"git.example.com", b"", b"", b"", b"attacker", b"", b"0", b""])
    cache = rig.home / "rules.cache"
    cache.write_bytes(b"compozy-rules 1\n%d\n" % len(config) + config + b"\n" + rule + b"\n")
    cache.chmod(mode)
    if owner is not None:
        os.chown(cache, owner, owner)


@pytest.mark.parametrize(
    ("mode", "owner"),
    [(0o666, None), (0o620, None),
     pytest.param(0o600, 65534, marks=pytest.mark.skipif(
         os.getuid() != 0, reason="needs root to give a file to another uid"))],
    ids=["world-writable", "group-writable", "another-uid"],
)
def test_a_rules_cache_others_could_write_is_not_used(
    rig: Rig, mode: int, owner: int | None
) -> None:
    rig.write_config(RULES)
    _plant_cache(rig, mode, owner)
    result = rig.run("get", stdin=GET)
    assert result.returncode == 0, result.stderr
    assert rig.seen[-1]["profile"] == "work"  # from the config file, not the planted cache


def test_a_planted_cache_is_used_only_when_it_is_ours_and_matches(rig: Rig) -> None:
    """The control for the test above: the same cache, ours and 0600, is read."""
    rig.write_config(RULES)
    _plant_cache(rig, 0o600)
    rig.run("get", stdin=GET)
    assert rig.seen[-1]["profile"] == "attacker"


def test_rules_the_cache_format_cannot_hold_are_read_from_the_config_each_time(rig: Rig) -> None:
    rig.write_config(RULES.replace("profile: work", 'profile: "wo\\trk"'))
    for _ in range(2):
        result = rig.run("get", stdin=GET)
        assert result.returncode == 0, result.stderr
    assert not (rig.home / "rules.cache").exists()
    assert [r["profile"] for r in rig.seen] == ["wo\trk", "wo\trk"]
