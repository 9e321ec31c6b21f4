"""A real agent process on a private socket, driven through the socket and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from compozy_agent.server import DESCRIPTORS_PER_CONNECTION
from compozy_client import AgentUnavailable
from compozy_client import protocol as p
from compozy_client.api import async_get_token, get_token
from support.agent import (
    AgentEnv,
    AgentProcess,
    agent_pids,
    can_connect,
    prepare_dirs,
    run_cli,
    settled_agent_pids,
    start_agent,
)
from support.other_user import answer_to_another_user


class LineClient:
    """A raw JSON-lines client, as a tool in another language would be."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any] | None:
        """The next response, or None once the agent has closed the connection."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our unread bytes still queued
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(json.dumps(request).encode() + b"\n")
        response = self.read()
        assert response is not None
        return response

    def close(self) -> None:
        self.sock.close()


def ask_once(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh connection."""
    client = LineClient(path)
    try:
        return client.ask(request)
    finally:
        client.close()


def test_socket_and_directory_are_private(agent: AgentProcess) -> None:
    info = os.stat(agent.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(agent.socket)).st_mode) == 0o700


def test_hello_and_status(agent: AgentProcess) -> None:
    client = LineClient(agent.socket)
    hello = client.ask({"id": 1, "op": "hello"})
    assert hello["ok"] is True and hello["id"] == 1
    result = hello["result"]
    assert isinstance(result, dict)
    assert result["protocol"] == 1 and result["pid"] == agent.pid
    assert "token" in result["ops"]
    status = client.ask({"id": "s", "op": "status"})
    assert status["id"] == "s" and status["ok"] is True
    client.close()


def test_pipelined_requests_are_answered_in_order_with_their_ids(agent: AgentProcess) -> None:
    client = LineClient(agent.socket)
    ids = list(range(1, 51))
    client.send(b"".join(json.dumps({"id": i, "op": "hello"}).encode() + b"\n" for i in ids))
    assert [client.read()["id"] for _ in ids] == ids
    client.close()


def test_bad_requests_get_typed_errors_and_the_connection_survives(agent: AgentProcess) -> None:
    client = LineClient(agent.socket)
    client.send(b"this is not json\n")
    assert client.read() == {"id": None, "ok": False, "error": {
        "code": "bad_request", "message": "request is not a JSON object with an id and an op"}}
    assert client.ask({"id": 2, "op": "teleport"})["error"]["code"] == "unknown_op"
    assert client.ask({"id": 3, "op": "token", "min_valid": "x"})["error"]["code"] == "bad_request"
    assert client.ask({"id": 4, "op": "hello", "v": 99})["error"]["code"] == "unsupported_version"
    client.send(b"\x00\xff\xfe\n\n   \n")
    assert client.read()["error"]["code"] == "bad_request"
    assert client.ask({"id": 5, "op": "hello"})["ok"] is True
    client.close()


def test_ops_on_an_agent_without_sessions_answer_clearly(agent: AgentProcess) -> None:
    client = LineClient(agent.socket)
    expected = [
        ("token", {}, "not_logged_in"),
        ("refresh", {"profile": "dev"}, "not_logged_in"),
        ("revoke", {"token_id": "x"}, "unknown_token_id"),
        ("login_wait", {"login_id": "x"}, "unknown_login"),
        ("login_cancel", {"login_id": "x"}, "unknown_login"),
    ]
    for op, fields, code in expected:
        response = client.ask({"id": 1, "op": op, **fields})
        assert response["ok"] is False and response["error"]["code"] == code, (op, response)
    assert client.ask({"id": 2, "op": "revoke_all"})["result"]["forgotten"] == []
    assert client.ask({"id": 3, "op": "logout"})["result"]["forgotten"] == []
    client.close()


