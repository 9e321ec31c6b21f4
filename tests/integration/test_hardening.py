"""Hardening that only a real process shows: no core dumps, no same-user ptrace."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.agent import AgentEnv, AgentProcess, prepare_dirs

NOBODY = 65534
#: Run as another uid when we are root: root may trace anything, so the check would say nothing.
AS_USER = NOBODY if os.geteuid() == 0 else None
ROOT = Path(__file__).resolve().parents[2]


def _python() -> tuple[list[str], dict[str, str]]:
    """An interpreter AS_USER can run, and the PYTHONPATH that gives it our packages.

    Our own interpreter may live where another user cannot reach it (a pyenv
    under /root); Debian's python3 of the same version can use the venv's
    packages.
    """
    if AS_USER is None:
        return [sys.executable], {}
    system = shutil.which("python3", path="/usr/bin:/bin")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if system is None or subprocess.run(
            [system, "-c", f"import sys; sys.exit(sys.version.startswith('{version}.') is False)"],
            timeout=30).returncode != 0:
        pytest.skip(f"needs Debian's python3 {version} (package python3) to run the agent as "
                    f"uid {AS_USER}")
    paths = [str(ROOT / "client"), str(ROOT / "agent"), sysconfig.get_paths()["purelib"]]
    return [system], {"PYTHONPATH": os.pathsep.join(paths)}

PTRACE_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
pid = int(sys.argv[1])
if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
    os.waitpid(pid, 0)
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    print("attached")
else:
    print("refused errno", ctypes.get_errno())
"""


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, user=AS_USER, group=AS_USER, extra_groups=[] if AS_USER else None,
    )


@contextlib.contextmanager
def running(agent_env: AgentEnv) -> Iterator[tuple[AgentProcess, subprocess.Popen[bytes]]]:
    """The agent and a plain sleeping Python (the control), both as AS_USER."""
    prepare_dirs(agent_env)
    if AS_USER is not None:
        for path in [agent_env.root, *agent_env.root.rglob("*")]:
            os.chown(path, AS_USER, AS_USER)
    python, extra = _python()
    env = agent_env.env(**extra)
    agent = AgentProcess(_spawn([*python, "-m", "compozy_agent", "-v"], env), agent_env)
    control = _spawn([*python, "-c", "import time; time.sleep(120)"], env)
    try:
        agent.wait_ready()
        yield agent, control
    finally:
        control.kill()
        control.wait()
        agent.stop()
        if control.stdout is not None:
            control.stdout.close()


def _ptrace(pid: int) -> str:
    result = subprocess.run([*_python()[0], "-c", PTRACE_PROBE, str(pid)], capture_output=True,
                            text=True, timeout=30, user=AS_USER, group=AS_USER,
                            extra_groups=[] if AS_USER else None)
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_the_agent_cannot_be_dumped_or_traced_by_its_own_user(agent_env: AgentEnv) -> None:
    with running(agent_env) as (agent, control):
        uid = AS_USER if AS_USER is not None else os.getuid()
        # PR_SET_DUMPABLE 0: the kernel hands the process's /proc files to root.
        assert Path(f"/proc/{control.pid}/status").stat().st_uid == uid  # the control
        assert Path(f"/proc/{agent.pid}/status").stat().st_uid == 0
        limits = Path(f"/proc/{agent.pid}/limits").read_text().splitlines()
        [core] = [line.split() for line in limits if line.startswith("Max core file size")]
        assert core[4:6] == ["0", "0"], core  # soft and hard limit
        # A process of the same user may trace the control but not the agent.
        control_trace = _ptrace(control.pid)
        if control_trace != "attached":
            pytest.skip(f"ptrace is not permitted here at all ({control_trace}); "
                        "the /proc ownership and core limit checks above passed")
        assert _ptrace(agent.pid).startswith("refused errno 1"), "EPERM expected"
        assert agent.proc.poll() is None  # still serving
