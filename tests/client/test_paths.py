"""Where the socket and config live, and the private-directory rules."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import pytest

from compozy_client import paths


def test_explicit_socket_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPOZY_AGENT_SOCK", "/tmp/elsewhere.sock")
    assert paths.socket_path() == "/tmp/elsewhere.sock"


def test_default_socket_follows_the_runtime_dir_as_platformdirs_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("COMPOZY_AGENT_SOCK", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    expected = os.path.join(platformdirs.user_runtime_dir("compozy"), "agent.sock")
    assert paths.socket_path() == expected == str(tmp_path / "compozy" / "agent.sock")


def test_without_runtime_dir_falls_back_to_a_per_user_temp_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("COMPOZY_AGENT_SOCK", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        pytest.skip("this machine has /run/user/<uid>, which takes precedence")
    expected = tmp_path / f"runtime-{os.getuid()}" / "compozy" / "agent.sock"
    assert paths.socket_path() == str(expected)


def test_config_path_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COMPOZY_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.config_path() == str(tmp_path / ".compozy" / "config.yaml")
    monkeypatch.setenv("COMPOZY_CONFIG", "/etc/x.yaml")
    assert paths.config_path() == "/etc/x.yaml"


def test_private_dir_is_created_0700_with_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    paths.ensure_private_dir(str(target))
    assert (target.stat().st_mode & 0o777) == 0o700
    assert ((tmp_path / "a").stat().st_mode & 0o777) == 0o700
    paths.ensure_private_dir(str(target))  # idempotent


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o720, 0o702])
def test_group_or_world_writable_dir_is_refused(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "d"
    target.mkdir()
    target.chmod(mode)
    with pytest.raises(paths.UnsafePathError, match="chmod 700"):
        paths.ensure_private_dir(str(target))


def test_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    os.chown(target, 65534, 65534)
    with pytest.raises(paths.UnsafePathError, match="belongs to uid 65534"):
        paths.ensure_private_dir(str(target))


def test_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(paths.UnsafePathError, match="not a directory"):
        paths.ensure_private_dir(str(link))