def test_a_line_over_the_limit_is_refused_and_closed(agent: AgentProcess) -> None:
    client = LineClient(agent.socket)
    client.send(b'{"id": 1, "op": "hello", "pad": "' + b"x" * (70 * 1024))
    response = client.read()
    assert response is not None and response["error"]["code"] == "line_too_long"
    assert client.read() is None  # closed
    client.close()
    assert ask_once(agent.socket, {"id": 1, "op": "hello"})["ok"] is True


def test_a_line_over_the_limit_is_refused_however_it_arrives(agent: AgentProcess) -> None:
    """The limit held only when the agent's buffer filled before the newline came: a
    line whose end arrived in one read with its newline got through up to 128 KiB."""
    client = LineClient(agent.socket)
    start = b'{"id": 1, "op": "hello", "pad": "' + b"x" * 1000
    client.send(b'{"id": 0, "op": "hello"}\n' + start)  # read together with the hello
    assert client.read()["id"] == 0  # so the agent holds the start of the next line
    client.send(b"x" * (p.MAX_LINE_BYTES - 100) + b'"}\n')  # its end, in one read
    response = client.read()
    assert response is not None and response["error"]["code"] == "line_too_long", response
    assert client.read() is None
    client.close()


def test_a_client_leaving_mid_line_does_not_hurt(agent: AgentProcess) -> None:
    for _ in range(20):
        client = LineClient(agent.socket)
        client.send(b'{"id": 1, "op": "hel')
        client.close()
    assert ask_once(agent.socket, {"id": 1, "op": "hello"})["ok"] is True


def test_a_request_cut_short_by_a_half_close_gets_an_error(agent: AgentProcess) -> None:
    """Found by red-teaming: `printf '{"id":1,"op":"hello"}' | nc -U` got no answer at all,
    the agent dropping the line without a word. A line the client ends by shutting its side
    for writing is not served (it may be cut short), and the client is told why."""
    for sent, expected_id in ((b'{"id": 7, "op": "lock", "passphrase": "p"}', 7),
                              (b'{"id": 8, "op": "lock", "passph', None)):
        client = LineClient(agent.socket)
        try:
            client.send(b'{"id": 6, "op": "hello"}\n' + sent)
            client.sock.shutdown(socket.SHUT_WR)
            assert client.read()["id"] == 6  # the whole line before it is served as ever
            answer = client.read()
            assert answer is not None, "no answer to a request line cut short by a half-close"
            assert (answer["id"], answer["error"]["code"]) == (expected_id, "bad_request")
            assert "newline" in answer["error"]["message"]
            assert client.read() is None
        finally:
            client.close()
    assert ask_once(agent.socket, {"id": 9, "op": "status"})["result"]["locked"] is False


def test_idle_connections_are_closed(agent_env: AgentEnv) -> None:
    process = start_agent(agent_env, "--idle-timeout", "0.3")
    try:
        client = LineClient(process.socket, timeout=10.0)
        assert client.ask({"id": 1, "op": "hello"})["ok"] is True
        assert client.read() is None  # the agent hung up on the idle connection
        client.close()
    finally:
        process.stop()


def test_a_full_socket_closes_its_longest_idle_connection(agent_env: AgentEnv) -> None:
    """Not `busy` for the newcomer: `busy` is only for a pool whose every connection has a
    request in flight (tests/agent/test_server.py)."""
    process = start_agent(agent_env, "--max-connections", "2")
    try:
        held = [LineClient(process.socket) for _ in range(2)]
        for client in held:
            assert client.ask({"id": 1, "op": "hello"})["ok"] is True
        extra = LineClient(process.socket)
        assert extra.ask({"id": 2, "op": "hello"})["ok"] is True
        assert held[0].read() is None  # the longest idle made room
        assert held[1].ask({"id": 3, "op": "hello"})["ok"] is True
        for client in (*held, extra):
            client.close()
    finally:
        process.stop()


