"""`compozy auth lock/unlock` and `compozy auth log` against a real agent and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.agent import AgentProcess, run_cli
from support.wire import ask

KEY = "cpz_canary_9f83c1e07b"


def store_key(agent: AgentProcess) -> None:
    result = run_cli(agent.agent_env, "login", "--with-api-key", input=KEY + "\n")
    assert result.returncode == 0, result.stderr


def test_a_locked_agent_hands_out_nothing_until_unlocked(agent: AgentProcess) -> None:
    env = agent.agent_env
    store_key(agent)
    locked = run_cli(env, "auth", "lock", "--passphrase-stdin", input="s3cret phrase\n")
    assert locked.returncode == 0, locked.stderr
    refused = run_cli(env, "auth", "token")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "locked" in refused.stderr and "compozy auth unlock" in refused.stderr
    for op in ({"op": "list"}, {"op": "audit_log"}, {"op": "logout"}):
        assert ask(agent.socket, {"id": 1, **op})["error"]["code"] == "locked"
    status = run_cli(env, "auth", "status", "--json")
    assert json.loads(status.stdout)["agent"]["locked"] is True
    assert "Locked" in run_cli(env, "auth", "status").stdout

    wrong = run_cli(env, "auth", "unlock", "--passphrase-stdin", input="guess\n")
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    assert run_cli(env, "auth", "token").returncode == 1
    right = run_cli(env, "auth", "unlock", "--passphrase-stdin", input="s3cret phrase\n")
    assert right.returncode == 0, right.stderr
    assert run_cli(env, "auth", "token").stdout.strip() == KEY
    assert "s3cret" not in agent.log() and "guess" not in agent.log()


def test_the_passphrase_never_comes_from_argv(agent: AgentProcess) -> None:
    env = agent.agent_env
    assert run_cli(env, "auth", "lock", "hunter2").returncode == 2  # no such argument
    # No terminal (a new session has none) and no --passphrase-stdin: a usage error.
    result = subprocess.run(
        [sys.executable, "-c", "from compozy_client.cli import main; main()", "auth", "lock"],
        capture_output=True, text=True, timeout=60, env=env.env(), stdin=subprocess.DEVNULL,
        start_new_session=True)
    assert result.returncode == 2 and "--passphrase-stdin" in result.stderr
    assert json.loads(run_cli(env, "auth", "status", "--json").stdout)["agent"]["locked"] is False


def test_the_audit_log_names_each_caller_as_the_kernel_reports_it(agent: AgentProcess) -> None:
    env = agent.agent_env
    store_key(agent)
    token = run_cli(env, "auth", "token")
    assert token.returncode == 0
    missing = run_cli(env, "auth", "token", "--profile", "nobody")
    assert missing.returncode == 1
    # A raw client claiming to be someone else gains nothing: there is no field for it.
    ask(agent.socket, {"id": 7, "op": "token", "client": "trusted-tool", "pid": 1})

    log = run_cli(env, "auth", "log", "--json")
    assert log.returncode == 0, log.stderr
    document = json.loads(log.stdout)
    cli, refused, raw = document["entries"][-3:]
    assert (cli["profile"], cli["outcome"], cli["kind"]) == ("default", "issued", "api_key")
    assert cli["uid"] == os.getuid() and cli["exe"] == os.path.realpath(sys.executable)
    assert "compozy_client.cli" in " ".join(cli["cmdline"]) and "token" in cli["cmdline"]
    assert (refused["profile"], refused["outcome"]) == ("nobody", "not_logged_in")
    assert raw["pid"] == os.getpid() and raw["pid"] != 1
    assert "trusted-tool" not in json.dumps(raw)
    assert document["path"].endswith("audit.log")
    with open(document["path"]) as file:
        on_disk = file.read()
    assert os.stat(document["path"]).st_mode & 0o077 == 0
    assert len(on_disk.splitlines()) >= 3
    text = run_cli(env, "auth", "log", "--limit", "2").stdout
    assert "PROFILE" in text and "not_logged_in" in text and "issued" in text
    for where in (log.stdout, on_disk, text, agent.log()):
        assert KEY not in where
