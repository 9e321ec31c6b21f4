"""The user's config file (``~/.compozy/config.yaml`` or ``$COMPOZY_CONFIG``).

Shape (every key optional)::

    auth:
      api_key: ...            # the public docs' CI/CD key; FLYZT_API_KEY wins over it
    storage: auto             # auto | keyring | file | memory (agent secret storage)
    profiles:
      default:                # one entry per profile: compozy login --profile NAME
        issuer: https://auth.compozy.dev
        client_id: compozy-cli
        scopes: [openid, profile, email, offline_access]
        resources: [https://api.compozy.dev]
        downscope: refresh    # refresh | never: how --scope gets a narrower token
        token_binding: bearer # bearer | dpop | auto (RFC 9449 DPoP; auto: dpop when the
                              # provider lists dpop_signing_alg_values_supported)
        # What the provider's metadata does not say (RFC 8414 names); each wins
        # over discovery and is checked like a discovered one (https but loopback):
        device_authorization_endpoint: https://auth.example.com/device
        revocation_endpoint: https://auth.example.com/revoke
        device_client_id: compozy-device   # the device flow's client, if separate
    rules:                    # which profile a host, URL or API uses (compozy_client.rules)
      - match: {host: git.example.com}
        profile: work

Unknown keys are errors, so typos surface. A file owned by another uid or
writable by others is refused, never used (it could set the issuer or the
key), and so is anything but a regular file (a planted FIFO would hang every
command); more than 1 MiB or nesting too deep for the parser is an error.
PyYAML is imported only when the file exists: the token fast path never
pays for it otherwise.
"""

from __future__ import annotations

import os
import stat
from typing import Final, Literal

import msgspec

from compozy_client.errors import ConfigError, UnsafeConfigFile
from compozy_client.paths import (
    MAX_CONFIG_BYTES,
    config_file_problem,
    config_path,
    open_config_file,
)

DEFAULT_ISSUER: Final = "https://auth.compozy.dev"
DEFAULT_CLIENT_ID: Final = "compozy-cli"
DEFAULT_SCOPES: Final = ("openid", "profile", "email", "offline_access")


class AuthSection(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    api_key: str | None = None

    def __repr__(self) -> str:
        return f"AuthSection(api_key={'<redacted>' if self.api_key else None})"


class ProfileConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    issuer: str | None = None
    client_id: str | None = None
    scopes: list[str] | None = None
    #: APIs (RFC 8707 resource indicators) the login asks access for, so that
    #: `compozy auth token --audience URI` can later get a token for one of them.
    resources: list[str] | None = None
    #: How `compozy auth token --scope` gets a narrower token: ``refresh`` asks the
    #: provider for one (RFC 6749 section 6); ``never`` hands out the session's full
    #: token, for providers that narrow the whole session on a narrower refresh.
    #: Unset: ``refresh``, until the agent sees the provider narrow a session.
    downscope: Literal["refresh", "never"] | None = None
    #: Endpoints the provider's metadata does not name, by their RFC 8414 names
    #: (userinfo's by OIDC Discovery's); each wins over discovery.
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    #: The client of the device flow, for providers where one client cannot hold
    #: both grants (django-oauth-toolkit: one grant type per application).
    device_client_id: str | None = None
    #: How the login's tokens are used: ``bearer`` (the default: any tool can send
    #: them), ``dpop`` (RFC 9449: bound to a key the agent holds; every use needs a
    #: proof from the agent, and static-token tools are refused), or ``auto`` (dpop
    #: when the provider's discovery lists ``dpop_signing_alg_values_supported``).
    token_binding: Literal["bearer", "dpop", "auto"] | None = None

    def endpoints(self) -> dict[str, str]:
        """The endpoints this profile names, by field name."""
        return {name: value for name in ENDPOINT_SETTINGS
                if (value := getattr(self, name)) is not None}


#: The profile settings that name a provider endpoint (the agent's oidc.ENDPOINT_FIELDS).
ENDPOINT_SETTINGS: Final = (
    "authorization_endpoint",
    "token_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
    "userinfo_endpoint",
)


class RuleMatchConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a rule matches: exactly one of host (optionally with path), url_prefix, audience."""

    host: str | None = None
    path: str | None = None
    url_prefix: str | None = None
    audience: str | None = None


class RuleConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One entry of ``rules:`` (:mod:`compozy_client.rules` says how they match)."""

    match: RuleMatchConfig
    profile: str | None = None
    audience: str | None = None
    #: The host accepts ``Authorization: Bearer`` (git's ``authtype`` capability).
    bearer: bool = False
    #: The user name git sends with the token (hosts differ: ``oauth2``, ``x-access-token``).
    username: str | None = None


class Config(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    auth: AuthSection = msgspec.field(default_factory=AuthSection)
    storage: Literal["auto", "keyring", "file", "memory"] = "auto"
    profiles: dict[str, ProfileConfig] = msgspec.field(default_factory=dict)
    rules: list[RuleConfig] = msgspec.field(default_factory=list)
    #: Where the config was read from, and whether others can read it.
    path: str | None = None
    readable_by_others: bool = False


def load_config(path: str | None = None) -> Config:
    """Read the config file; a missing file is an empty config.

    Raises :class:`ConfigError` naming the file for anything unreadable or
    malformed (never quoting its values, which may include a key), and its
    :class:`UnsafeConfigFile` for a file another uid owns or others can write
    (:func:`~compozy_client.paths.config_file_problem`).
    """
    return load_config_and_bytes(path)[0]


def load_config_and_bytes(path: str | None = None) -> tuple[Config, bytes | None]:
    """:func:`load_config`, with the exact bytes it validated (None: no file)."""
    path = path or config_path()
    read = read_config_file(path)
    if read is None:
        return Config(), None
    return parse_config(*read, path), read[0]


def read_config_file(path: str) -> tuple[bytes, os.stat_result] | None:
    """The config file's bytes and ``fstat``, or None when there is none; the checks and
    errors of :func:`load_config`."""
    try:
        with open(open_config_file(path), "rb") as file:
            info = os.fstat(file.fileno())  # the file read, not whatever the path names later
            problem = config_file_problem(path, info)
            if problem is not None:
                raise UnsafeConfigFile(problem)
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.__class__.__name__}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than 1 MiB; is it the right file?")
    return raw, info


def parse_config(raw: bytes, info: os.stat_result, path: str) -> Config:
    """The config in ``raw``, the bytes :func:`read_config_file` read from ``path``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.__class__.__name__}") from None
    from compozy_client import configcache

    data: object = configcache.cached(path, raw)
    parsed_now = data is None
    if parsed_now:
        data = _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping (auth:, profiles:, rules:, storage:)")
    if "path" in data or "readable_by_others" in data:
        raise ConfigError(f"config file {path}: unknown key")
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    from compozy_client.rules import rule_problem

    for index, rule in enumerate(config.rules):
        problem = rule_problem(rule)
        if problem is not None:
            raise ConfigError(f"config file {path}: rules[{index}]: {problem}")
    if parsed_now:
        configcache.remember(path, raw, data)  # valid: the next reader needs no YAML
    config.path = path
    config.readable_by_others = bool(info.st_mode & (stat.S_IRGRP | stat.S_IROTH))
    return config


def _parse_yaml(text: str, path: str) -> object:
    import yaml  # only when a config file exists and was not parsed before

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {path} is not valid YAML{where}; fix or remove it"
        ) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"config file {path} is nested too deeply; fix or remove it") from None
    return {} if data is None else data
