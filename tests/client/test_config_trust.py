"""A config file others control is refused by every reader: load_config, get_token, fast path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from compozy_client import get_token
from compozy_client.config import load_config
from compozy_client.errors import ConfigError, UnsafeConfigFile
from support.fake_agent import answering_socket

NOBODY = 65534
LAUNCHER = Path(__file__).resolve().parents[2] / "client" / "bin" / "compozy"


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_config_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    config = write(tmp_path / "config.yaml", "auth:\n  api_key: planted\n", mode)
    with pytest.raises(UnsafeConfigFile) as refused:
        load_config(str(config))
    message = str(refused.value)
    assert f"config file {config} is writable by group or others" in message
    assert f"chmod 600 {config}" in message and "planted" not in message


def test_get_token_refuses_a_group_writable_config_with_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "config.yaml", "auth:\n  api_key: planted-key\n", 0o660)
    monkeypatch.delenv("FLYZT_API_KEY", raising=False)
    monkeypatch.setenv("COMPOZY_CONFIG", str(config))
    with pytest.raises(UnsafeConfigFile, match=f"config file {config} is writable"):
        get_token()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another uid")
def test_a_config_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml",
                   "profiles:\n  default:\n    issuer: https://login.attacker.example\n", 0o644)
    os.chown(config, NOBODY, NOBODY)
    with pytest.raises(UnsafeConfigFile, match=f"belongs to uid {NOBODY}, not to you") as refused:
        load_config(str(config))
    assert f"chown {os.getuid()} {config}" in str(refused.value)
    assert "attacker" not in str(refused.value)


def test_a_private_config_and_a_readable_one_without_writers_are_used(tmp_path: Path) -> None:
    assert load_config(str(write(tmp_path / "a.yaml", "storage: file\n", 0o600))).storage == "file"
    assert load_config(str(write(tmp_path / "b.yaml", "storage: file\n", 0o644))).storage == "file"


@pytest.fixture
def token_agent(tmp_path: Path) -> Iterator[str]:
    """A socket that answers any request with a token, as an agent with a session would."""
    def token(request: dict[str, object]) -> bytes:
        return (b'{"id":1,"ok":true,"result":{"access_token":"tok-123",'
                b'"expires_at":1.0}}\n')

    with answering_socket(str(tmp_path / "agent.sock"), token) as path:
        yield path


def test_the_token_fast_path_does_not_use_a_config_others_can_write(
    tmp_path: Path, token_agent: str
) -> None:
    """No key in it, so the fast path would go to the agent; it leaves the file to the full CLI,
    which refuses it."""
    config = write(tmp_path / "config.yaml",
                   "profiles:\n  default:\n    issuer: https://login.attacker.example\n", 0o664)
    env = {"COMPOZY_AGENT_SOCK": token_agent, "COMPOZY_CONFIG": str(config),
           "HOME": str(tmp_path), "PATH": "/usr/bin", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, str(LAUNCHER), "auth", "token"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert f"error: config file {config} is writable by group or others" in result.stderr
    config.chmod(0o644)
    result = subprocess.run([sys.executable, str(LAUNCHER), "auth", "token"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == "tok-123\n", result.stderr


def test_an_untrusted_config_is_refused_even_when_the_environment_holds_a_key(
    tmp_path: Path,
) -> None:
    """FLYZT_API_KEY wins over the file's key, but not over the rule: every path refuses alike."""
    config = write(tmp_path / "config.yaml", "storage: auto\n", 0o646)
    env = {"COMPOZY_CONFIG": str(config), "FLYZT_API_KEY": "env-key", "HOME": str(tmp_path),
           "PATH": "/usr/bin", "NO_COLOR": "1"}
    for args in (["auth", "token"], ["auth", "token", "--force-new"]):
        result = subprocess.run([sys.executable, str(LAUNCHER), *args], env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and result.stdout == "", args
        assert f"config file {config} is writable by group or others" in result.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_a_fifo_planted_as_the_config_cannot_hang_any_command(tmp_path: Path) -> None:
    """Where others can create files (a sticky shared directory), uid 65534 plants a FIFO at
    the config path. Opening it for reading used to block until someone opened it for
    writing, before the owner check could run: every command, `compozy auth token` (a git or
    kubectl helper) first, hung for ever. Now it is opened without blocking and refused."""
    shared = Path(tempfile.mkdtemp(prefix="cz-shared-", dir="/tmp"))  # reachable by uid 65534
    shared.chmod(0o1777)
    planted = shared / "config.yaml"
    try:
        subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                        "--clear-groups", "mkfifo", "-m", "644", str(planted)], check=True)
        check_a_planted_fifo_is_refused(tmp_path, planted)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def check_a_planted_fifo_is_refused(tmp_path: Path, planted: Path) -> None:
    mine = tmp_path / "mine.yaml"
    os.mkfifo(mine, 0o600)
    env = {"COMPOZY_CONFIG": str(planted), "COMPOZY_AGENT_AUTOSTART": "0",
           "COMPOZY_AGENT_SOCK": str(tmp_path / "none.sock"), "HOME": str(tmp_path),
           "PATH": "/usr/bin", "NO_COLOR": "1"}
    for args in (["auth", "token"], ["auth", "status"]):
        result = subprocess.run([sys.executable, str(LAUNCHER), *args], env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and result.stdout == "", (args, result.stderr)
        assert f"config file {planted} belongs to uid {NOBODY}" in result.stderr, args
    with pytest.raises(UnsafeConfigFile, match=f"config file {mine} is not a regular file"):
        load_config(str(mine))


def test_a_config_nested_too_deeply_or_too_large_is_a_clear_error(tmp_path: Path) -> None:
    """A clear ConfigError naming the file, not a RecursionError's traceback or a read of
    a file that never ends."""
    deep = write(tmp_path / "deep.yaml", "profiles: " + "[" * 5000 + "]" * 5000 + "\n", 0o600)
    with pytest.raises(ConfigError, match=f"config file {deep} is nested too deeply"):
        load_config(str(deep))
    huge = write(tmp_path / "huge.yaml", "# " + "x" * (2 << 20) + "\nstorage: file\n", 0o600)
    with pytest.raises(ConfigError, match=f"config file {huge} is larger than 1 MiB"):
        load_config(str(huge))
    env = {"COMPOZY_CONFIG": str(deep), "COMPOZY_AGENT_AUTOSTART": "0",
           "COMPOZY_AGENT_SOCK": str(tmp_path / "none.sock"), "HOME": str(tmp_path),
           "PATH": "/usr/bin", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, str(LAUNCHER), "auth", "status"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"config file {deep} is nested too deeply" in result.stderr
