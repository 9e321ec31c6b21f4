"""Service managers start the agent: systemd socket activation, launchd, shell lines, forwarding."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.agent import AgentEnv, agent_pids, prepare_dirs, run_cli, start_agent

REPO = Path(__file__).resolve().parents[2]


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"needs {tool} (Debian package {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def ask(path: str, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        return answer


def install_service(agent_env: AgentEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compozy_agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env.env(),
    )


class Activated:
    """`systemd-socket-activate`, which execs the agent in place on the first connection."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))
            if raw.startswith(b"Listening on"):
                self.listening.set()
        self.listening.set()

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def activated(agent_env: AgentEnv) -> Iterator[Activated]:
    """The socket held by systemd's tool, as compozy-agent.socket would hold it."""
    tool = need("systemd-socket-activate", "systemd")
    prepare_dirs(agent_env)
    Path(agent_env.socket).parent.mkdir(mode=0o700)  # DirectoryMode=0700
    env = agent_env.env()
    passed = [
        f"-E{name}={env[name]}"
        for name in ("HOME", "COMPOZY_STATE_DIR", "PYTHON_KEYRING_BACKEND", "PATH")
    ]
    proc = subprocess.Popen(
        [
            tool,
            "-l",
            agent_env.socket,
            "--fdname=agent",
            *passed,
            sys.executable,
            "-m",
            "compozy_agent",
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    activated = Activated(proc)
    assert activated.listening.wait(30) and proc.poll() is None, activated.log()
    yield activated
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)
    activated.reader.join(10)
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.mark.systemd
def test_socket_activation_serves_the_cli(activated: Activated, agent_env: AgentEnv) -> None:
    os.chmod(agent_env.socket, 0o600)  # SocketMode=0600
    result = run_cli(agent_env, "auth", "status", "--json", COMPOZY_AGENT_AUTOSTART="0")
    document = json.loads(result.stdout)
    assert document["agent"]["running"] is True, result.stderr + activated.log()
    assert document["agent"]["pid"] == activated.proc.pid  # exec'd in place
    assert "passed by the service manager" in activated.log()
    activated.proc.terminate()
    assert activated.proc.wait(15) == 0
    # systemd owns the socket: the agent leaves it in place for the next activation.
    assert stat.S_ISSOCK(os.stat(agent_env.socket).st_mode)


@pytest.mark.systemd
def test_socket_activation_refuses_a_socket_others_can_use(
    activated: Activated, agent_env: AgentEnv
) -> None:
    os.chmod(agent_env.socket, 0o666)
    result = run_cli(agent_env, "auth", "status", "--json", COMPOZY_AGENT_AUTOSTART="0")
    assert json.loads(result.stdout)["agent"]["running"] is False
    assert activated.proc.wait(15) == 1
    activated.reader.join(10)
    assert "accessible by others" in activated.log() and "SocketMode=0600" in activated.log()


@pytest.mark.systemd
def test_installed_units_pass_systemd_analyze_verify(agent_env: AgentEnv) -> None:
    analyze = need("systemd-analyze", "systemd")
    prepare_dirs(agent_env)
    agent_env.extra["XDG_CONFIG_HOME"] = str(agent_env.root / "config")
    result = install_service(agent_env, "install-service")
    assert result.returncode == 0, result.stderr
    unit_dir = agent_env.root / "config" / "systemd" / "user"
    assert result.stdout.splitlines() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now compozy-agent.socket",
    ]
    service = (unit_dir / "compozy-agent.service").read_text()
    assert "@COMPOZY_AGENT@" not in service
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    executable = exec_start.removeprefix("ExecStart=").split()[0]
    assert os.path.isabs(executable) and os.access(executable, os.X_OK)
    socket_unit = (unit_dir / "compozy-agent.socket").read_text()
    assert "ListenStream=%t/compozy/agent.sock" in socket_unit
    assert "SocketMode=0600" in socket_unit and "DirectoryMode=0700" in socket_unit
    runtime = agent_env.root / "verify-run"
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(
        [
            analyze,
            "--user",
            "verify",
            "--man=no",
            "--generators=no",
            "compozy-agent.socket",
            "compozy-agent.service",
        ],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"},
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == ""

    removed = install_service(agent_env, "uninstall-service")
    assert removed.returncode == 0, removed.stderr
    assert not any(unit_dir.iterdir())
    assert "systemctl --user disable --now" in removed.stdout


def test_launchd_plist_has_what_launchd_needs() -> None:
    with open(REPO / "launchd" / "dev.compozy.agent.plist", "rb") as file:
        plist = plistlib.load(file)
    assert plist["Label"] == "dev.compozy.agent"
    assert plist["ProgramArguments"] == ["@COMPOZY_AGENT@", "--launchd"]
    listeners = plist["Sockets"]["Listeners"]
    assert listeners["SecureSocketWithKey"] == "COMPOZY_AGENT_SOCK"
    assert listeners["SockPathMode"] == 0o600
    assert plist["StandardErrorPath"].endswith("/Library/Logs/compozy-agent.log")


def test_install_service_renders_the_plist_for_macos(agent_env: AgentEnv) -> None:
    prepare_dirs(agent_env)
    code = (
        "import sys; sys.platform = 'darwin'\n"
        "from compozy_agent import service_install as s\n"
        "files, commands = s.install('darwin')\n"
        "print(files[0]); print(commands)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=agent_env.env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.splitlines()[0])
    assert path == agent_env.home / "Library" / "LaunchAgents" / "dev.compozy.agent.plist"
    plist = plistlib.loads(path.read_bytes())
    assert os.path.isabs(plist["ProgramArguments"][0].split()[0])
    assert plist["StandardErrorPath"] == f"{agent_env.home}/Library/Logs/compozy-agent.log"
    assert "launchctl" in result.stdout and "bootstrap" in result.stdout


@pytest.mark.parametrize(
    ("flag", "first_line"),
    [
        ("--sh", "COMPOZY_AGENT_SOCK={}; export COMPOZY_AGENT_SOCK;"),
        ("--csh", "setenv COMPOZY_AGENT_SOCK {};"),
        ("--fish", "set -gx COMPOZY_AGENT_SOCK {};"),
    ],
)
def test_shell_lines_start_one_agent(agent_env: AgentEnv, flag: str, first_line: str) -> None:
    prepare_dirs(agent_env)
    for _ in range(2):  # the second call finds the running agent
        result = subprocess.run(
            [sys.executable, "-m", "compozy_agent", flag],
            capture_output=True,
            text=True,
            env=agent_env.env(),
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == first_line.format(agent_env.socket)
    assert len(agent_pids(agent_env)) == 1


def test_forwarding_socket_serves_only_hello_status_token(agent_env: AgentEnv) -> None:
    forward = str(agent_env.root / "fwd" / "forward.sock")
    agent = start_agent(agent_env, "--forward-socket", forward, "--forward-profile", "dev")
    try:
        assert stat.S_IMODE(os.stat(forward).st_mode) == 0o600
        hello = ask(forward, {"id": 1, "op": "hello"})
        assert hello["result"]["socket_kind"] == "forward"
        assert sorted(hello["result"]["ops"]) == ["hello", "status", "token"]
        for op, fields in [
            ("login_start", {}),
            ("logout", {"all": True}),
            ("revoke_all", {}),
            ("revoke", {"token_id": "x"}),
            ("refresh", {}),
            ("list", {}),
            ("store_api_key", {"api_key": "k"}),
            ("login_wait", {"login_id": "x"}),
            ("login_cancel", {"login_id": "x"}),
        ]:
            answer = ask(forward, {"id": 2, "op": op, **fields})
            assert answer["error"]["code"] == "forbidden", (op, answer)
        assert (
            ask(forward, {"id": 3, "op": "token", "profile": "prod"})["error"]["code"]
            == "forbidden"
        )
        assert (
            ask(forward, {"id": 4, "op": "token", "token_id": "x", "profile": "dev"})["error"][
                "code"
            ]
            == "forbidden"
        )
        # A forwarded profile gets through to the session logic (not logged in here).
        assert (
            ask(forward, {"id": 5, "op": "token", "profile": "dev"})["error"]["code"]
            == "not_logged_in"
        )
        assert ask(forward, {"id": 6, "op": "status"})["ok"] is True
        # The main socket still serves everything.
        assert ask(agent.socket, {"id": 7, "op": "list"})["ok"] is True
    finally:
        agent.stop()
    assert not os.path.exists(forward)
