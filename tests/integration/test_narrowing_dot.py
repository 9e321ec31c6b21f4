"""A narrower token at a provider whose narrower refresh has side effects (issue 12,
item 2), end to end: the real agent, the real CLI, django-oauth-toolkit.

DOT rotates the refresh token on every refresh and revokes the access token of the
spent one; a refresh with a narrower ``scope`` narrows the whole chain for good.
After `compozy auth token --scope openid`, the default token and `--force-new` must
both work at the provider's userinfo, with the session's scopes intact or a warning
that says they were lost and how to get them back.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import httpx
import pytest

from support.agent import AgentEnv, AgentProcess, run_cli
from support.dot_provider import DotProvider, complete_browser_login
from support.login import CLI, reaped

pytestmark = pytest.mark.real_provider

SCOPES = ["openid", "profile", "email", "offline_access", "compozy:read"]


def configure_dot(agent_env: AgentEnv, provider: DotProvider, *extra: str) -> None:
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    agent_env.config.write_text("\n".join([
        "profiles:",
        "  default:",
        f"    issuer: {provider.issuer}",
        f"    client_id: {provider.client_id}",
        f"    scopes: [{', '.join(SCOPES)}]",
        *extra,
    ]) + "\n")


def login_browser_dot(agent_env: AgentEnv) -> subprocess.CompletedProcess[str]:
    """`compozy login --no-browser`, with the person signing in on DOT's pages."""
    proc = subprocess.Popen([*CLI, "login", "--no-browser"], env=agent_env.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        assert proc.stderr is not None
        shown = []
        for line in proc.stderr:
            shown.append(line)
            if line.startswith("  http"):
                callback = complete_browser_login(line.strip())
                shown.append(f"[callback page {httpx.get(callback, timeout=30).status_code}]\n")
                break
        stdout, rest = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(shown) + rest)


class Issued:
    """A token the CLI printed; compared and shown by fingerprint, never by value."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.fingerprint = hashlib.sha256(value.encode()).hexdigest()[:12]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Issued) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"<token {self.fingerprint}>"


def token(agent_env: AgentEnv, *args: str) -> Issued:
    result = run_cli(agent_env, "auth", "token", *args)
    assert result.returncode == 0, result.stderr
    return Issued(result.stdout.strip())


def works(provider: DotProvider, issued: Issued) -> int:
    """userinfo's status for the token: 200 live, 401 dead."""
    return provider.userinfo_status(issued.value)


def status(agent_env: AgentEnv) -> dict[str, object]:
    result = run_cli(agent_env, "auth", "status", "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_a_narrower_token_then_the_default_and_force_new_at_dot(
    agent_env: AgentEnv, agent: AgentProcess, dot_provider: DotProvider,
) -> None:
    configure_dot(agent_env, dot_provider)
    login = login_browser_dot(agent_env)
    assert login.returncode == 0, login.stderr
    first = token(agent_env)
    assert works(dot_provider, first) == 200

    narrower = token(agent_env, "--scope", "openid")
    assert narrower != first
    assert works(dot_provider, narrower) == 200
    assert works(dot_provider, first) == 401  # DOT revoked it on the rotation

    # Never the token DOT killed; what the session still holds, and a warning.
    default = token(agent_env)
    assert default != first
    assert works(dot_provider, default) == 200
    document = status(agent_env)
    session = document["session"]
    assert isinstance(session, dict)
    assert set(session["missing_scopes"]) == set(SCOPES) - {"openid"}
    warnings = " ".join(document["warnings"])  # type: ignore[arg-type]
    assert "no longer grants" in warnings and "compozy login" in warnings
    text = run_cli(agent_env, "auth", "status")
    assert "compozy login" in text.stdout + text.stderr

    forced = token(agent_env, "--force-new")
    assert forced != default
    assert works(dot_provider, forced) == 200

    # Learnt: `--scope` no longer narrows by refresh; the full token is handed out.
    calls = dot_provider.count_token_calls("refresh_token")
    assert token(agent_env, "--scope", "openid") == forced
    assert dot_provider.count_token_calls("refresh_token") == calls
    assert "downscope: never" in agent.log()

    # A new login gets the full scopes back, and the next `--scope` keeps them.
    login = login_browser_dot(agent_env)
    assert login.returncode == 0, login.stderr
    fresh = token(agent_env)
    assert token(agent_env, "--scope", "openid") == fresh
    assert token(agent_env) == fresh
    assert works(dot_provider, fresh) == 200
    session = status(agent_env)["session"]
    assert isinstance(session, dict) and session.get("missing_scopes", []) == []


def test_downscope_never_from_the_config_keeps_the_session_whole_at_dot(
    agent_env: AgentEnv, agent: AgentProcess, dot_provider: DotProvider,
) -> None:
    configure_dot(agent_env, dot_provider, "    downscope: never")
    login = login_browser_dot(agent_env)
    assert login.returncode == 0, login.stderr
    first = token(agent_env)
    calls = dot_provider.count_token_calls("refresh_token")
    assert token(agent_env, "--scope", "openid") == first
    assert dot_provider.count_token_calls("refresh_token") == calls
    forced = token(agent_env, "--force-new")
    assert works(dot_provider, forced) == 200
    session = status(agent_env)["session"]
    assert isinstance(session, dict) and session.get("missing_scopes", []) == []
