"""The credential chain: which credential a command uses, and what it shadows.

Order, highest first (the public docs' "Configure API Key" section):

1. ``FLYZT_API_KEY`` in the environment;
2. ``auth.api_key`` in the config file;
3. the agent's session for the profile (a login, or a key kept with
   ``compozy login --with-api-key``).

A higher source wins outright; the agent is not even contacted for a token
(in CI with ``FLYZT_API_KEY`` set, no agent is started at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final, Literal

from compozy_client.config import Config

API_KEY_ENV: Final = "FLYZT_API_KEY"
PROFILE_ENV: Final = "COMPOZY_PROFILE"
DEFAULT_PROFILE: Final = "default"

SourceName = Literal["env", "config", "agent"]


@dataclass(frozen=True)
class StaticCredential:
    """An API key found before the agent: from the environment or the config file."""

    source: Literal["env", "config"]
    api_key: str = field(repr=False)
    #: Where it came from, for people: "FLYZT_API_KEY" or the config file's path.
    origin: str


def resolve_profile(explicit: str | None) -> str:
    """``--profile`` if given, else ``$COMPOZY_PROFILE``, else ``default``."""
    if explicit:
        return explicit
    return os.environ.get(PROFILE_ENV, "").strip() or DEFAULT_PROFILE


def env_api_key() -> StaticCredential | None:
    value = os.environ.get(API_KEY_ENV, "").strip()
    return StaticCredential("env", value, API_KEY_ENV) if value else None


def static_credential(config: Config) -> StaticCredential | None:
    """The highest static source that is set, or None (the agent's turn)."""
    from_env = env_api_key()
    if from_env is not None:
        return from_env
    key = (config.auth.api_key or "").strip()
    if key:
        return StaticCredential("config", key, config.path or "config file")
    return None


def shadowing_warnings(
    winner: StaticCredential | None, config: Config, agent_has_session: bool, profile: str
) -> list[str]:
    """Warnings for the docs' "check for environment variable conflicts" advice."""
    warnings: list[str] = []
    if winner is not None and agent_has_session:
        warnings.append(
            f"{winner.origin} is set and takes precedence over your login session for "
            f"profile {profile!r}; unset it to use the login"
            + (" (`unset FLYZT_API_KEY`)" if winner.source == "env" else "")
        )
    if winner is not None and winner.source == "env" and config.auth.api_key:
        warnings.append(
            f"FLYZT_API_KEY overrides auth.api_key in {config.path}; the two may differ"
        )
    warnings.extend(config_warnings(config))
    return warnings


def config_warnings(config: Config) -> list[str]:
    """What every command says about the config file itself (the CLI prints it each time)."""
    if config.auth.api_key and config.readable_by_others:
        return [f"{config.path} holds an API key and is readable by other users; "
                f"run: chmod 600 {config.path}"]
    return []