def test_blank_lines_do_not_keep_a_connection_open(agent_env: AgentEnv) -> None:
    """Found by the issue: each blank line restarted the idle timer, so a connection
    sending nothing else held its place (and a descriptor) forever."""
    process = start_agent(agent_env, "--idle-timeout", "0.5")
    try:
        client = LineClient(process.socket)
        assert client.ask({"id": 1, "op": "hello"})["ok"] is True
        deadline = time.monotonic() + 10.0
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                client.send(b"\n" * 16)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            # Wait (at most 50 ms at a time) for the agent to hang up, sending all along.
            readable, _, _ = select.select([client.sock], [], [], 0.05)
            closed = bool(readable) and client.read() is None
        client.close()
        assert closed, "a connection sending only blank lines outlived the idle timeout"
        assert ask_once(process.socket, {"id": 2, "op": "hello"})["ok"] is True
    finally:
        process.stop()


def _hold_idle_connections(path: str, count: int, *, all_served: bool = True) -> list[LineClient]:
    """``count`` connections, each having asked one `hello` (so each was accepted), left idle.

    With ``all_served`` False, connections answered `busy` are kept too (closed by the agent).
    """
    held = []
    for n in range(count):
        client = LineClient(path)
        held.append(client)
        client.send(json.dumps({"id": n, "op": "hello"}).encode() + b"\n")
        answer = client.read()
        if all_served or answer is None or answer["id"] is not None:
            assert answer is not None and answer["ok"] is True, (n, answer)
    return held


def test_idle_connections_on_the_forwarding_socket_leave_the_main_one_alone(
    agent_env: AgentEnv,
) -> None:
    """Found by the issue: 256 idle connections on forward.sock (a remote host can open
    them through ssh -R) made `compozy auth token` on the main socket fail with `busy`."""
    forward = str(agent_env.root / "fwd" / "forward.sock")
    process = start_agent(agent_env, "--forward-socket", forward)
    held: list[LineClient] = []
    try:
        stored = ask_once(process.socket, {"id": 1, "op": "store_api_key", "profile": "dev",
                                           "api_key": "key-dev"})
        assert stored["ok"] is True, stored
        held = _hold_idle_connections(forward, 300, all_served=False)
        token = run_cli(agent_env, "auth", "token", "--profile", "dev")
        assert (token.returncode, token.stdout) == (0, "key-dev\n"), token.stderr
        status = run_cli(agent_env, "auth", "status", "--json")
        assert json.loads(status.stdout)["agent"]["pid"] == process.pid, status.stderr
        assert held[-1].ask({"id": 2, "op": "hello"})["ok"] is True  # served, not `busy`
    finally:
        for client in held:
            client.close()
        process.stop()


def test_idle_connections_on_the_main_socket_do_not_lock_out_the_cli(
    agent_env: AgentEnv,
) -> None:
    """Found by the issue: 300 idle connections on the main socket locked out the CLI."""
    process = start_agent(agent_env)
    held: list[LineClient] = []
    try:
        held = _hold_idle_connections(process.socket, 300)
        status = run_cli(agent_env, "auth", "status", "--json")
        assert json.loads(status.stdout)["agent"]["pid"] == process.pid, status.stderr
        stored = ask_once(process.socket, {"id": 1, "op": "store_api_key", "api_key": "k-1"})
        assert stored["ok"] is True, stored
        token = run_cli(agent_env, "auth", "token")
        assert (token.returncode, token.stdout) == (0, "k-1\n"), token.stderr
        assert held[0].read() is None  # the longest idle were closed to make room
        assert held[-1].ask({"id": 2, "op": "hello"})["ok"] is True
        assert "Traceback" not in process.log()
    finally:
        for client in held:
            client.close()
        process.stop()


