"""Real agent processes for tests: start `compozy-agent` on a temporary socket.

Every agent gets its own HOME, state dir, runtime dir and socket, so nothing
a test does reaches the person's real sessions or keyring.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import canary

START_TIMEOUT = 15.0


def can_connect(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@dataclass
class AgentEnv:
    """The environment of one isolated agent and its clients."""

    root: Path
    extra: dict[str, str] = field(default_factory=dict)
    #: Agents started in the foreground, and what CLIs printed (for the canary check).
    agents: list[AgentProcess] = field(default_factory=list, repr=False)
    outputs: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def socket(self) -> str:
        return str(self.root / "run" / "compozy" / "agent.sock")

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def config(self) -> Path:
        return self.home / ".compozy" / "config.yaml"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("COMPOZY_", "FLYZT_", "LISTEN_"))
        }
        env.update(
            HOME=str(self.home),
            XDG_RUNTIME_DIR=str(self.root / "run"),
            XDG_STATE_HOME=str(self.root / "xdg-state"),
            XDG_CONFIG_HOME=str(self.root / "xdg-config"),
            COMPOZY_STATE_DIR=str(self.state_dir),
            COMPOZY_AGENT_SOCK=self.socket,
            PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring",
            NO_COLOR="1",
        )
        env.update(self.extra)
        env.update(overrides)
        return env


class AgentProcess:
    """A foreground agent whose output is collected line by line.

    Readiness is the agent's own "serving <path>" log line, so nothing polls.
    """

    def __init__(self, proc: subprocess.Popen[bytes], agent_env: AgentEnv) -> None:
        self.proc = proc
        self.agent_env = agent_env
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._new_line = threading.Condition()
        self._output_ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            if " serving " in line:
                self.ready.set()
        self.ready.set()  # exited: wake the waiter, which then sees the exit
        with self._new_line:
            self._output_ended = True
            self._new_line.notify_all()

    def wait_for_log(self, fragment: str, timeout: float = START_TIMEOUT, *,
                     count: int = 1) -> bool:
        """Whether ``count`` lines containing ``fragment`` were logged within ``timeout``
        seconds."""
        def logged() -> bool:
            return sum(fragment in line for line in self.lines) >= count

        with self._new_line:
            self._new_line.wait_for(lambda: self._output_ended or logged(), timeout)
            return logged()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"agent did not start; its output:\n{self.log()}")

    @property
    def socket(self) -> str:
        return self.agent_env.socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def prepare_dirs(agent_env: AgentEnv) -> None:
    for directory in (agent_env.home, agent_env.root / "run"):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)


def start_agent(agent_env: AgentEnv, *args: str, wait: bool = True,
                preexec_fn: Callable[[], object] | None = None, **env: str) -> AgentProcess:
    """Start `python -m compozy_agent` in the foreground; wait for its "serving" line."""
    prepare_dirs(agent_env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "compozy_agent", "-v", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=agent_env.env(**env),
        preexec_fn=preexec_fn,
    )
    agent = AgentProcess(proc, agent_env)
    agent_env.agents.append(agent)
    if wait:
        agent.wait_ready()
    return agent


def run_cli(
    agent_env: AgentEnv, *args: str, input: str | None = None, timeout: float = 60.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the real `compozy` CLI (as its console script would) in the agent's environment."""
    result = subprocess.run(
        [sys.executable, "-c", "from compozy_client.cli import main; main()", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=agent_env.env(**env),
    )
    command = " ".join(args)
    agent_env.outputs.append((f"stderr of `compozy {command}`", result.stderr))
    # `auth token` and `auth dpop-proof` print a token by design: checked for keys only.
    tokens_by_design = args[:2] in (("auth", "token"), ("auth", "dpop-proof"))
    agent_env.outputs.append((f"{canary.TOKEN_OUTPUT if tokens_by_design else ''}stdout of "
                              f"`compozy {command}`", result.stdout))
    return result


def settled_agent_pids(agent_env: AgentEnv, timeout: float = START_TIMEOUT) -> list[int]:
    """:func:`agent_pids` once every agent that lost a start-up race has exited.

    A CLI that found no agent starts one; when many do at once, exactly one
    binds the socket and the others exit as soon as they find it taken, which
    a loaded machine may delay past the CLIs' answers. Waits on the losers'
    pidfds (no polling), at most ``timeout`` seconds; returns whatever is
    left then.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = agent_pids(agent_env)
        left = deadline - time.monotonic()
        if len(pids) <= 1 or left <= 0:
            return pids
        poller = select.poll()
        handles = []
        for pid in pids:
            try:
                handles.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
            poller.register(handles[-1], select.POLLIN)
        try:
            poller.poll(left * 1000)  # wakes as soon as one of them exits
        finally:
            for handle in handles:
                os.close(handle)


def agent_pids(agent_env: AgentEnv) -> list[int]:
    """Pids of live agent processes serving this environment's socket (read from /proc)."""
    marker = f"COMPOZY_AGENT_SOCK={agent_env.socket}\0".encode()
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
            environ = (pid_dir / "environ").read_bytes()
            status = (pid_dir / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" not in status and b"compozy_agent" in cmdline and marker in environ:
            pids.append(int(pid_dir.name))
    return pids


def kill_autostarted(agent_env: AgentEnv) -> None:
    """Stop any agent started by a CLI on this environment's socket."""
    for pid in agent_pids(agent_env):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.fixture
def agent_env() -> Iterator[AgentEnv]:
    """A fresh isolated environment (short path: AF_UNIX paths are limited to 108 bytes)."""

    root = Path(tempfile.mkdtemp(prefix="cz-", dir="/tmp"))
    env = AgentEnv(root)
    yield env
    kill_autostarted(env)
    logs = [(f"log of agent pid {agent.pid}", agent.log()) for agent in env.agents]
    canary.remember_dpop_keys(env.state_dir / "secrets.json")
    leaks = canary.find_leaks(root, [*logs, *env.outputs])
    shutil.rmtree(root, ignore_errors=True)
    assert not leaks, "tokens issued by the test provider leaked to: " + "; ".join(leaks)


@pytest.fixture
def agent(agent_env: AgentEnv) -> Iterator[AgentProcess]:
    """A running agent in the foreground on a private socket."""
    process = start_agent(agent_env)
    yield process
    process.stop()
