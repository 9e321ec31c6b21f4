"""A config file parsed once is not parsed again (compozy_client.configcache): the next
reader of the same bytes gets the same config without importing PyYAML; any change,
a key in the file or a record that is not ours means parsing it again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compozy_client.config import load_config
from compozy_client.configcache import RECORD_NAME

NOBODY = 65534
VALID = ("profiles:\n  default:\n    issuer: https://auth.example\n    scopes: [openid]\n"
         "storage: memory\n")
LOAD = ("import sys; from compozy_client.config import load_config; c = load_config(); "
        "print(c.storage, c.profiles['default'].issuer, 'yaml' in sys.modules)")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("COMPOZY_AGENT_SOCK", str(run / "agent.sock"))
    monkeypatch.setenv("COMPOZY_CONFIG", str(tmp_path / "config.yaml"))
    return tmp_path


def load_in_a_new_process() -> str:
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_same_bytes_are_not_parsed_again(home: Path) -> None:
    (home / "config.yaml").write_text(VALID)
    assert load_in_a_new_process() == "memory https://auth.example True"
    assert (home / "run" / RECORD_NAME).stat().st_mode & 0o777 == 0o600
    assert load_in_a_new_process() == "memory https://auth.example False"


def test_an_edit_is_parsed_and_validated_again(home: Path) -> None:
    config = home / "config.yaml"
    config.write_text(VALID)
    load_config()
    config.write_text(VALID.replace("memory", "file"))
    assert load_in_a_new_process() == "file https://auth.example True"
    config.write_text(VALID.replace("scopes", "scops"))
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ))
    assert result.returncode == 1 and "unknown field `scops`" in result.stderr


def test_a_file_with_a_key_is_never_kept(home: Path) -> None:
    config = home / "config.yaml"
    config.write_text("auth:\n  api_key: file-key-never-copied\n")
    config.chmod(0o600)
    assert load_config().auth.api_key == "file-key-never-copied"
    assert not (home / "run" / RECORD_NAME).exists()
    assert not any("file-key" in p.read_text(errors="replace")
                   for p in (home / "run").iterdir() if p.is_file())


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another uid")
def test_a_record_that_is_not_ours_is_not_used(home: Path) -> None:
    config = home / "config.yaml"
    config.write_text(VALID)
    load_config()
    record = home / "run" / RECORD_NAME
    # Someone else's record of the same bytes, claiming another storage.
    record.write_bytes(record.read_bytes().replace(b'"storage":"memory"', b'"storage":"file"'))
    assert load_in_a_new_process() == "file https://auth.example False"  # ours: used
    os.chown(record, NOBODY, NOBODY)
    assert load_in_a_new_process() == "memory https://auth.example True"