def test_blank_lines_on_the_forwarding_socket_do_not_starve_the_main_one(
    agent_env: AgentEnv,
) -> None:
    """Found by red-teaming: a blank line was skipped without yielding, so a connection
    sending only newlines held the agent's event loop for 64 Ki lines at a time; 16 such
    connections on forward.sock (a remote host can open them through ssh -R) made every
    request on the main socket wait about 3 s, and the 256 a pool allows, about a minute."""
    forward = str(agent_env.root / "fwd" / "forward.sock")
    process = start_agent(agent_env, "--forward-socket", forward)
    stop = threading.Event()
    flooders = [LineClient(forward, timeout=60.0) for _ in range(24)]
    flooding = [threading.Event() for _ in flooders]

    def flood(client: LineClient, began: threading.Event) -> None:
        newlines = b"\n" * 65536
        deadline = time.monotonic() + 60.0  # bounds the flood should the test fail early
        with contextlib.suppress(OSError):
            while not stop.is_set() and time.monotonic() < deadline:
                client.send(newlines)
                began.set()  # a read's worth of newlines waits for the agent

    threads = [threading.Thread(target=flood, args=pair)
               for pair in zip(flooders, flooding, strict=True)]
    try:
        for client in flooders:
            assert client.ask({"id": 0, "op": "hello"})["ok"] is True
        for thread in threads:
            thread.start()
        for began in flooding:
            assert began.wait(30.0), "a flood did not get going"
        latencies = []
        for n in range(5):
            started = time.monotonic()
            assert ask_once(process.socket, {"id": n, "op": "hello"})["ok"] is True
            latencies.append(time.monotonic() - started)
        assert max(latencies) < 1.0, f"main-socket round trips took {latencies} s"
    finally:
        stop.set()
        for client in flooders:
            client.close()
        for thread in threads:
            thread.join(10.0)
        process.stop()


