"""No token leaks: not into logs, the state file, error text, or any process's argv/environment.

The session uses the opt-in file store, so the test can read every refresh
token the agent ever held; access tokens are collected from `compozy auth
token`. Then every place a secret must never be is searched for all of them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from support.agent import AgentEnv, run_cli, start_agent
from support.login import configure, login_browser
from support.provider import OidcTestProvider

pytestmark = pytest.mark.real_provider


def process_texts() -> str:
    """argv and environment of every process we can read, as `ps e` would show them."""
    texts = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            for name in ("cmdline", "environ"):
                with contextlib.suppress(OSError):
                    texts.append((entry / name).read_bytes().decode(errors="replace"))
    return "\n".join(texts)


def test_tokens_appear_nowhere_they_must_not(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider, storage="file")
    agent = start_agent(agent_env)
    try:
        outputs = [login_browser(agent_env)]
        secrets_file = agent_env.state_dir / "secrets.json"
        refresh_tokens = set(json.loads(secrets_file.read_text()).values())
        access_tokens = set()
        for args in (["auth", "token"], ["auth", "refresh"], ["auth", "token"],
                     ["auth", "token", "--audience", oidc_provider.api, "--scope",
                      "compozy:read"], ["auth", "token", "--force-new"]):
            result = run_cli(agent_env, *args)
            assert result.returncode == 0, result.stderr
            outputs.append(result)
            if args[1] == "token":
                access_tokens.add(result.stdout.strip())
            refresh_tokens |= set(json.loads(secrets_file.read_text()).values())
        # Errors too: a bad request carrying a token-looking value, an unknown token id.
        outputs.append(run_cli(agent_env, "auth", "revoke", "nope"))
        outputs.append(run_cli(agent_env, "auth", "status", "--json"))
        outputs.append(run_cli(agent_env, "auth", "list", "--json"))
        ps = process_texts()
        logout = run_cli(agent_env, "logout")
        assert logout.returncode == 0, logout.stderr
        outputs.append(logout)
    finally:
        agent.stop()

    secrets = {t for t in access_tokens | refresh_tokens if t}
    assert len(access_tokens) >= 3 and len(refresh_tokens) >= 3  # rotation happened
    state = (agent_env.state_dir / "sessions.json").read_text()
    stderr = "\n".join(o.stderr for o in outputs)
    non_token_stdout = "\n".join(o.stdout for o in outputs[-4:])  # status, list, revoke, logout
    places = {
        "agent log": agent.log(),
        "state file": state,
        "CLI messages (stderr)": stderr,
        "status/list output": non_token_stdout,
        "process argv/environment": ps,
    }
    for place, text in places.items():
        leaked = [t[:8] + "..." for t in secrets if t in text]
        assert not leaked, f"tokens found in {place}: {leaked}"
    assert (agent_env.state_dir / "secrets.json").stat().st_mode & 0o777 == 0o600
