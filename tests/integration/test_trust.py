"""The client side of the trust boundary, attacked as a local adversary would.

* A cloned repository's ``anyio.py`` must not run in an agent the CLI starts
  there, and that agent must not inherit the caller's secrets.
* Another user (uid 65534) who gets to the socket path first, or whose socket
  ends up in our directory, must not receive a single byte from any client.
* A config file another uid owns or others can write is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.agent import AgentEnv, AgentProcess, agent_pids, prepare_dirs, run_cli
from support.wire import ask

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "client" / "bin" / "compozy"
GIT_HELPER = ROOT / "client" / "bin" / "git-credential-compozy"
#: Client paths that try a light path before the library, so connect twice to a peer
#: they then refuse: `compozy auth token` and git's `get`.
LIGHT_PATHS = 2
AGENT_SCRIPT = Path(sys.executable).parent / "compozy-agent"

# --------------------------------------------------------------------------
# Item 1: an agent started by the CLI is isolated from the caller.

# A module planted in a repository: it leaves a mark, then hands over to the
# real module so that nothing visibly breaks (as a real attack would).
_PLANTED = """\
import importlib, os, sys
with open({marker!r}, "a") as _mark:
    _mark.write(f"{{__name__}} imported from the caller's directory by pid {{os.getpid()}}\\n")
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
del sys.modules[__name__]
sys.modules[__name__] = importlib.import_module(__name__)
"""


def plant_repository(root: Path) -> tuple[Path, Path]:
    """A directory as a cloned repository could be: ``anyio.py`` and ``httpx.py`` that mark."""
    repo = root / "repo"
    repo.mkdir()
    marker = root / "planted-code-ran"
    for name in ("anyio", "httpx"):
        (repo / f"{name}.py").write_text(_PLANTED.format(marker=str(marker)))
    return repo, marker


@pytest.mark.parametrize("starter", ["compozy auth status", "compozy-agent --sh"])
def test_an_autostarted_agent_runs_no_code_from_the_callers_directory(
    agent_env: AgentEnv, starter: str
) -> None:
    prepare_dirs(agent_env)
    repo, marker = plant_repository(agent_env.root)
    if starter == "compozy auth status":
        command = [sys.executable, str(LAUNCHER), "auth", "status"]
    else:
        command = [str(AGENT_SCRIPT), "--sh"]
    result = subprocess.run(command, cwd=repo, env=agent_env.env(), capture_output=True,
                            text=True, timeout=60)
    agent_env.outputs.append((f"output of {starter}", result.stdout + result.stderr))
    assert not marker.exists(), marker.read_text()
    # ... and the agent it started works.
    if starter == "compozy auth status":
        assert "Agent: running" in result.stdout, result.stderr
    else:
        assert result.returncode == 0 and "Agent pid" in result.stdout, result.stderr
    (pid,) = agent_pids(agent_env)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    listing = run_cli(agent_env, "auth", "list", "--json", COMPOZY_AGENT_AUTOSTART="0")
    assert listing.returncode == 0 and '"sessions": []' in listing.stdout, listing.stderr


def test_an_autostarted_agent_inherits_no_secrets_of_its_caller(agent_env: AgentEnv) -> None:
    prepare_dirs(agent_env)
    secrets = {
        "FLYZT_API_KEY": "flyzt-key-of-the-caller",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-of-the-caller",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEOFTHECALLER",
        "GITHUB_TOKEN": "ghp_token_of_the_caller",
    }
    repo, _ = plant_repository(agent_env.root)
    result = subprocess.run([sys.executable, str(LAUNCHER), "auth", "list"], cwd=repo,
                            env=agent_env.env(**secrets, COMPOZY_STATE_DIR="state-relative"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (pid,) = agent_pids(agent_env)
    environ = dict(
        entry.split("=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if entry
    )
    assert not set(secrets) & set(environ), sorted(environ)
    for value in secrets.values():
        assert value not in Path(f"/proc/{pid}/environ").read_bytes().decode()
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert "-P" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    # What it needs is kept; a relative path still names the caller's directory.
    assert environ["HOME"] == str(agent_env.home)
    assert environ["XDG_RUNTIME_DIR"] == str(agent_env.root / "run")
    assert environ["COMPOZY_STATE_DIR"] == str(repo / "state-relative")
    assert (repo / "state-relative" / "agent.log").exists()


def test_the_agent_works_in_root_and_resolves_relative_paths_first(agent_env: AgentEnv) -> None:
    """A foreground agent started by hand in some directory leaves it, keeping its paths."""
    prepare_dirs(agent_env)
    proc = subprocess.Popen(
        [str(AGENT_SCRIPT), "-v", "--socket", "run/compozy/agent.sock"],
        cwd=agent_env.root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=agent_env.env(COMPOZY_STATE_DIR="state", COMPOZY_AGENT_SOCK=""),
    )
    agent = AgentProcess(proc, agent_env)
    agent_env.agents.append(agent)
    try:
        agent.wait_ready()
        assert os.readlink(f"/proc/{proc.pid}/cwd") == "/"
        assert f"serving {agent_env.socket}" in agent.log()
        assert (agent_env.root / "state").is_dir() and not Path("/state").exists()
        listing = run_cli(agent_env, "auth", "list", "--json", COMPOZY_AGENT_AUTOSTART="0")
        assert listing.returncode == 0, listing.stderr
    finally:
        agent.stop()


# --------------------------------------------------------------------------
# Item 2: no client sends a byte to a socket another user controls.

# Run as uid 65534: listen on argv[1] (creating its directories, as someone
# who got to a shared temporary directory first would), say "ready", record
# every connection and every byte received, close a connection once a request
# line has arrived (so a client that did send gives up at once). When stdin
# closes, drain whatever is still queued, report it and exit.
_RELAY = """\
import os, select, socket, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
server.listen(64)
print("ready", flush=True)
conns = []