_ASK_FROM_MANY_PROCESSES = """
import json, os, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
escaped = "\\x01" * 120  # six bytes each in JSON; names are at most 128 characters
scope = "\\x01" * 250  # a scope at most 256
request = json.dumps({"id": 1, "op": "token", "profile": escaped,
                      "scope": [scope] * 20}).encode() + b"\\n"
failed = 0
for _ in range(count):
    child = os.fork()
    if child == 0:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.sendall(request)
        answer = b""
        while not answer.endswith(b"\\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        os._exit(0 if b'"not_logged_in"' in answer else 1)
    failed += os.waitpid(child, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def test_a_forwarded_host_cannot_make_the_audit_log_unreadable(agent_env: AgentEnv) -> None:
    """Found by red-teaming: each audit entry holds the profile and scopes a caller asked
    for, and a host on forward.sock may ask for what it likes. After 1,000 such requests
    `compozy auth log --limit 1000` failed ("the agent sent a line longer than the
    protocol allows"): the agent answered with a line its clients refuse. It now answers
    with the newest entries that fit. (The requests come from 1,000 processes: the audit
    log counts one process's repeated failures into one entry.)"""
    forward = str(agent_env.root / "fwd" / "forward.sock")
    process = start_agent(agent_env, "--forward-socket", forward)
    asked = subprocess.run([sys.executable, "-c", _ASK_FROM_MANY_PROCESSES, forward, "1000"],
                           capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    client = LineClient(forward)
    try:
        answer = client.ask({"id": "last", "op": "token", "profile": "the-last"})
        assert answer["error"]["code"] == "not_logged_in", answer
    finally:
        client.close()
    try:
        shown = run_cli(agent_env, "auth", "log", "--limit", "1000", "--json")
        assert shown.returncode == 0, shown.stderr
        entries = json.loads(shown.stdout)["entries"]
        assert 100 < len(entries) < 1000 and entries[-1]["profile"] == "the-last"
        assert ask_once(process.socket, {"id": 1, "op": "hello"})["ok"] is True
    finally:
        process.stop()


def test_a_deeply_nested_line_is_a_bad_request_on_both_sockets(agent_env: AgentEnv) -> None:
    """Found by the issue: this 2 KB line raised RecursionError and ended the agent."""
    forward = str(agent_env.root / "fwd" / "forward.sock")
    process = start_agent(agent_env, "--forward-socket", forward)
    try:
        for path in (process.socket, forward):
            client = LineClient(path)
            client.send(b'{"id":1,"op":"hello","x":' + b"[" * 1000 + b"]" * 1000 + b"}\n")
            answer = client.read()
            assert answer is not None, "the agent hung up (or died)"
            assert (answer["id"], answer["error"]["code"]) == (1, "bad_request")
            assert client.ask({"id": 2, "op": "hello"})["ok"] is True
            client.close()
        assert process.proc.poll() is None
    finally:
        process.stop()


def test_running_out_of_descriptors_does_not_end_the_agent(agent_env: AgentEnv) -> None:
    """accept() failing with EMFILE ended the agent (anyio's listener.serve re-raises it)."""
    process = start_agent(agent_env)
    held: list[LineClient] = []
    pending: list[LineClient] = []
    try:
        spare = 6
        in_use = len(os.listdir(f"/proc/{process.pid}/fd"))
        limit = in_use + spare * DESCRIPTORS_PER_CONNECTION  # room for `spare` connections
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (limit, limit))
        held = _hold_idle_connections(process.socket, spare)
        # The kernel queues these; the agent has no descriptor left to accept them with.
        pending = [LineClient(process.socket) for _ in range(5)]
        for n, client in enumerate(pending):
            client.send(json.dumps({"id": n, "op": "hello"}).encode() + b"\n")
        assert process.wait_for_log("cannot accept connections"), process.log()
        assert process.proc.poll() is None
        for client in held:
            client.close()
        for n, client in enumerate(pending):  # accepted once descriptors are free again
            answer = client.read()
            assert answer is not None and answer["id"] == n and answer["ok"] is True
        assert process.wait_for_log("accepting connections")
        assert process.log().count("cannot accept connections") == 1  # once per burst
    finally:
        for client in (*held, *pending):
            client.close()
        process.stop()


def test_the_open_file_limit_is_raised_to_the_hard_limit(agent_env: AgentEnv) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    process = start_agent(agent_env, preexec_fn=low_soft_limit)
    try:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        [row] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        soft_now, hard_now = row.split()[3:5]
        assert soft_now == hard_now == str(hard), row
    finally:
        process.stop()


def test_second_agent_on_the_same_socket_exits_with_a_message(agent: AgentProcess) -> None:
    second = start_agent(agent.agent_env, wait=False)
    assert second.proc.wait(15) == 1
    second.stop()
    assert "already running" in second.log()
    assert ask_once(agent.socket, {"id": 1, "op": "hello"})["result"]["pid"] == agent.pid


def test_stale_socket_from_a_crashed_agent_is_replaced(agent_env: AgentEnv) -> None:
    first = start_agent(agent_env)
    first.stop(signal.SIGKILL)
    assert os.path.exists(agent_env.socket) and not can_connect(agent_env.socket)
    second = start_agent(agent_env)
    try:
        assert ask_once(second.socket, {"id": 1, "op": "hello"})["result"]["pid"] == second.pid
        assert "stale socket" in second.log()
    finally:
        second.stop()


def test_sigterm_and_sigint_shut_down_cleanly_and_remove_the_socket(agent_env: AgentEnv) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        process = start_agent(agent_env)
        assert process.stop(sig) == 0
        assert not os.path.exists(agent_env.socket)
        assert "shutting down" in process.log()


def test_refuses_a_socket_directory_others_can_write(agent_env: AgentEnv) -> None:
    run = agent_env.root / "run"
    (run / "compozy").mkdir(parents=True, mode=0o700)
    (run / "compozy").chmod(0o777)
    process = start_agent(agent_env, wait=False)
    assert process.proc.wait(15) == 1
    process.stop()
    assert "writable by group or others" in process.log()


def test_peer_of_another_uid_is_refused(agent: AgentProcess) -> None:
    answer = answer_to_another_user(agent.socket, agent.agent_env.root)
    assert answer == "b''"  # closed with nothing sent
    assert "refused a connection from uid 65534" in agent.log()
    assert ask_once(agent.socket, {"id": 1, "op": "hello"})["ok"] is True


def test_peer_of_another_uid_is_refused_by_an_autostarted_agent(agent_env: AgentEnv) -> None:
    started = run_cli(agent_env, "auth", "status")  # starts one on demand
    assert "Agent: running" in started.stdout, started.stderr
    assert answer_to_another_user(agent_env.socket, agent_env.root) == "b''"
    assert ask_once(agent_env.socket, {"id": 1, "op": "hello"})["ok"] is True
    log = next(agent_env.root.rglob("agent.log")).read_text()
    assert "refused a connection from uid 65534" in log


# --------------------------------------------------------------------------
# Through the real CLI.


def test_cli_status_against_a_running_agent(agent: AgentProcess) -> None:
    result = run_cli(agent.agent_env, "auth", "status", "--json")
    assert result.returncode == 1  # not logged in is a handled failure
    document = json.loads(result.stdout)
    assert document["agent"]["pid"] == agent.pid
    assert document["authenticated"] is False
    assert document["credential_source"]["type"] == "none"
    text = run_cli(agent.agent_env, "auth", "status")
    assert "not logged in; run `compozy login`" in text.stdout


def test_cli_starts_the_agent_on_demand(agent_env: AgentEnv) -> None:
    from support.agent import prepare_dirs

    prepare_dirs(agent_env)
    assert not os.path.exists(agent_env.socket)
    result = run_cli(agent_env, "auth", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"sessions": []}
    assert len(agent_pids(agent_env)) == 1
    log_file = agent_env.state_dir / "agent.log"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_a_cold_auth_token_starts_the_agent_without_loading_the_full_cli(
    agent_env: AgentEnv,
) -> None:
    """Cold start (issue 15, item 5): the token fast path starts the agent itself, rather
    than first loading the full CLI (argparse, msgspec, every command) to do it."""
    from support.agent import prepare_dirs

    prepare_dirs(agent_env)
    launcher = Path(__file__).resolve().parents[2] / "client" / "bin" / "compozy"
    # A descriptor the caller leaves open to its children must not reach the agent.
    kept_read, kept_write = os.pipe()
    try:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", str(launcher), "auth", "token"],
            env=agent_env.env(), capture_output=True, text=True, timeout=60,
            pass_fds=(kept_write,))
        pipe = os.readlink(f"/proc/self/fd/{kept_write}")
    finally:
        os.close(kept_read)
        os.close(kept_write)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    # No session yet: the agent's own answer, given through the fast path.
    assert result.returncode == 1 and "compozy login" in result.stderr, result.stderr[-2000:]
    assert "compozy_client.autostart" in imported
    # Not even subprocess: the fast path forks and execs the agent by hand.
    assert {"compozy_client.cli", "compozy_client.connection", "msgspec",
            "subprocess"} & imported == set()
    (pid,) = agent_pids(agent_env)
    # ... as isolated as subprocess.Popen started it: working directory /, its own
    # session, /dev/null for stdio, nothing else of its caller's.
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.getsid(pid) == pid
    descriptors = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{pid}/fd")}
    assert [descriptors[fd] for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert pipe not in descriptors.values()


def test_concurrent_clis_start_exactly_one_agent(agent_env: AgentEnv) -> None:
    from support.agent import prepare_dirs

    prepare_dirs(agent_env)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: run_cli(agent_env, "auth", "status", "--json"), range(8)))
    pids = {json.loads(r.stdout)["agent"]["pid"] for r in results}
    assert len(pids) == 1, [r.stderr for r in results]
    # Every agent that lost the race has exited; the winner is the only one left.
    losers_gone = settled_agent_pids(agent_env)
    assert losers_gone == list(pids)


