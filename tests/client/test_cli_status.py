"""`compozy auth status` against a scripted agent: what a person is told."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from compozy_client import protocol as p
from support.fake_agent import answering_socket


@pytest.fixture
def scripted_agent(tmp_path: Path) -> Iterator[tuple[str, list[p.StatusResult]]]:
    """A socket that answers every status request with the next scripted result."""
    results: list[p.StatusResult] = []

    def scripted(request: dict[str, object]) -> bytes:
        # Every request on the connection gets the scripted result.
        response = p.Response(id=request["id"], ok=True, result=results[0])
        return p.encode(response)

    with answering_socket(str(tmp_path / "agent.sock"), scripted) as path:
        yield path, results


def status_with(
    path: str, result: p.StatusResult, results: list[p.StatusResult], tmp_path: Path,
    *options: str, no_color: bool = True,
) -> subprocess.CompletedProcess[str]:
    results.append(result)
    env = {"COMPOZY_AGENT_SOCK": path, "HOME": str(tmp_path), "PATH": "/usr/bin"}
    if no_color:
        env["NO_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-c", "from compozy_client.cli import main; main()", "auth", "status",
         *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def session(**fields: object) -> p.SessionInfo:
    base: dict[str, object] = dict(
        token_id="ab12cd34",
        profile="default",
        kind="oidc",
        state="fresh",
        issuer="https://auth.test",
        account="alice@example.test",
        expires_at=4_000_000_000.0,
    )
    base.update(fields)
    return p.SessionInfo(**base)  # type: ignore[arg-type]


def status_result(skew: float | None, *sessions: p.SessionInfo) -> p.StatusResult:
    return p.StatusResult(
        agent_version="0.1.0",
        pid=42,
        socket="/x",
        storage=p.StorageInfo(backend="keyring", detail="SecretService"),
        sessions=list(sessions),
        clock_skew_seconds=skew,
    )


def test_clock_skew_over_a_minute_is_warned(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(path, status_result(-125.0, session()), results, tmp_path)
    assert result.returncode == 0
    assert "your system clock is 125 s ahead of the provider's" in result.stderr
    assert "verify your system time" in result.stderr


def test_small_skew_is_not_warned(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(path, status_result(20.0, session()), results, tmp_path)
    assert result.returncode == 0 and "clock" not in result.stderr
    assert "Profile default: logged in to https://auth.test as alice@example.test" in result.stdout
    assert "Access token expires: in" in result.stdout


def test_login_required_says_what_to_run_and_fails(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(
        path, status_result(None, session(state="login_required")), results, tmp_path
    )
    assert result.returncode == 1
    assert "login required" in result.stdout
    assert "Run `compozy login` to sign in again" in result.stdout


def several_profiles() -> p.StatusResult:
    return status_result(
        None,
        session(profile="staging", token_id="ef56ab78", account="bob@staging.test",
                state="login_required"),
        session(),
        session(profile="ci", token_id="9a9b9c9d", kind="api_key", account=None,
                expires_at=None),
    )


def test_several_profiles_open_with_one_aligned_line_each(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(path, several_profiles(), results, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    summary = lines[:4]
    assert lines[4].startswith("Agent: running")
    assert [line.split()[0] for line in summary] == ["PROFILE", "ci", "default", "staging"]
    # Every column starts at the same offset on every line.
    for heading in ("ACCOUNT", "STATE", "EXPIRES"):
        column = summary[0].index(heading)
        for line in summary[1:]:
            assert line[column - 2:column] == "  " and line[column] != " ", (heading, summary)
    state = summary[0].index("STATE")
    expires = summary[0].index("EXPIRES")
    assert summary[1][summary[0].index("ACCOUNT"):].startswith("API key")
    assert summary[2][state:expires].strip() == "valid"
    assert summary[2][expires:].startswith("in ")
    assert summary[3][state:expires].strip() == "login required"
    assert summary[3][expires:].startswith("in ")
    # The details that follow are still the active profile's.
    assert "Profile default: logged in to https://auth.test as alice@example.test" in result.stdout
    assert "\033" not in result.stdout


def test_summary_uncoloured_when_stdout_is_not_a_terminal(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(path, several_profiles(), results, tmp_path, no_color=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PROFILE")
    assert "\033" not in result.stdout


def test_one_profile_prints_no_summary(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(path, status_result(None, session()), results, tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("Agent: running")
    assert "PROFILE" not in result.stdout


def test_json_is_unchanged_with_several_profiles(scripted_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, results = scripted_agent
    result = status_with(path, several_profiles(), results, tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # nothing but the document on stdout
    assert sorted(document) == ["agent", "authenticated", "clock_skew_seconds",
                                "credential_source", "profile", "session", "storage",
                                "warnings"]
    assert document["profile"] == "default"
    assert document["session"]["token_id"] == "ab12cd34"
    assert document["credential_source"] == {"type": "agent",
                                             "origin": "agent session ab12cd34"}


class _Terminal:
    def isatty(self) -> bool:
        return True


def test_summary_colours_state_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from compozy_client.commands.auth_status import summary_lines

    monkeypatch.delenv("NO_COLOR", raising=False)
    sessions = [session(profile="a"), session(profile="b", state="expiring", token_id="1"),
                session(profile="c", state="login_required", token_id="2"),
                session(profile="d", state="revoked", token_id="3")]
    lines = summary_lines(sessions, _Terminal())
    assert "\033[32mvalid\033[0m" in lines[1]
    assert "\033[33mexpiring\033[0m" in lines[2]
    assert "\033[31mlogin required\033[0m" in lines[3]
    assert "\033[31mrevoked\033[0m" in lines[4]
    # Colour codes do not break the alignment: the EXPIRES column lines up once stripped.
    plain = [re.sub("\033\\[[0-9;]*m", "", line) for line in lines]
    column = plain[0].index("EXPIRES")
    assert all(line[column:].startswith("in ") for line in plain[1:])
    monkeypatch.setenv("NO_COLOR", "1")
    assert not any("\033" in line for line in summary_lines(sessions, _Terminal()))


def test_summary_escapes_provider_text() -> None:
    from compozy_client.commands.auth_status import summary_lines

    evil = "mallory\033[2J\nforged\u202e"
    lines = summary_lines([session(profile="a", account=evil), session(profile="b", token_id="1")],
                          _Terminal())
    assert len(lines) == 3
    assert not any("\033[2J" in line or "\u202e" in line or "\n" in line for line in lines)
    assert "mallory\\x1b[2J\\nforged\\u202e" in lines[1]
