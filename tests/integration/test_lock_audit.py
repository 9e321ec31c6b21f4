"""`compozy auth lock/unlock` and `compozy auth log` against a real agent and the real CLI:
a lock that survives a restart, callers bound at connect, safe printing, floods."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from compozy_agent.agent_lock import FIRST_DELAY, LOCK_FILE
from compozy_agent.audit import FAILURES_PER_CALLER
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
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


def test_guessers_in_parallel_cannot_keep_the_owner_waiting(agent: AgentProcess) -> None:
    # Early attempts used to queue, each waiting out the doubling delay: six wrong
    # passphrases at once held the owner's right one for 31.8 s. Now one is checked,
    # the rest are refused unchecked with the time left, and the owner waits one delay.
    env = agent.agent_env
    store_key(agent)
    assert run_cli(env, "auth", "lock", "--passphrase-stdin",
                   input="s3cret phrase\n").returncode == 0
    def guess(number: int) -> str:
        answer = ask(agent.socket, {"id": number, "op": "unlock", "passphrase": f"guess {number}"},
                     timeout=5.0)
        return str(answer["error"]["code"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = sorted(pool.map(guess, range(8)))
    assert codes.count("wrong_passphrase") >= 1 and set(codes) <= {"wrong_passphrase", "busy"}
    assert codes.count("busy") >= 4  # not queued behind each other's delays
    right = run_cli(env, "auth", "unlock", "--passphrase-stdin", input="s3cret phrase\n")
    assert right.returncode == 0, right.stderr
    assert run_cli(env, "auth", "token").stdout.strip() == KEY


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
    argv = cli["self_reported_argv"]
    assert "compozy_client.cli" in " ".join(argv) and "token" in argv
    assert cli["process_at_request"] == "same" and isinstance(cli["start_time"], int)
    assert (refused["profile"], refused["outcome"]) == ("nobody", "not_logged_in")
    assert raw["pid"] == os.getpid() and raw["pid"] != 1
    assert "trusted-tool" not in json.dumps(raw)
    assert document["path"].endswith("audit.log")
    assert document["failed_path"].endswith("audit-failed.log")
    with open(document["path"]) as file:
        on_disk = file.read()
    with open(document["failed_path"]) as file:
        on_disk += file.read()
    assert os.stat(document["path"]).st_mode & 0o077 == 0
    assert len(on_disk.splitlines()) >= 3
    text = run_cli(env, "auth", "log", "--limit", "2").stdout
    assert "PROFILE" in text and "not_logged_in" in text and "issued" in text
    assert "ARGV (SELF-REPORTED)" in text
    for where in (log.stdout, on_disk, text, agent.log()):
        assert KEY not in where


# --------------------------------------------------------------------------
# The lock outlives the agent.


PASSPHRASE = "s3cret phrase"


def _lock(env: AgentEnv) -> None:
    locked = run_cli(env, "auth", "lock", "--passphrase-stdin", input=PASSPHRASE + "\n")
    assert locked.returncode == 0, locked.stderr


def _unlock(env: AgentEnv, passphrase: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "auth", "unlock", "--passphrase-stdin", input=passphrase + "\n")


def _keep_sessions_across_restarts(env: AgentEnv) -> None:
    """The test keyring is keyring's "fail" backend: without this, sessions end with the agent."""
    env.config.parent.mkdir(parents=True, exist_ok=True)
    env.config.write_text("storage: file\n")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_locked_agent_restarts_locked(agent_env: AgentEnv, sig: signal.Signals) -> None:
    _keep_sessions_across_restarts(agent_env)
    first = start_agent(agent_env)
    store_key(first)
    _lock(agent_env)
    first.stop(sig)

    second = start_agent(agent_env)
    try:
        refused = run_cli(agent_env, "auth", "token")
        assert refused.returncode == 1 and refused.stdout == ""
        assert "locked" in refused.stderr
        assert "starting locked" in second.log()
        status = json.loads(run_cli(agent_env, "auth", "status", "--json").stdout)
        assert status["agent"]["locked"] is True
        assert _unlock(agent_env, PASSPHRASE).returncode == 0
        assert run_cli(agent_env, "auth", "token").stdout.strip() == KEY
        assert not (agent_env.state_dir / LOCK_FILE).exists()
    finally:
        second.stop()
    # Unlocked stays unlocked across the next restart.
    third = start_agent(agent_env)
    try:
        assert run_cli(agent_env, "auth", "token").stdout.strip() == KEY
    finally:
        third.stop()
    assert "s3cret" not in first.log() + second.log()