def test_autostart_can_be_disabled(agent_env: AgentEnv) -> None:
    from support.agent import prepare_dirs

    prepare_dirs(agent_env)
    result = run_cli(agent_env, "auth", "list", COMPOZY_AGENT_AUTOSTART="0")
    assert result.returncode == 1
    assert "no agent answers" in result.stderr
    assert agent_pids(agent_env) == []


def test_api_key_in_env_needs_no_agent(agent_env: AgentEnv) -> None:
    result = run_cli(agent_env, "auth", "token", FLYZT_API_KEY="ci-key-123", CI="true")
    assert result.returncode == 0 and result.stdout == "ci-key-123\n"
    status = run_cli(agent_env, "auth", "status", "--json", FLYZT_API_KEY="ci-key-123", CI="true")
    assert status.returncode == 0
    document = json.loads(status.stdout)
    assert document["credential_source"] == {"type": "env", "origin": "FLYZT_API_KEY"}
    assert "ci-key-123" not in status.stdout + status.stderr
    assert not os.path.exists(agent_env.socket)
    assert agent_pids(agent_env) == []


def test_api_key_in_config_file(agent_env: AgentEnv) -> None:
    agent_env.config.parent.mkdir(parents=True)
    agent_env.config.write_text("auth:\n  api_key: cfg-key-456\n")
    agent_env.config.chmod(0o644)
    result = run_cli(agent_env, "auth", "token")
    assert result.returncode == 0 and result.stdout == "cfg-key-456\n"
    status = run_cli(agent_env, "auth", "status", COMPOZY_AGENT_AUTOSTART="0")
    assert status.returncode == 0
    assert "readable by other users" in status.stderr and "chmod 600" in status.stderr
    assert "cfg-key-456" not in status.stdout + status.stderr


