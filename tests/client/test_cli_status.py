"""`compozy auth status` against a scripted agent: what a person is told."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from compozy_client import protocol as p


@pytest.fixture
def scripted_agent(tmp_path: Path) -> Iterator[tuple[str, list[p.StatusResult]]]:
    """A socket that answers every status request with the next scripted result."""
    path = str(tmp_path / "agent.sock")
    results: list[p.StatusResult] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                request = json.loads(line)
                conn.sendall(p.encode(p.Response(id=request["id"], ok=True, result=results[0])))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, results
    server.close()


def status_with(
    path: str, result: p.StatusResult, results: list[p.StatusResult], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    results.append(result)
    env = {"COMPOZY_AGENT_SOCK": path, "HOME": str(tmp_path), "NO_COLOR": "1", "PATH": "/usr/bin"}
    return subprocess.run(
        [sys.executable, "-c", "from compozy_client.cli import main; main()", "auth", "status"],
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
