"""Corrupt or unreadable files: a clear message naming the file and what to do; nothing
overwritten, the agent keeps serving."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support.agent import AgentEnv, can_connect, prepare_dirs, run_cli, start_agent
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


# --------------------------------------------------------------------------
# The agent's own files: never through a planted link, always 0600, in a private directory.


def _victim(agent_env: AgentEnv) -> Path:
    victim = agent_env.root / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    return victim


def _unchanged(victim: Path) -> bool:
    return victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644


def _start_daemon(agent_env: AgentEnv) -> subprocess.CompletedProcess[str]:
    """`compozy-agent --daemon`: it logs to agent.log in the state directory."""
    prepare_dirs(agent_env)
    return subprocess.run([sys.executable, "-m", "compozy_agent", "--daemon"],
                          capture_output=True, text=True, timeout=60, env=agent_env.env(),
                          stdin=subprocess.DEVNULL)


def test_a_planted_agent_log_link_is_refused_and_its_target_untouched(
    agent_env: AgentEnv,
) -> None:
    victim = _victim(agent_env)
    agent_env.state_dir.mkdir(mode=0o700, parents=True)
    (agent_env.state_dir / "agent.log").symlink_to(victim)
    started = _start_daemon(agent_env)
    assert started.returncode == 1, started.stderr
    assert "agent.log is a symbolic link; refusing to follow it" in started.stderr
    assert _unchanged(victim)
    assert not can_connect(agent_env.socket)


def test_a_state_directory_others_can_write_is_refused_before_anything_is_written(
    agent_env: AgentEnv,
) -> None:
    agent_env.state_dir.mkdir(parents=True)
    agent_env.state_dir.chmod(0o770)
    started = _start_daemon(agent_env)
    assert started.returncode == 1, started.stderr
    assert "is writable by others; run: chmod 700" in started.stderr
    assert str(agent_env.state_dir) in started.stderr
    assert list(agent_env.state_dir.iterdir()) == []  # no agent.log, nothing


def test_a_planted_audit_log_link_is_refused_and_its_target_untouched(
    agent_env: AgentEnv,
) -> None:
    victim = _victim(agent_env)
    agent_env.state_dir.mkdir(mode=0o700, parents=True)
    (agent_env.state_dir / "audit.log").symlink_to(victim)
    agent = start_agent(agent_env)
    try:
        assert run_cli(agent_env, "login", "--with-api-key", input=KEY + "\n").returncode == 0
        assert run_cli(agent_env, "auth", "token").stdout.strip() == KEY
        status = json.loads(run_cli(agent_env, "auth", "status", "--json").stdout)
        assert any("audit.log is a symbolic link" in w for w in status["warnings"])
        assert "audit.log is a symbolic link; refusing to follow it" in agent.log()
        # The entry is kept in memory all the same.
        log = json.loads(run_cli(agent_env, "auth", "log", "--json").stdout)
        assert [e["outcome"] for e in log["entries"]] == ["issued"]
    finally:
        agent.stop()
    assert _unchanged(victim)


def test_a_planted_socket_lock_link_is_refused_and_its_target_untouched(
    agent_env: AgentEnv,
) -> None:
    victim = _victim(agent_env)
    socket_dir = Path(agent_env.socket).parent
    socket_dir.mkdir(mode=0o700, parents=True)
    Path(agent_env.socket + ".lock").symlink_to(victim)
    agent = start_agent(agent_env, wait=False)
    assert agent.proc.wait(30) == 1
    agent.stop()
    assert "agent.sock.lock is a symbolic link; refusing to follow it" in agent.log()
    assert _unchanged(victim)


def test_an_audit_log_others_can_read_is_made_private(agent_env: AgentEnv) -> None:
    agent_env.state_dir.mkdir(mode=0o700, parents=True)
    audit_log = agent_env.state_dir / "audit.log"
    audit_log.write_text("")
    audit_log.chmod(0o644)
    lock_file = Path(agent_env.socket + ".lock")
    lock_file.parent.mkdir(mode=0o700, parents=True)
    lock_file.write_text("")
    lock_file.chmod(0o644)
    agent = start_agent(agent_env)
    try:
        assert stat.S_IMODE(audit_log.stat().st_mode) == 0o600
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    finally:
        agent.stop()


def test_a_corrupt_lock_file_keeps_the_agent_locked_and_says_how_to_recover(
    agent_env: AgentEnv,
) -> None:
    agent_env.state_dir.mkdir(mode=0o700, parents=True)
    lock_file = agent_env.state_dir / "agent-lock.json"
    lock_file.write_bytes(b'{"version": 1, "salt": "00')
    agent = start_agent(agent_env)
    try:
        token = run_cli(agent_env, "auth", "token")
        assert token.returncode == 1 and "locked" in token.stderr
        assert f"the lock file {lock_file} cannot be used (it is corrupt)" in agent.log()
        status = json.loads(run_cli(agent_env, "auth", "status", "--json").stdout)
        assert status["agent"]["locked"] is True
        assert any("delete it and restart the agent" in w for w in status["warnings"])
        unlock = run_cli(agent_env, "auth", "unlock", "--passphrase-stdin", input="any\n")
        assert unlock.returncode == 1 and "no passphrase can unlock it" in unlock.stderr
        assert lock_file.read_bytes() == b'{"version": 1, "salt": "00'  # left to be looked at
    finally:
        agent.stop()
    # The way out the message gives: delete the file, restart the agent.
    lock_file.unlink()
    agent = start_agent(agent_env)
    try:
        status = json.loads(run_cli(agent_env, "auth", "status", "--json").stdout)
        assert status["agent"]["locked"] is False
    finally:
        agent.stop()


def _as_another_user(command: str) -> subprocess.CompletedProcess[str]:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user (uid 65534, nobody)")
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "/bin/sh", "-c", command],
                          capture_output=True, text=True, timeout=30, cwd="/",
                          env={"PATH": "/usr/bin:/bin"})


def test_a_state_directory_another_user_could_swap_is_refused_before_anything_is_written(
    agent_env: AgentEnv,
) -> None:
    """COMPOZY_STATE_DIR inside a directory anyone may write (a shared project directory).

    The attack, before the fix: the other user renames the state directory away and
    puts one of theirs in its place; `compozy auth lock` then wrote agent-lock.json
    there, the other user deleted it and put the real directory back, and the next
    agent (after a reboot, say) started unlocked and handed out the token.
    """
    agent_env.root.chmod(0o755)
    shared = agent_env.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    state = shared / "state"
    state.mkdir(mode=0o700)
    agent_env.extra["COMPOZY_STATE_DIR"] = str(state)
    # The other user can indeed swap it, though it is ours and 0700.
    swapped = _as_another_user(f"mv {state} {shared}/mine && mkdir -m 777 {state} && "
                               f"rmdir {state} && mv {shared}/mine {state}")
    assert swapped.returncode == 0, swapped.stderr

    started = _start_daemon(agent_env)
    assert started.returncode == 1, started.stderr
    assert f"inside {shared}, which anyone may write" in started.stderr
    assert "another user could replace the state directory" in started.stderr
    assert list(state.iterdir()) == []  # no agent.log, no lock, nothing
    assert not can_connect(agent_env.socket)