def test_the_wrong_passphrase_delay_survives_a_restart(agent_env: AgentEnv) -> None:
    _keep_sessions_across_restarts(agent_env)
    first = start_agent(agent_env)
    store_key(first)
    _lock(agent_env)
    wrong = _unlock(agent_env, "guess one")
    assert wrong.returncode == 1 and "1 in a row" in wrong.stderr
    first.stop(signal.SIGKILL)

    second = start_agent(agent_env)
    try:
        started = time.monotonic()
        again = _unlock(agent_env, "guess two")
        waited = time.monotonic() - started
        assert again.returncode == 1
        assert "2 in a row; the next attempt is checked in 1 s" in again.stderr
        # The first wrong attempt's delay held after the restart: the agent refused the
        # attempt unchecked and the CLI waited it out before sending it again.
        assert "checks this one in" in again.stderr
        assert waited >= FIRST_DELAY
        assert _unlock(agent_env, PASSPHRASE).returncode == 0
        assert run_cli(agent_env, "auth", "token").stdout.strip() == KEY
    finally:
        second.stop()


# --------------------------------------------------------------------------
# The audit log: identity bound at connect, printed safely, not erased by a flood.

#: A client that connects and waits for the answer to a hello: by then the agent has
#: looked at who connected.
_CONNECT_AND_HELLO = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"id": 1, "op": "hello"}\\n')
reply = b""
while not reply.endswith(b"\\n"):
    reply += sock.recv(65536)
"""


def _entries(env: AgentEnv, *args: str) -> list[dict[str, Any]]:
    result = run_cli(env, "auth", "log", "--json", "--limit", "1000", *args)
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, Any]] = json.loads(result.stdout)["entries"]
    return entries


def test_the_entry_names_what_connected_not_what_it_execd_into(agent: AgentProcess) -> None:
    store_key(agent)
    # Python connects (and is looked at), then execs a shell that asks on the same socket.
    script = ("printf '%s\\n' '{\"id\": 2, \"op\": \"token\"}' >&9; IFS= read -r reply <&9; "
              "case \"$reply\" in *'\"ok\":true'*) echo issued;; *) echo refused;; esac")
    code = _CONNECT_AND_HELLO + (
        "os.dup2(sock.fileno(), 9)\n"
        f"os.execv('/bin/sh', ['sh', '-c', {script!r}])\n")
    done = subprocess.run([sys.executable, "-c", code, agent.socket], capture_output=True,
                          text=True, timeout=60, env=agent.agent_env.env())
    assert done.stdout == "issued\n", done.stderr
    [entry] = _entries(agent.agent_env)[-1:]
    assert entry["outcome"] == "issued"
    assert entry["exe"] == os.path.realpath(sys.executable)  # what connected
    assert entry["process_at_request"] == "exec"
    assert entry["exe_at_request"] == os.path.realpath("/bin/sh")
    assert entry["self_reported_argv"][:2] == [sys.executable, "-c"]
    text = run_cli(agent.agent_env, "auth", "log", "--limit", "1").stdout
    assert f"then exec'd {os.path.realpath('/bin/sh')}" in text


def test_a_caller_that_exited_before_its_request_keeps_the_identity_it_connected_with(
    agent: AgentProcess,
) -> None:
    store_key(agent)
    # Connect, fork, and exit; the child, once its parent is gone, asks on the connection.
    code = _CONNECT_AND_HELLO + """
import select
parent = os.getpid()
print(parent, flush=True)
if os.fork() == 0:
    try:
        pidfd = os.pidfd_open(parent)
        select.select([pidfd], [], [], 30)
    except ProcessLookupError:
        pass
    sock.sendall(b'{"id": 2, "op": "token"}\\n')
    reply = b""
    while not reply.endswith(b"\\n"):
        reply += sock.recv(65536)
    print("issued" if b'"ok":true' in reply else "refused", flush=True)