def accept():
    conn, _ = server.accept()
    conns.append(conn)
    print("connection", flush=True)

def read(conn):
    try:
        data = conn.recv(65536)
    except OSError:
        data = b""
    if data:
        print(f"received {len(data)}", flush=True)
    if not data or b"\\n" in data:
        conns.remove(conn)
        conn.close()

while True:
    ready, _, _ = select.select([sys.stdin, server, *conns], [], [])
    if sys.stdin in ready:
        break
    for item in ready:
        if item is server:
            accept()
        else:
            read(item)
server.setblocking(False)
while True:
    try:
        accept()
    except BlockingIOError:
        break
for conn in list(conns):
    conn.setblocking(False)
    while conn in conns:
        try:
            read(conn)
        except BlockingIOError:
            break
print("done", flush=True)
"""


@dataclass
class Relay:
    """A listener run by uid 65534; ``finish()`` says what it saw."""

    proc: subprocess.Popen[str]
    path: str

    def finish(self) -> tuple[int, int]:
        """(connections, bytes received), after the relay has drained its queue."""
        out, _ = self.proc.communicate(timeout=30)
        lines = out.splitlines()
        assert lines[-1:] == ["done"], out
        connections = sum(1 for line in lines if line == "connection")
        received = sum(int(line.split()[1]) for line in lines if line.startswith("received"))
        return connections, received


def _system_python() -> str:
    if os.getuid() != 0:
        pytest.skip("needs root to run a listener as another user (uid 65534)")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs a system python3 (Debian python3) that uid 65534 may run")
    return python


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory like /tmp: everyone may create entries in it."""
    path = Path(tempfile.mkdtemp(prefix="cz-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_relay(path: Path) -> Relay:
    """Listen on ``path`` as uid 65534; returns once it listens."""
    proc = subprocess.Popen(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
         _system_python(), "-c", _RELAY, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin"},
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the relay did not start: {proc.communicate(timeout=10)}")
    return Relay(proc, str(path))


# The library calls, as a tool would make them: refused means UnsafeAgentSocket.
_LIBRARY_CALL = """\
import asyncio, sys
from compozy_client import async_get_token, get_token
from compozy_client.errors import UnsafeAgentSocket
try:
    if sys.argv[1] == "async":
        asyncio.run(async_get_token())
    else:
        get_token()
except UnsafeAgentSocket as exc:
    print(f"refused: {exc}")
"""


def every_client_path(agent_env: AgentEnv, **env: str) -> dict[str, tuple[int, str]]:
    """Each way a client talks to the agent: (exit code, what it printed)."""
    results: dict[str, tuple[int, str]] = {}
    for name, args, stdin in [
        ("auth status", ["auth", "status"], None),
        ("auth token", ["auth", "token"], None),
        ("login --with-api-key", ["login", "--with-api-key"], "key-for-the-real-agent\n"),
        ("auth unlock", ["auth", "unlock", "--passphrase-stdin"], "my-unlock-passphrase\n"),
    ]:
        cli = subprocess.run([sys.executable, str(LAUNCHER), *args], input=stdin,
                             capture_output=True, text=True, env=agent_env.env(**env), timeout=60)
        results[name] = (cli.returncode, cli.stdout + cli.stderr)
    # git's credential helper, as git runs it: it tells git to stop, with the reason.
    helper = subprocess.run([sys.executable, str(GIT_HELPER), "get"],
                            input="protocol=https\nhost=git.example.com\n\n",
                            capture_output=True, text=True, env=agent_env.env(**env), timeout=60)
    assert helper.stdout in ("", "quit=1\n"), "the helper answered git with credentials"
    results["git-credential-compozy get"] = (helper.returncode, helper.stdout + helper.stderr)
    for name in ("get_token", "async"):
        call = subprocess.run([sys.executable, "-c", _LIBRARY_CALL, name], capture_output=True,
                              text=True, env=agent_env.env(**env), timeout=60)
        results[f"{name}()"] = (0 if call.stdout.startswith("refused: ") else 1,
                                call.stdout + call.stderr)
    return results


def test_a_socket_directory_another_user_created_first_gets_nothing(
    agent_env: AgentEnv, shared_tmp: Path
) -> None:
    """No XDG_RUNTIME_DIR (cron, su, containers): the socket falls back under the shared TMPDIR,
    where uid 65534 created ``runtime-<uid>/compozy`` first and listens."""
    prepare_dirs(agent_env)
    path = shared_tmp / f"runtime-{os.getuid()}" / "compozy" / "agent.sock"
    env = {"COMPOZY_AGENT_SOCK": "", "TMPDIR": str(shared_tmp), "XDG_RUNTIME_DIR": ""}
    if os.path.isdir(f"/run/user/{os.getuid()}"):  # it would take precedence over TMPDIR
        env["XDG_RUNTIME_DIR"] = str(shared_tmp / f"runtime-{os.getuid()}")
    relay = start_relay(path)
    results = every_client_path(agent_env, **env)
    connections, received = relay.finish()
    assert received == 0 and connections == 0, results
    for name, (code, output) in results.items():
        if name.endswith("()"):
            assert code == 0, f"{name}: {output}"  # raised UnsafeAgentSocket
        else:
            assert code == 1, f"{name}: {output}"
            assert "Traceback" not in output
        assert f"socket directory {path.parent} belongs to uid {NOBODY}" in output, name
        assert "COMPOZY_AGENT_SOCK" in output, name
    assert not (agent_env.state_dir / "agent.log").exists()  # no agent was started either


@pytest.mark.parametrize("socket_owner", ["theirs", "chowned to us"])
def test_another_users_listener_in_our_private_directory_gets_nothing(
    agent_env: AgentEnv, shared_tmp: Path, socket_owner: str
) -> None:
    """Our own 0700 directory, but the socket in it is uid 65534's listener (moved in by root).

    Chowned to us, only the kernel's peer credentials can tell.
    """
    prepare_dirs(agent_env)
    ours = Path(agent_env.socket)
    ours.parent.mkdir(mode=0o700)
    relay = start_relay(shared_tmp / "theirs" / "agent.sock")
    os.rename(relay.path, ours)
    if socket_owner == "chowned to us":
        os.chown(ours, os.getuid(), os.getgid())
    results = every_client_path(agent_env)
    connections, received = relay.finish()
    assert received == 0, results
    for name, (code, output) in results.items():
        assert code == (0 if name.endswith("()") else 1), f"{name}: {output}"
        if socket_owner == "theirs":
            assert f"{ours} belongs to uid {NOBODY}" in output, name
        else:
            assert f"served by a process of uid {NOBODY}" in output, name
    # A light path connects, refuses the peer, and the library connects and refuses again.
    assert connections == (0 if socket_owner == "theirs" else len(results) + LIGHT_PATHS)
    assert ours.exists() and not (agent_env.state_dir / "agent.log").exists()


# --------------------------------------------------------------------------
# Item 13: a config file that others control is refused; a key others can read is warned about.


def write_config(agent_env: AgentEnv, text: str, mode: int, owner: int | None = None) -> Path:
    agent_env.config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    agent_env.config.write_text(textwrap.dedent(text))
    agent_env.config.chmod(mode)
    if owner is not None:
        os.chown(agent_env.config, owner, owner)
    return agent_env.config


def test_a_group_writable_config_with_a_key_is_refused(agent_env: AgentEnv) -> None:
    config = write_config(agent_env, "auth:\n  api_key: planted-key-123\n", 0o620)
    token = run_cli(agent_env, "auth", "token")
    assert token.returncode == 1 and token.stdout == ""
    assert f"config file {config} is writable by group or others" in token.stderr
    assert f"chmod 600 {config}" in token.stderr
    assert "planted-key-123" not in token.stderr
    library = subprocess.run(
        [sys.executable, "-c", "from compozy_client import get_token; print(get_token())"],
        capture_output=True, text=True, env=agent_env.env(), timeout=60)
    assert library.returncode == 1 and "planted-key-123" not in library.stdout
    assert "UnsafeConfigFile" in library.stderr and str(config) in library.stderr


def test_a_config_owned_by_another_user_cannot_set_the_issuer(
    agent_env: AgentEnv, agent: AgentProcess
) -> None:
    config = write_config(agent_env, """\
        profiles:
          default:
            issuer: https://login.attacker.example
        """, 0o644, owner=NOBODY)
    login = run_cli(agent_env, "login", "--no-browser", "--timeout", "5")
    assert login.returncode == 1
    assert f"config file {config} belongs to uid {NOBODY}" in login.stderr
    assert "attacker" not in login.stderr
    # The agent reads the same file for a login and refuses it as well.
    answer = ask(agent.socket, {"id": 1, "op": "login_start", "flow": "device"})
    assert answer["error"]["code"] == "config_error", answer
    assert f"belongs to uid {NOBODY}" in answer["error"]["message"]
    for command in (["auth", "list"], ["auth", "token"], ["auth", "status"]):
        result = run_cli(agent_env, *command)
        assert result.returncode == 1 and str(config) in result.stderr, command


def test_a_key_others_can_read_is_warned_about_on_every_command(
    agent_env: AgentEnv, agent: AgentProcess
) -> None:
    config = write_config(agent_env, "auth:\n  api_key: cfg-key-456\n", 0o644)
    warning = f"{config} holds an API key and is readable by other users; run: chmod 600"
    for command in (["auth", "list"], ["auth", "log"], ["auth", "token"], ["auth", "status"]):
        result = run_cli(agent_env, *command)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stderr.count(warning) == 1, (command, result.stderr)
    config.chmod(0o600)
    assert "readable by other users" not in run_cli(agent_env, "auth", "list").stderr
