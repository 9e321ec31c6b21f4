"""Corrupt or unreadable files: a clear message naming the file and what to do; nothing
overwritten, the agent keeps serving."""

from __future__ import annotations

import json

from support.agent import AgentEnv, run_cli, start_agent
from support.wire import ask

KEY = "cpz_test_key_3b1f"


def test_a_corrupt_state_file_is_named_and_never_overwritten(agent_env: AgentEnv) -> None:
    agent_env.state_dir.mkdir(mode=0o700, parents=True)
    state = agent_env.state_dir / "sessions.json"
    state.write_bytes(b'{"version": 1, "sessions": [{"token_id": ')
    state.chmod(0o600)
    agent = start_agent(agent_env)
    try:
        status = run_cli(agent_env, "auth", "status")
        assert status.returncode == 1
        assert f"{state} is corrupt; move it aside" in status.stderr
        stored = run_cli(agent_env, "login", "--with-api-key", input=KEY + "\n")
        assert stored.returncode == 1
        assert "not overwriting the unreadable state file" in stored.stderr
        assert str(state) in stored.stderr
        assert state.read_bytes() == b'{"version": 1, "sessions": [{"token_id": '
        assert ask(agent.socket, {"id": 1, "op": "hello"})["ok"] is True
        # Moved aside, as the message says: everything works again, without a restart.
        state.rename(state.with_suffix(".json.bad"))
        assert run_cli(agent_env, "login", "--with-api-key", input=KEY + "\n").returncode == 0
        assert run_cli(agent_env, "auth", "token").stdout.strip() == KEY
    finally:
        agent.stop()
    assert KEY not in agent.log()


def test_an_unreadable_state_file_is_named(agent_env: AgentEnv) -> None:
    # A directory where the file should be: unreadable even for root, unlike chmod 000.
    (agent_env.state_dir / "sessions.json").mkdir(parents=True)
    agent = start_agent(agent_env)
    try:
        status = run_cli(agent_env, "auth", "status")
        assert "cannot read" in status.stderr and "sessions.json" in status.stderr
        assert "move it aside" in status.stderr
        assert ask(agent.socket, {"id": 1, "op": "hello"})["ok"] is True
    finally:
        agent.stop()


def test_a_broken_config_file_does_not_stop_the_agent(agent_env: AgentEnv) -> None:
    agent_env.config.parent.mkdir(parents=True)
    agent_env.config.write_text("profiles: [unclosed\n")
    agent = start_agent(agent_env)
    try:
        assert "using automatic storage" in agent.log()
        answer = ask(agent.socket, {"id": 1, "op": "login_start", "flow": "device"})
        assert answer["error"]["code"] == "config_error"
        assert str(agent_env.config) in answer["error"]["message"]
        cli = run_cli(agent_env, "auth", "status")
        assert cli.returncode == 1 and str(agent_env.config) in cli.stderr
        assert "Traceback" not in cli.stderr
        assert agent_env.config.read_text() == "profiles: [unclosed\n"
    finally:
        agent.stop()


def test_storage_keyring_without_a_keyring_says_so_and_keeps_serving(
    agent_env: AgentEnv,
) -> None:
    # The environment's keyring backend is keyring's "fail" backend: no keyring works.
    agent_env.config.parent.mkdir(parents=True)
    agent_env.config.write_text("storage: keyring\n")
    agent = start_agent(agent_env)
    try:
        status = run_cli(agent_env, "auth", "status", "--json")
        document = json.loads(status.stdout)
        assert document["storage"]["persistent"] is False
        assert any("storage: keyring is set in the config, but there is no working keyring"
                   in w for w in document["warnings"])
        stored = run_cli(agent_env, "login", "--with-api-key", input=KEY + "\n")
        assert stored.returncode == 1 and "no working keyring" in stored.stderr
        assert not (agent_env.state_dir / "sessions.json").exists()
    finally:
        agent.stop()
    assert KEY not in agent.log()
