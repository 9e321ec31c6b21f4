"""Service managers start the agent: systemd socket activation, launchd, shell lines, forwarding.

systemd's own tools do the systemd parts: ``systemd-socket-activate`` passes
the socket exactly as a socket unit would (LISTEN_FDS, LISTEN_PID,
LISTEN_FDNAMES, then exec), and ``systemd-analyze verify`` judges the units
``install-service`` writes. Neither needs a running systemd.
"""

from __future__ import annotations

import json
import os
import plistlib
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from compozy_agent import service_install
from support.agent import AgentEnv, agent_pids, prepare_dirs, run_cli, start_agent
from support.other_user import answer_to_another_user
from support.real_parts import require_tools

REPO = Path(__file__).resolve().parents[2]


def need(tool: str, package: str) -> str:
    return require_tools((tool,), package, "for the service-manager tests")[0]


def ask(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh connection (waits in the backlog for an agent being exec'd)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        return answer


def compozy_agent(agent_env: AgentEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compozy_agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env.env(),
    )


def wait_for_exit(pid: int, timeout: float = 15.0) -> bool:
    """Wait for a process that is not our child to end (a pidfd turns readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


# --------------------------------------------------------------------------
# systemd socket activation, by systemd's own tool


class Activated:
    """`systemd-socket-activate`, which execs the agent in place on the first connection."""

    def __init__(self, proc: subprocess.Popen[bytes], sockets: list[str]) -> None:
        self.proc = proc
        self.sockets = sockets
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        listening = 0
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))
            if raw.startswith(b"Listening on"):
                listening += 1
                if listening == len(self.sockets):
                    self.listening.set()
        self.listening.set()

    def log(self) -> str:
        if self.proc.poll() is not None:
            self.reader.join(10)  # everything it wrote before exiting
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


#: ``activate(names, paths=[agent socket])`` starts the tool with those sockets.
Activate = Callable[..., Activated]


@pytest.fixture
def activate(agent_env: AgentEnv) -> Iterator[Activate]:
    """Start `systemd-socket-activate -l PATH... --fdname=NAMES compozy-agent`.

    The directory is made 0700 first, as the socket unit's DirectoryMode=0700
    does; the tool itself creates sockets 0644 and has no SocketMode=.
    """
    tool = need("systemd-socket-activate", "systemd")
    prepare_dirs(agent_env)
    Path(agent_env.socket).parent.mkdir(mode=0o700)
    started: list[Activated] = []

    def start(names: list[str], paths: list[str] | None = None) -> Activated:
        paths = paths or [agent_env.socket]
        env = agent_env.env()
        # The tool passes on only TERM, PATH, USER, HOME and what -E names.
        passed = [f"-E{name}={env[name]}" for name in
                  ("COMPOZY_STATE_DIR", "PYTHON_KEYRING_BACKEND", "XDG_RUNTIME_DIR")]
        proc = subprocess.Popen(
            [tool, *[f"--listen={path}" for path in paths], f"--fdname={':'.join(names)}",
             *passed, sys.executable, "-m", "compozy_agent", "-v"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        activated = Activated(proc, paths)
        started.append(activated)
        assert activated.listening.wait(30) and proc.poll() is None, activated.log()
        return activated

    yield start
    for activated in started:
        activated.stop()


@pytest.mark.systemd
def test_socket_activation_serves_the_cli(activate: Activate, agent_env: AgentEnv) -> None:
    activated = activate(["agent"])
    os.chmod(agent_env.socket, 0o600)  # what SocketMode=0600 does
    result = run_cli(agent_env, "auth", "status", "--json", COMPOZY_AGENT_AUTOSTART="0")
    document = json.loads(result.stdout)
    assert document["agent"]["running"] is True, result.stderr + activated.log()
    assert document["agent"]["pid"] == activated.proc.pid  # exec'd in place: LISTEN_PID
    hello = ask(agent_env.socket, {"id": 1, "op": "hello"})["result"]
    assert hello["socket_kind"] == "full" and "login_start" in hello["ops"]
    activated.proc.terminate()
    assert activated.proc.wait(15) == 0
    log = activated.log()
    assert f"passed by the service manager: {agent_env.socket} (full)" in log
    assert "Traceback" not in log
    # systemd owns the socket: the agent leaves it for the next activation, and took no lock.
    assert stat.S_ISSOCK(os.stat(agent_env.socket).st_mode)
    assert not os.path.exists(agent_env.socket + ".lock")


@pytest.mark.systemd
def test_socket_activation_refuses_peers_of_another_uid(
    activate: Activate, agent_env: AgentEnv
) -> None:
    activated = activate(["agent"])
    os.chmod(agent_env.socket, 0o600)  # what SocketMode=0600 does
    assert ask(agent_env.socket, {"id": 1, "op": "hello"})["ok"] is True  # activated, ours
    assert answer_to_another_user(agent_env.socket, agent_env.root) == "b''"
    assert ask(agent_env.socket, {"id": 2, "op": "hello"})["ok"] is True
    assert "refused a connection from uid 65534" in activated.log()


@pytest.mark.systemd
def test_socket_activation_refuses_a_socket_others_can_reach(
    activate: Activate, agent_env: AgentEnv
) -> None:
    activated = activate(["agent"])  # left 0644, as without SocketMode=0600
    result = run_cli(agent_env, "auth", "status", "--json", COMPOZY_AGENT_AUTOSTART="0")
    assert json.loads(result.stdout)["agent"]["running"] is False
    assert activated.proc.wait(15) == 1
    log = activated.log()
    assert f"refusing the socket passed by systemd: inherited socket {agent_env.socket}" in log
    assert "mode 644" in log and "SocketMode=0600" in log
    assert "Traceback" not in log


@pytest.mark.systemd
def test_a_passed_socket_named_forward_is_restricted(
    activate: Activate, agent_env: AgentEnv
) -> None:
    forward = str(Path(agent_env.socket).parent / "forward.sock")
    activated = activate(["agent", "forward"], [agent_env.socket, forward])
    for path in (agent_env.socket, forward):
        os.chmod(path, 0o600)
    hello = ask(forward, {"id": 1, "op": "hello"})["result"]
    assert hello["socket_kind"] == "forward" and hello["pid"] == activated.proc.pid
    assert ask(forward, {"id": 2, "op": "list"})["error"]["code"] == "forbidden"
    assert ask(agent_env.socket, {"id": 3, "op": "list"})["ok"] is True
    assert f"{forward} (forward)" in activated.log()


@pytest.mark.systemd
def test_only_a_forwarding_socket_is_refused(activate: Activate, agent_env: AgentEnv) -> None:
    activated = activate(["forward"])
    os.chmod(agent_env.socket, 0o600)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(agent_env.socket)  # starts the agent, which then refuses
    assert activated.proc.wait(15) == 1
    assert "passed only a forwarding socket" in activated.log()


def test_launchd_mode_is_refused_off_macos(agent_env: AgentEnv) -> None:
    prepare_dirs(agent_env)
    result = compozy_agent(agent_env, "--launchd")
    assert result.returncode == 1
    assert "--launchd is for macOS" in result.stderr
    assert not os.path.exists(agent_env.socket)


# --------------------------------------------------------------------------
# The unit files, judged by systemd-analyze


def verify_units(unit_dir: Path, runtime: Path) -> subprocess.CompletedProcess[str]:
    analyze = need("systemd-analyze", "systemd")
    runtime.mkdir(mode=0o700, exist_ok=True)
    # --user reads the user manager's settings offline; it needs only a runtime dir.
    return subprocess.run(
        [analyze, "--user", "verify", "--man=no", "--generators=no",
         *[str(unit_dir / name) for name in service_install.SYSTEMD_UNITS]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"},
    )


@pytest.mark.systemd
def test_install_service_writes_units_systemd_accepts(agent_env: AgentEnv) -> None:
    prepare_dirs(agent_env)
    agent_env.extra["XDG_CONFIG_HOME"] = str(agent_env.root / "config")
    result = compozy_agent(agent_env, "install-service")
    assert result.returncode == 0, result.stderr
    unit_dir = agent_env.root / "config" / "systemd" / "user"
    assert result.stdout.splitlines() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now compozy-agent.socket",
    ]
    assert f"wrote {unit_dir / 'compozy-agent.service'}" in result.stderr
    service = (unit_dir / "compozy-agent.service").read_text()
    assert "@COMPOZY_AGENT@" not in service
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    # This installation's own console script, beside its interpreter.
    expected = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "compozy-agent")
    assert exec_start == f"ExecStart={expected}"
    assert os.access(expected, os.X_OK)
    socket_unit = (unit_dir / "compozy-agent.socket").read_text()
    assert "ListenStream=%t/compozy/agent.sock" in socket_unit
    assert "SocketMode=0600" in socket_unit and "DirectoryMode=0700" in socket_unit
    state = agent_env.home / ".local" / "state" / "compozy"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700  # ReadWritePaths= needs it to exist

    verify = verify_units(unit_dir, agent_env.root / "verify-run")
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == ""  # no warnings either (an unknown key is only a warning)

    # What `systemctl --user enable` would add, so uninstall must take it away too.
    wants = unit_dir / "sockets.target.wants"
    wants.mkdir()
    (wants / "compozy-agent.socket").symlink_to(unit_dir / "compozy-agent.socket")
    removed = compozy_agent(agent_env, "uninstall-service")
    assert removed.returncode == 0, removed.stderr
    assert [p.name for p in unit_dir.rglob("*")] == ["sockets.target.wants"]
    assert removed.stdout.splitlines() == [
        "systemctl --user stop compozy-agent.socket compozy-agent.service",
        "systemctl --user daemon-reload",
    ]


@pytest.mark.systemd
def test_exec_start_quoting_survives_systemd(tmp_path: Path) -> None:
    # A virtualenv in a directory with a space and a percent sign in its name.
    odd = tmp_path / "my venv 100%"
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    command = [str(odd / "python"), "-m", "compozy_agent"]
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in service_install.SYSTEMD_UNITS:
        text = (REPO / "systemd" / name).read_text()
        (unit_dir / name).write_text(service_install.render_unit(text, command))
    exec_start = next(line for line in (unit_dir / "compozy-agent.service").read_text()
                      .splitlines() if line.startswith("ExecStart="))
    assert exec_start == f'ExecStart="{tmp_path}/my venv 100%%/python" -m compozy_agent'
    verify = verify_units(unit_dir, tmp_path / "run")
    assert verify.returncode == 0, verify.stderr  # it found the executable: quoting held
    assert verify.stderr == ""


def test_the_repository_units_hold_the_settings_the_agent_relies_on() -> None:
    socket_unit = (REPO / "systemd" / "compozy-agent.socket").read_text().splitlines()
    for setting in ("ListenStream=%t/compozy/agent.sock", "SocketMode=0600",
                    "DirectoryMode=0700", "FileDescriptorName=agent", "WantedBy=sockets.target"):
        assert setting in socket_unit
    service = (REPO / "systemd" / "compozy-agent.service").read_text().splitlines()
    for setting in ("ExecStart=@COMPOZY_AGENT@", "Restart=on-failure", "LimitCORE=0",
                    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
                    "ReadWritePaths=-%h/.local/state/compozy -%t/compozy",
                    "Environment=COMPOZY_STATE_DIR=%h/.local/state/compozy",
                    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert setting in service
    # Settings that would stop a user service from starting, or kill the agent.
    for setting in ("PrivateUsers=", "CapabilityBoundingSet=", "MemoryDenyWriteExecute="):
        assert not any(line.startswith(setting) for line in service)


# --------------------------------------------------------------------------
# launchd


def test_launchd_plist_has_what_launchd_needs() -> None:
    with open(REPO / "launchd" / "dev.compozy.agent.plist", "rb") as file:
        plist = plistlib.load(file)
    assert plist["Label"] == "dev.compozy.agent"
    assert plist["ProgramArguments"] == ["@COMPOZY_AGENT@", "--launchd"]
    listeners = plist["Sockets"]["Listeners"]
    assert listeners["SecureSocketWithKey"] == "COMPOZY_AGENT_SOCK"
    assert listeners["SockPathMode"] == 0o600
    assert plist["RunAtLoad"] is True
    assert plist["HardResourceLimits"]["Core"] == 0
    assert plist["StandardErrorPath"] == "@HOME@/Library/Logs/compozy-agent.log"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"]


def test_install_service_renders_the_plist_for_macos(
    agent_env: AgentEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_dirs(agent_env)
    monkeypatch.setenv("HOME", str(agent_env.home))
    monkeypatch.setattr(service_install, "agent_command",
                        lambda: ["/opt/my venv/bin/python", "-m", "compozy_agent"])
    plan = service_install.install("darwin")
    path = agent_env.home / "Library" / "LaunchAgents" / "dev.compozy.agent.plist"
    assert plan.files == [path]
    plist = plistlib.loads(path.read_bytes())
    assert plist["ProgramArguments"] == ["/opt/my venv/bin/python", "-m", "compozy_agent",
                                         "--launchd"]
    assert plist["StandardErrorPath"] == f"{agent_env.home}/Library/Logs/compozy-agent.log"
    assert plist["Sockets"]["Listeners"]["SecureSocketWithKey"] == "COMPOZY_AGENT_SOCK"
    assert (agent_env.home / "Library" / "Logs").is_dir()
    domain = f"gui/{os.getuid()}"
    assert plan.commands == [["launchctl", "bootstrap", domain, str(path)]]
    assert plan.quiet_first == [["launchctl", "bootout", f"{domain}/dev.compozy.agent"]]
    removal = service_install.uninstall("darwin", now=False)
    assert removal.files == [path]
    assert removal.commands == [["launchctl", "bootout", f"{domain}/dev.compozy.agent"]]


# --------------------------------------------------------------------------
# install-service pieces


def test_agent_command_is_this_installation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = elsewhere / "compozy-agent"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", str(elsewhere))
    # The script beside the interpreter, not the one first on PATH.
    assert service_install.agent_command() == [
        os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "compozy-agent")
    ]
    # No script beside the interpreter: the module, still not someone else's script.
    bare = tmp_path / "bare" / "bin"
    bare.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bare / "python3"))
    assert service_install.agent_command() == [str(bare / "python3"), "-m", "compozy_agent"]


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("/usr/bin/compozy-agent", "/usr/bin/compozy-agent"),
        ("-m", "-m"),
        ("/home/a b/bin/python", '"/home/a b/bin/python"'),
        ("/home/x/100%/python", "/home/x/100%%/python"),
        ("/home/$USER/python", "/home/$$USER/python"),
        ('/home/q"uote/py', '"/home/q\\"uote/py"'),
        ("/home/back\\slash", '"/home/back\\\\slash"'),
    ],
)
def test_systemd_quote(word: str, quoted: str) -> None:
    assert service_install.systemd_quote(word) == quoted


def test_systemd_dir_honours_xdg_config_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/cfg")
    assert service_install.systemd_dir() == Path("/cfg/systemd/user")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/is/ignored")  # the XDG spec says so
    assert service_install.systemd_dir() == Path("/home/someone/.config/systemd/user")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert service_install.systemd_dir() == Path("/home/someone/.config/systemd/user")


def test_install_service_notes_a_socket_override(agent_env: AgentEnv) -> None:
    prepare_dirs(agent_env)
    plain = compozy_agent(agent_env, "install-service")  # the default path: nothing to say
    assert plain.returncode == 0, plain.stderr
    assert "note:" not in plain.stderr
    elsewhere = str(agent_env.root / "elsewhere.sock")
    agent_env.extra["COMPOZY_AGENT_SOCK"] = elsewhere
    noted = compozy_agent(agent_env, "install-service")
    assert noted.returncode == 0, noted.stderr
    assert f"note: COMPOZY_AGENT_SOCK={elsewhere} points elsewhere" in noted.stderr
    assert f"the socket systemd holds is {agent_env.socket}" in noted.stderr


def test_help_shows_the_service_commands_with_examples(agent_env: AgentEnv) -> None:
    top = compozy_agent(agent_env, "--help")
    assert top.returncode == 0
    assert "install-service [--now]" in top.stdout and "uninstall-service" in top.stdout
    assert "--forward-socket" in top.stdout and "--forward-profile" in top.stdout
    for command in ("install-service", "uninstall-service"):
        sub = compozy_agent(agent_env, command, "--help")
        assert sub.returncode == 0
        assert f"usage: compozy-agent {command}" in sub.stdout and "examples:" in sub.stdout
    assert compozy_agent(agent_env, "install-service", "--bogus").returncode == 2


# --------------------------------------------------------------------------
# Shell lines


@pytest.mark.parametrize(
    ("flag", "lines"),
    [
        ("--sh",
         ["COMPOZY_AGENT_SOCK={path}; export COMPOZY_AGENT_SOCK;", "echo Agent pid {pid};"]),
        ("--csh", ["setenv COMPOZY_AGENT_SOCK {path};", "echo Agent pid {pid};"]),
        ("--fish", ["set -gx COMPOZY_AGENT_SOCK {path};", "echo Agent pid {pid};"]),
    ],
)
def test_shell_lines_start_one_detached_agent(
    agent_env: AgentEnv, flag: str, lines: list[str]
) -> None:
    prepare_dirs(agent_env)
    assert not os.path.exists(agent_env.socket)
    outputs = []
    for _ in range(2):  # the second call finds the running agent
        result = compozy_agent(agent_env, flag)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    pids = agent_pids(agent_env)
    assert len(pids) == 1
    pid = pids[0]
    expected = "".join(line.format(path=agent_env.socket, pid=pid) + "\n" for line in lines)
    assert outputs == [expected, expected]
    hello = ask(agent_env.socket, {"id": 1, "op": "hello"})["result"]
    assert hello["pid"] == pid
    # Detached: its own session, not a child of the command that started it.
    assert os.getsid(pid) == pid
    os.kill(pid, signal.SIGTERM)
    assert wait_for_exit(pid)
    assert not os.path.exists(agent_env.socket)


# --------------------------------------------------------------------------
# The forwarding socket


FORBIDDEN_ON_FORWARD = [
    ("list", {}),
    ("refresh", {}),
    ("revoke", {"token_id": "x"}),
    ("revoke_all", {}),
    ("logout", {"all": True}),
    ("login_start", {}),
    ("login_wait", {"login_id": "x"}),
    ("login_cancel", {"login_id": "x"}),
    ("store_api_key", {"api_key": "k"}),
    ("lock", {"passphrase": "p"}),  # a remote host must not lock you out
    ("unlock", {"passphrase": "p"}),
    ("audit_log", {}),
    ("exec_socket", {"profile": "default"}),  # no sockets of its own for a remote host
]


def test_forwarding_socket_serves_only_hello_status_token(agent_env: AgentEnv) -> None:
    forward = str(agent_env.root / "fwd" / "forward.sock")
    agent = start_agent(agent_env, "--forward-socket", forward)
    try:
        assert stat.S_IMODE(os.stat(forward).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(forward)).st_mode) == 0o700
        hello = ask(forward, {"id": 1, "op": "hello"})["result"]
        assert hello["socket_kind"] == "forward"
        # dpop_proof: a DPoP-bound profile's token is of no use without its proofs.
        assert sorted(hello["ops"]) == ["dpop_proof", "hello", "status", "token"]
        assert set(hello["ops"]) | {op for op, _ in FORBIDDEN_ON_FORWARD} == set(
            ask(agent.socket, {"id": 1, "op": "hello"})["result"]["ops"])
        for op, fields in FORBIDDEN_ON_FORWARD:
            answer = ask(forward, {"id": 2, "op": op, **fields})
            assert answer["error"]["code"] == "forbidden", (op, answer)
            assert "not allowed on the forwarding socket" in answer["error"]["message"]
        # Without --forward-profile every profile gets through to the session logic.
        for profile in ("dev", "prod"):
            answer = ask(forward, {"id": 3, "op": "token", "profile": profile})
            assert answer["error"]["code"] == "not_logged_in"
        assert ask(forward, {"id": 4, "op": "status"})["ok"] is True
        assert ask(agent.socket, {"id": 5, "op": "list"})["ok"] is True
        assert "forwarding socket" in agent.log() and "every profile" in agent.log()
    finally:
        agent.stop()
    assert not os.path.exists(forward)


def test_forwarding_socket_serves_only_the_forwarded_profiles(agent_env: AgentEnv) -> None:
    forward = str(agent_env.root / "fwd" / "forward.sock")
    agent = start_agent(agent_env, "--forward-socket", forward,
                        "--forward-profile", "dev", "--forward-profile", "qa")
    try:
        token_ids = {}
        for profile in ("dev", "prod"):
            stored = ask(agent.socket, {"id": 1, "op": "store_api_key", "profile": profile,
                                        "api_key": f"key-{profile}"})
            assert stored["ok"] is True, stored
            token_ids[profile] = stored["result"]["token_id"]
        token = ask(forward, {"id": 2, "op": "token", "profile": "dev"})
        assert token["result"]["access_token"] == "key-dev"
        for request in (
            {"op": "token", "profile": "prod"},
            {"op": "token", "token_id": token_ids["prod"]},
            # By id even for a forwarded profile: ids are not checked against profiles.
            {"op": "token", "token_id": token_ids["dev"], "profile": "dev"},
            {"op": "status", "profile": "prod"},
            {"op": "dpop_proof", "profile": "prod", "htm": "GET", "htu": "https://api.test/"},
            {"op": "dpop_proof", "token_id": token_ids["prod"], "htm": "GET",
             "htu": "https://api.test/"},
        ):
            answer = ask(forward, {"id": 3, **request})
            assert answer["error"]["code"] == "forbidden", (request, answer)
            assert "key-prod" not in json.dumps(answer)
        status = ask(forward, {"id": 4, "op": "status"})["result"]
        assert [s["profile"] for s in status["sessions"]] == ["dev"]
        assert status["warnings"] == []
        assert ask(forward, {"id": 5, "op": "status", "profile": "dev"})["ok"] is True
        # The main socket is not filtered.
        assert ask(agent.socket, {"id": 6, "op": "token", "profile": "prod"})["result"][
            "access_token"] == "key-prod"
        assert len(ask(agent.socket, {"id": 7, "op": "status"})["result"]["sessions"]) == 2
    finally:
        agent.stop()


def test_forward_profile_without_a_forwarding_socket_is_pointed_out(agent_env: AgentEnv) -> None:
    agent = start_agent(agent_env, "--forward-profile", "dev")
    try:
        assert "--forward-profile has no effect without a forwarding socket" in agent.log()
    finally:
        agent.stop()


def test_shell_lines_start_an_agent_even_with_autostart_off(agent_env: AgentEnv) -> None:
    """COMPOZY_AGENT_AUTOSTART=0 stops implicit starts by the CLI, not an explicit --sh."""
    prepare_dirs(agent_env)
    agent_env.extra["COMPOZY_AGENT_AUTOSTART"] = "0"
    result = compozy_agent(agent_env, "--sh")
    assert result.returncode == 0, result.stderr
    pids = agent_pids(agent_env)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGTERM)
    assert wait_for_exit(pids[0])
