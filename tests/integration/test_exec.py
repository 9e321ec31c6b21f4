"""`compozy exec`: the real CLI, a real agent, real child processes.

A child gets a pointer (``COMPOZY_AGENT_SOCK``, a socket of its own), not a
secret. Against the real OpenID provider with 4-second access tokens, a child
that outlives several of them gets valid ones throughout, through
``compozy auth token`` and ``get_token()`` inside it, and ``--token-file``
stays valid; its socket is gone when it ends. Nobody else can use that socket
for another profile, and another uid cannot connect at all. Exit codes and
signals pass through. The exec socket's server side is proven in-process in
tests/agent/test_exec_socket.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.login import CLI, login_device, reaped, run_python_as_another_user
from support.other_user import answer_to_another_user
from support.provider import OidcTestProvider, ProviderFactory
from support.wire import ask

#: A short access-token lifetime: a child outlives several in a few seconds.
TOKEN_TTL = 4
API_KEY = "exec-test-key-1"

#: A child that says where its socket is, then on each "token" line asks for a token both
#: ways a tool would (the CLI, the library) and prints them; "exit N" ends it with N.
TALKING_CHILD = r"""
import os, subprocess, sys
from compozy_client import get_token
print("sock", os.environ["COMPOZY_AGENT_SOCK"], flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "token":
        cli = subprocess.run([sys.executable, "-c", "from compozy_client.cli import main; main()",
                              "auth", "token"], capture_output=True, text=True)
        if cli.returncode != 0:
            print("error", cli.stderr.replace("\n", " "), flush=True)
            continue
        print("tokens", cli.stdout.strip(), get_token(), flush=True)
    elif words[0] == "exit":
        sys.exit(int(words[1]))
"""

#: A child that reports the signals it gets (and exits 40 + the signal's number).
SIGNALLED_CHILD = r"""
import signal, sys
def report(signum, frame):
    print("got", signum, flush=True)
    sys.exit(40 + signum)
signal.signal(signal.SIGTERM, report)
signal.signal(signal.SIGINT, report)
signal.signal(signal.SIGHUP, report)
print("ready", flush=True)
for line in sys.stdin:
    pass
"""


#: A child that counts the SIGINTs it gets, and says how many at SIGTERM (then ends).
COUNTING_CHILD = r"""
import os, signal, sys
count = 0
def interrupted(signum, frame):
    global count
    count += 1
    print("sigint", count, flush=True)
def terminated(signum, frame):
    print("sigints", count, flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, interrupted)
signal.signal(signal.SIGTERM, terminated)
print("ready", os.getppid(), "(its parent)", flush=True)
while True:
    signal.pause()
"""


def configure_opaque(agent_env: AgentEnv, provider: OidcTestProvider) -> None:
    """The default profile at the test provider with no API resource: opaque tokens, which
    the provider can introspect."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    agent_env.config.write_text(
        "storage: auto\nprofiles:\n  default:\n"
        f"    issuer: {provider.issuer}\n"
        "    scopes: [openid, profile, email, offline_access]\n")


def active(provider: OidcTestProvider, token: str) -> bool:
    """Whether the provider itself holds ``token`` active (RFC 7662)."""
    answer = httpx.post(f"{provider.direct}/token/introspection",
                        data={"client_id": provider.client_id, "token": token}, timeout=10)
    answer.raise_for_status()
    return bool(answer.json()["active"])


def start_exec(agent_env: AgentEnv, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "exec", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=agent_env.env())


def line_of(proc: subprocess.Popen[str]) -> list[str]:
    """The next line the child printed, split in words (a blocking read of its pipe,
    bounded by the test's timeout)."""
    stream: IO[str] | None = proc.stdout
    assert stream is not None
    line = stream.readline()
    assert line, f"the command ended: {proc.wait(30)}; stderr: {proc.communicate()[1]}"
    return line.split()


