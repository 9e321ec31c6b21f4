"""The credential chain and the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from compozy_client import chain
from compozy_client.config import Config, load_config
from compozy_client.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLYZT_API_KEY", "COMPOZY_PROFILE", "COMPOZY_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_env_key_beats_config_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "auth:\n  api_key: from-config\n"))
    assert chain.static_credential(config) == chain.StaticCredential(
        "config", "from-config", str(tmp_path / "config.yaml")
    )
    monkeypatch.setenv("FLYZT_API_KEY", "from-env")
    winner = chain.static_credential(config)
    assert winner is not None and winner.source == "env" and winner.api_key == "from-env"
    assert "from-env" not in repr(winner)


def test_no_static_key_leaves_it_to_the_agent(tmp_path: Path) -> None:
    assert chain.static_credential(load_config(str(tmp_path / "missing.yaml"))) is None
    monkeypatch_blank = load_config(write_config(tmp_path, "auth:\n  api_key: '  '\n"))
    assert chain.static_credential(monkeypatch_blank) is None


def test_profile_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert chain.resolve_profile(None) == "default"
    monkeypatch.setenv("COMPOZY_PROFILE", "staging")
    assert chain.resolve_profile(None) == "staging"
    assert chain.resolve_profile("prod") == "prod"


def test_env_key_shadowing_a_login_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYZT_API_KEY", "k")
    warnings = chain.shadowing_warnings(chain.env_api_key(), Config(), True, "default")
    assert len(warnings) == 1
    assert "FLYZT_API_KEY" in warnings[0] and "unset FLYZT_API_KEY" in warnings[0]
    assert chain.shadowing_warnings(chain.env_api_key(), Config(), False, "default") == []


def test_config_key_readable_by_others_is_warned(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "auth:\n  api_key: k\n", mode=0o644))
    warnings = chain.shadowing_warnings(None, config, False, "default")
    assert any("readable by other users" in w and "chmod 600" in w for w in warnings)
    private = load_config(write_config(tmp_path, "auth:\n  api_key: k\n", mode=0o600))
    assert chain.shadowing_warnings(None, private, False, "default") == []


def test_config_profiles_and_storage(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, """
storage: file
profiles:
  staging:
    issuer: https://auth.staging.example
    client_id: cli
    scopes: [openid, offline_access]
"""))
    assert config.storage == "file"
    assert config.profiles["staging"].issuer == "https://auth.staging.example"
    assert config.profiles["staging"].scopes == ["openid", "offline_access"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("auth: [unclosed\n", "not valid YAML at line"),
        ("- a list\n", "must be a mapping"),
        ("auth:\n  apikey: typo\n", "unknown field `apikey`"),
        ("storage: cloud\n", "storage"),
        ("auth:\n  api_key: [1]\n", "api_key"),
    ],
)
def test_bad_config_names_the_file_and_never_the_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = write_config(tmp_path, text + "# secret-value-xyz\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert path in str(caught.value)
    assert fragment in str(caught.value)
    assert "secret-value-xyz" not in str(caught.value)


def test_unreadable_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(path))