os._exit(0)
"""
    # stdout reaches EOF only when the child, which holds it too, has finished.
    done = subprocess.run([sys.executable, "-c", code, agent.socket], capture_output=True,
                          text=True, timeout=60, env=agent.agent_env.env())
    parent_pid, outcome = done.stdout.split()
    assert outcome == "issued", done.stderr
    [entry] = _entries(agent.agent_env)[-1:]
    assert entry["pid"] == int(parent_pid)
    assert entry.get("exe") == os.path.realpath(sys.executable)
    assert entry["self_reported_argv"][:2] == [sys.executable, "-c"]
    assert entry["process_at_request"] == "gone"
    assert f"{parent_pid} (gone)" in run_cli(agent.agent_env, "auth", "log", "--limit", "1").stdout


def test_control_characters_in_a_command_line_are_printed_escaped(agent: AgentProcess) -> None:
    env = agent.agent_env
    # argv[0] is whatever a program says it is: a forged row, escape codes, a bidi override.
    name = "t\n2026-01-01 issued \x1b[2J\x1b[31m\u202eevil\u202c\x9b2J"
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(b'{\"id\": 1, \"op\": \"token\", \"profile\": \"p\\\\u001b[1m\\\\n\"}\\n')\n"
            "s.recv(65536)\n")
    done = subprocess.run([name, "-c", code, agent.socket], executable=sys.executable,
                          capture_output=True, timeout=60, env=env.env())
    assert done.returncode == 0, done.stderr

    text = run_cli(env, "auth", "log").stdout
    lines = text.splitlines()
    assert len(lines) == 2  # the header and the one entry: no forged row
    for raw in ("\x1b", "\x9b", "\u202e", "\u202c"):
        assert raw not in text
    assert "t\\n2026-01-01" in text and "\\x1b[2J" in text and "\\u202eevil" in text
    assert "\\x9b2J" in text and "p\\x1b[1m\\n" in text  # the profile name too

    printed_json = run_cli(env, "auth", "log", "--json").stdout
    for raw in ("\x1b", "\x9b", "\u202e"):
        assert raw not in printed_json
    [entry] = json.loads(printed_json)["entries"]
    assert entry["self_reported_argv"][0] == name  # escaped for printing, not altered
    on_disk = (env.state_dir / "audit-failed.log").read_bytes()
    for raw in (b"\x1b", "\x9b".encode(), "\u202e".encode()):
        assert raw not in on_disk
    assert json.loads(on_disk)["self_reported_argv"][0] == name


def _burst(path: str, requests: list[bytes], batch: int = 100) -> list[dict[str, Any]]:
    """Send ``requests`` pipelined on one connection, ``batch`` at a time; the answers."""
    answers: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(path)
        buffer = b""
        for start in range(0, len(requests), batch):
            chunk = requests[start:start + batch]
            sock.sendall(b"".join(chunk))
            while buffer.count(b"\n") < len(chunk):
                data = sock.recv(1 << 20)
                assert data, "the agent closed the connection"
                buffer += data
            *lines, buffer = buffer.split(b"\n")
            answers += [json.loads(line) for line in lines]
    return answers


def test_a_flood_of_failures_cannot_erase_an_issued_entry(agent: AgentProcess) -> None:
    env = agent.agent_env
    store_key(agent)
    assert run_cli(env, "auth", "token").returncode == 0  # the entry to keep
    issued = _entries(env)
    assert [e["outcome"] for e in issued] == ["issued"]

    # 2,500 failing requests, each different (1 MB of entries), then 2,500 identical ones.
    varied = [json.dumps({"id": n, "op": "token", "profile": f"flood-{n}-" + "x" * 110,
                          "audience": "https://api.example/" + "y" * 200})
              .encode() + b"\n" for n in range(2500)]
    same = [json.dumps({"id": n, "op": "token", "profile": "nobody"}).encode() + b"\n"
            for n in range(2500)]
    started = time.monotonic()
    answers = _burst(agent.socket, varied) + _burst(agent.socket, same)
    elapsed = time.monotonic() - started
    assert len(answers) == 5000
    assert all(a["error"]["code"] == "not_logged_in" for a in answers)

    shown = run_cli(env, "auth", "log").stdout  # the default 20 newest
    assert "issued" in shown, shown
    with open(env.state_dir / "audit.log") as file:
        assert [json.loads(line)["outcome"] for line in file] == ["issued"]
    assert _entries(env, "--issued") == issued
    failed = _entries(env, "--failed")
    # One caller: its first failures one by one, the rest counted in one entry.
    assert sum(e.get("count", 1) for e in failed) == 5000
    assert len(failed) == FAILURES_PER_CALLER + 1
    on_disk = sum(len(path.read_bytes()) for path in env.state_dir.glob("audit-failed.log*"))
    assert on_disk < 64 * 1024, on_disk  # contained, not 1 MB
    print(f"flood of 5,000 failing requests took {elapsed:.2f} s")