def say(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


@pytest.fixture
def keyed(agent_env: AgentEnv) -> Iterator[AgentProcess]:
    """An agent holding an API key for the default profile (no provider needed)."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    agent_env.config.write_text("storage: memory\n")
    agent = start_agent(agent_env)
    try:
        stored = run_cli(agent_env, "login", "--with-api-key", input=API_KEY + "\n")
        assert stored.returncode == 0, stored.stderr
        yield agent
    finally:
        agent.stop()


def test_a_child_outliving_its_access_tokens_gets_valid_ones_through_its_socket(
    agent_env: AgentEnv, oidc_provider_factory: ProviderFactory
) -> None:
    provider = oidc_provider_factory(access_token_ttl=TOKEN_TTL)
    configure_opaque(agent_env, provider)
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0, agent.log()
        token_file = agent_env.root / "token"
        proc = start_exec(agent_env, "--token-file", str(token_file), "--",
                          sys.executable, "-c", TALKING_CHILD)
        with reaped(proc):
            word, path = line_of(proc)
            assert word == "sock" and path != agent_env.socket
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            started = time.time()
            refreshes = provider.count_token_calls("refresh_token", status=200)
            seen: list[str] = []
            for round_number in range(1, 5):
                say(proc, "token")
                words = line_of(proc)
                assert words[0] == "tokens", " ".join(words)  # an error: no token in it
                from_cli, from_library = words[1], words[2]
                in_file = token_file.read_text().strip()
                assert active(provider, from_cli) and active(provider, from_library)
                assert active(provider, in_file), f"round {round_number}: a stale token file"
                seen.append(from_cli)
                # The agent refreshes ahead of expiry by itself: the next round is after it.
                assert provider.wait_for("token", refreshes + round_number, timeout=30,
                                         grant_type="refresh_token", status=200)
            # The child outlived the first token it got, which has expired since,
            # and every token it asked for meanwhile was valid when it got it.
            assert time.time() - started > TOKEN_TTL
            assert not active(provider, seen[0])
            assert len(set(seen)) >= 3
            say(proc, "exit 3")
            assert proc.wait(30) == 3
        assert not os.path.lexists(path), "the child's socket outlived it"
        assert not token_file.exists(), "the token file outlived the command"
        assert not list(agent_env.root.glob(".token.*")), "a temporary token file was left"
    finally:
        agent.stop()


def test_a_process_outside_the_child_cannot_use_its_socket_for_another_profile(
    keyed: AgentProcess,
) -> None:
    env = keyed.agent_env
    proc = start_exec(env, "--", sys.executable, "-c", TALKING_CHILD)
    with reaped(proc):
        _, path = line_of(proc)
        # This test is a process outside the child, of the same uid, that found the path.
        for request in ({"id": 1, "op": "token", "profile": "prod"},
                        {"id": 2, "op": "status", "profile": "prod"},
                        {"id": 3, "op": "list"},
                        {"id": 4, "op": "logout", "all": True},
                        {"id": 5, "op": "exec_socket", "profile": "prod"}):
            answer = ask(path, request)
            assert answer["ok"] is False and answer["error"]["code"] == "forbidden", request
        # What the socket is for, it serves (docs/security.md says so plainly).
        assert ask(path, {"id": 6, "op": "token", "profile": "default"})["ok"] is True
        say(proc, "exit 0")
        assert proc.wait(30) == 0
    assert not os.path.lexists(path)
    # The session itself was not touched by the refused logout.
    assert run_cli(env, "auth", "token").stdout.strip() == API_KEY


def test_another_uid_cannot_connect_to_a_childs_socket(keyed: AgentProcess) -> None:
    env = keyed.agent_env
    proc = start_exec(env, "--", sys.executable, "-c", TALKING_CHILD)
    with reaped(proc):
        _, path = line_of(proc)
        # Even with every directory and the socket opened up, the kernel's peer uid says no.
        assert answer_to_another_user(path, loosen_up_to=env.root) == "b''"
        say(proc, "exit 0")
        assert proc.wait(30) == 0
    assert "refused a connection from uid 65534" in keyed.log()


def test_the_child_gets_a_pointer_and_no_secret_unless_env_asks(keyed: AgentProcess) -> None:
    env = keyed.agent_env
    show = "import os, sys; sys.stdout.write(repr(sorted(os.environ.items())))"
    plain = run_cli(env, "exec", "--", sys.executable, "-c", show)
    assert plain.returncode == 0, plain.stderr
    assert API_KEY not in plain.stdout
    assert "('COMPOZY_AGENT_AUTOSTART', '0')" in plain.stdout
    assert "('COMPOZY_PROFILE', 'default')" in plain.stdout
    with_env = run_cli(env, "exec", "--env", "API_TOKEN", "--", sys.executable, "-c", show)
    assert f"('API_TOKEN', '{API_KEY}')" in with_env.stdout
    refused = run_cli(env, "exec", "--env", "COMPOZY_AGENT_SOCK", "--", "true")
    assert refused.returncode == 2 and "choose another name" in refused.stderr
    # Neither compozy exec's own command line nor its environment holds the token.
    proc = start_exec(env, "--env", "API_TOKEN", "--", sys.executable, "-c", SIGNALLED_CHILD)
    with reaped(proc):
        assert line_of(proc) == ["ready"]
        own = Path(f"/proc/{proc.pid}")
        assert API_KEY.encode() not in (own / "cmdline").read_bytes()
        assert API_KEY.encode() not in (own / "environ").read_bytes()
        proc.terminate()
        assert proc.wait(30) == 40 + signal.SIGTERM


@pytest.mark.parametrize(
    ("command", "code"),
    [(["sh", "-c", "exit 7"], 7),
     (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
     (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
     (["no-such-command-anywhere"], 127),
     (["/etc/hostname"], 126)],
    ids=["exit-7", "killed", "terminated", "not-found", "not-executable"],
)
def test_the_commands_exit_status_is_compozy_execs(keyed: AgentProcess, command: list[str],
                                                   code: int) -> None:
    result = run_cli(keyed.agent_env, "exec", "--", *command)
    assert result.returncode == code, result.stderr


def test_the_exit_status_passes_through_when_started_with_sigchld_ignored(
        keyed: AgentProcess) -> None:
    """Ignored SIGCHLD is inherited, and makes the kernel reap children unseen."""
    result = subprocess.run(
        [*CLI, "exec", "--", "sh", "-c", "exit 4"], capture_output=True, text=True,
        timeout=60, env=keyed.agent_env.env(),
        preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert result.returncode == 4, result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_sent_to_compozy_exec_reaches_the_command_once(keyed: AgentProcess,
                                                                signum: int) -> None:
    proc = start_exec(keyed.agent_env, "--", sys.executable, "-c", SIGNALLED_CHILD)
    with reaped(proc):
        assert line_of(proc) == ["ready"]
        proc.send_signal(signum)
        # Its stdin stays open until it has answered: at EOF it would end by itself.
        assert line_of(proc) == ["got", str(int(signum))]
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 40 + signum, stderr
        assert stdout == "", "the command got the signal more than once"


def test_ctrl_c_in_a_terminal_reaches_the_command_once(keyed: AgentProcess,
                                                      tmp_path: Path) -> None:
    """The terminal sends SIGINT to the whole foreground process group, the command
    included: compozy exec must not pass it on a second time."""
    from support.terminal import Terminal

    argv = [*CLI, "exec", "--", sys.executable, "-c", COUNTING_CHILD]
    with Terminal(tmp_path, argv, keyed.agent_env.env()) as terminal:
        assert terminal.wait_for("(its parent)"), terminal.output
        compozy_exec = int(terminal.output.split("ready ", 1)[1].split()[0])
        terminal.send_keys("C-c")
        assert terminal.wait_for("sigint 1"), terminal.output
        # Pending signals are taken lowest number first, and compozy exec passes them on
        # in order: a second SIGINT would reach the command before this SIGTERM.
        os.kill(compozy_exec, signal.SIGTERM)
        assert terminal.exit_status() == 0, terminal.output
        assert "sigints 1" in terminal.output, terminal.output


def test_the_socket_is_gone_when_compozy_exec_is_killed(keyed: AgentProcess) -> None:
    proc = start_exec(keyed.agent_env, "--", sys.executable, "-c", TALKING_CHILD)
    with reaped(proc):
        _, path = line_of(proc)
        proc.kill()  # no chance to clean up: the agent sees its connection close
        proc.wait(30)
        assert keyed.wait_for_log("exec socket for profile default closed")
        assert not os.path.lexists(path)
        # The orphaned child cannot start an agent in the socket's place.
        say(proc, "token")
        words = line_of(proc)
        assert words[0] == "error" and "no agent answers" in " ".join(words)
        assert not os.path.lexists(path)


def test_an_existing_token_file_is_refused_and_kept(keyed: AgentProcess) -> None:
    mine = keyed.agent_env.root / "mine"
    mine.write_text("my notes\n")
    result = run_cli(keyed.agent_env, "exec", "--token-file", str(mine), "--", "true")
    assert result.returncode == 2 and "already exists" in result.stderr
    assert mine.read_text() == "my notes\n"


def test_a_child_of_another_uid_cannot_read_the_token_file(keyed: AgentProcess) -> None:
    env = keyed.agent_env
    token_file = env.root / "token"
    env.root.chmod(0o755)
    proc = start_exec(env, "--token-file", str(token_file), "--", sys.executable, "-c",
                      SIGNALLED_CHILD)
    with reaped(proc):
        assert line_of(proc) == ["ready"]
        assert token_file.read_text().strip() == API_KEY
        read = ("import sys\ntry:\n    open(sys.argv[1]).read(); print('read')\n"
                "except PermissionError:\n    print('refused')\n")
        assert run_python_as_another_user(read, str(token_file)).strip() == "refused"
        proc.terminate()
        proc.wait(30)
    assert not token_file.exists()