def test_broken_config_is_a_clear_handled_error(agent_env: AgentEnv) -> None:
    agent_env.config.parent.mkdir(parents=True)
    agent_env.config.write_text("auth: [api_key: oops\n")
    result = run_cli(agent_env, "auth", "token")
    assert result.returncode == 1
    assert str(agent_env.config) in result.stderr and "not valid YAML" in result.stderr


@pytest.mark.parametrize(
    "command",
    [[], ["login"], ["logout"], ["auth"], ["auth", "status"], ["auth", "list"],
     ["auth", "refresh"], ["auth", "revoke"], ["auth", "revoke-all"], ["auth", "token"],
     ["auth", "lock"], ["auth", "unlock"], ["auth", "log"], ["auth", "setup-git"]],
)
def test_every_command_has_help_with_examples(agent_env: AgentEnv, command: list[str]) -> None:
    result = run_cli(agent_env, *command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "usage: compozy" in result.stdout


@pytest.mark.parametrize(
    "command",
    [["nonsense"], ["auth", "revoke"], ["auth", "token", "--min-valid", "soon"],
     ["login", "--device", "--no-browser"], ["auth", "refresh", "abc", "--profile", "x"]],
)
def test_usage_errors_exit_2(agent: AgentProcess, command: list[str]) -> None:
    result = run_cli(agent.agent_env, *command)
    assert result.returncode == 2, result
    assert result.stdout == ""


def test_revoke_all_without_terminal_needs_yes(agent: AgentProcess) -> None:
    result = run_cli(agent.agent_env, "auth", "revoke-all")
    assert result.returncode == 2 and "--yes" in result.stderr


def test_agent_help_and_shell_lines(agent_env: AgentEnv) -> None:
    from support.agent import prepare_dirs

    prepare_dirs(agent_env)
    help_text = subprocess.run([sys.executable, "-m", "compozy_agent", "--help"],
                               capture_output=True, text=True, env=agent_env.env())
    assert help_text.returncode == 0 and "examples:" in help_text.stdout
    sh = subprocess.run([sys.executable, "-m", "compozy_agent", "--sh"], capture_output=True,
                        text=True, env=agent_env.env(), timeout=30)
    assert sh.returncode == 0, sh.stderr
    expected = f"COMPOZY_AGENT_SOCK={agent_env.socket}; export COMPOZY_AGENT_SOCK;"
    assert sh.stdout.startswith(expected)
    assert len(agent_pids(agent_env)) == 1


def test_daemon_mode_detaches(agent_env: AgentEnv) -> None:
    from support.agent import prepare_dirs

    prepare_dirs(agent_env)
    result = subprocess.run([sys.executable, "-m", "compozy_agent", "--daemon"],
                            capture_output=True, text=True, env=agent_env.env(), timeout=30)
    assert result.returncode == 0, result.stderr
    assert can_connect(agent_env.socket)
    pids = agent_pids(agent_env)
    assert len(pids) == 1
    assert ask_once(agent_env.socket, {"id": 1, "op": "hello"})["result"]["pid"] == pids[0]


def test_a_listing_longer_than_a_request_line_reaches_the_cli(agent: AgentProcess) -> None:
    client = LineClient(agent.socket)
    client.send(b"".join(json.dumps({"id": n, "op": "store_api_key", "profile": f"p{n:03d}",
                                     "api_key": f"key-{n}"}).encode() + b"\n"
                         for n in range(500)))
    assert all(client.read()["ok"] for _ in range(500))
    client.close()
    listing = run_cli(agent.agent_env, "auth", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert len(listing.stdout) > 64 * 1024
    assert len(json.loads(listing.stdout)["sessions"]) == 500


DEEP_ANSWER = b'{"id":1,"ok":true,"result":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


def _serve_answers(path: str, stop: threading.Event, answer: bytes) -> threading.Thread:
    """A fake agent that answers every line with ``answer``."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.settimeout(0.05)

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue  # look at the stop flag again
                with conn:
                    conn.settimeout(10)
                    with contextlib.suppress(OSError):
                        if conn.recv(65536):
                            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_an_answer_nested_too_deep_cannot_crash_a_client(
    agent_env: AgentEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client decoded answers with msgspec and json unguarded: a deep one raised
    RecursionError out of the CLI, the token fast path and get_token()."""
    prepare_dirs(agent_env)
    stop = threading.Event()
    server = _serve_answers(agent_env.socket, stop, DEEP_ANSWER)
    try:
        for command in (["auth", "status"], ["auth", "token"], ["auth", "list"]):
            result = run_cli(agent_env, *command, COMPOZY_AGENT_AUTOSTART="0")
            output = result.stdout + result.stderr
            assert result.returncode == 1, (command, output)
            assert "Traceback" not in output and "RecursionError" not in output
            assert "nested too deep" in output, output
        for key, value in agent_env.env(COMPOZY_AGENT_AUTOSTART="0").items():
            monkeypatch.setenv(key, value)
        with pytest.raises(AgentUnavailable, match="nested too deep"):
            get_token()
        with pytest.raises(AgentUnavailable, match="nested too deep"):
            asyncio.run(async_get_token())
    finally:
        stop.set()
        server.join(10)


def test_an_answer_longer_than_the_protocol_allows_is_refused_by_async_get_token(
    agent_env: AgentEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio's readline raised ValueError past its 64 KiB default limit."""
    prepare_dirs(agent_env)
    stop = threading.Event()
    server = _serve_answers(agent_env.socket, stop, b"[" * (p.MAX_RESPONSE_BYTES + 1) + b"\n")
    try:
        for key, value in agent_env.env(COMPOZY_AGENT_AUTOSTART="0").items():
            monkeypatch.setenv(key, value)
        with pytest.raises(AgentUnavailable, match="longer than the protocol allows"):
            asyncio.run(async_get_token())
    finally:
        stop.set()
        server.join(10)


def test_garbage_collection_is_on_once_the_agent_serves(agent: AgentProcess) -> None:
    """Off while the agent starts (a cold start's CPU), never left off (issue 15)."""
    log = agent.log()
    collection = log.index("garbage collection on; ")
    assert collection < log.index("serving ")
    frozen = int(log[collection:].split("; ", 1)[1].split()[0])
    assert frozen > 10_000  # the modules and objects of the start, not collected
