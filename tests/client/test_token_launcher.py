"""The `compozy` launcher's `auth token` path without cached bytecode (issue 15, item 6).

Where bytecode is not cached (an editable install, ``PYTHONDONTWRITEBYTECODE=1``)
every module the token path imports is compiled on every call, and compiling
costs about its size (docs/performance.md, benchmark 1). So the common path
(no flags, a token in the answer) compiles only what it needs; flags, the
agent's error answers, a timeout and starting an agent load their modules when
taken. These tests run the launcher against a stand-in agent on a private
socket, so they check what the path compiles, loads and answers, never how long
it takes.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from compozy_client.configcheck import record_checked

LAUNCHER = Path(__file__).resolve().parents[2] / "client" / "bin" / "compozy"
TOKEN_ANSWER = b'{"id":1,"ok":true,"result":{"access_token":"tok-123","expires_at":1.0}}\n'
#: The most code the common token path may compile, in tokens (comments, blank lines and
#: indentation not counted; a docstring is one). Before issue 15 item 6 it compiled 3,198:
#: compozy_client/__init__ 141, fasttoken 1,431, paths 562, configcheck 445, peercheck 619.
HOT_PATH_TOKEN_BUDGET = 2_600


class StandInAgent:
    """One connection on ``path``: records the request line, then sends ``answer`` (or,
    with ``answer`` None, holds the connection open until closed)."""

    def __init__(self, path: str, answer: bytes | None) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.answer = answer
        self.request: dict[str, object] = {}
        self.received = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return  # closed before anyone connected
        with conn:
            self.request = json.loads(conn.makefile("rb").readline())
            self.received.set()
            if self.answer is None:
                self.release.wait(30)
            else:
                conn.sendall(self.answer)

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        self.thread.join(10)
        Path(self.path).unlink()


@contextmanager
def stand_in_agent(tmp_path: Path, answer: bytes | None) -> Iterator[StandInAgent]:
    agent = StandInAgent(str(tmp_path / "agent.sock"), answer)
    try:
        yield agent
    finally:
        agent.close()


def launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No config file, the stand-in's socket, no agent started, and no bytecode cached
    for the package: an empty PYTHONPYCACHEPREFIX holds none, and none is written."""
    prefix = tmp_path / "pycache"
    prefix.mkdir(exist_ok=True)
    return {"COMPOZY_AGENT_SOCK": str(tmp_path / "agent.sock"), "HOME": str(tmp_path),
            "PATH": "/usr/bin:/bin", "COMPOZY_AGENT_AUTOSTART": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(prefix), **extra}


def run_launcher(args: list[str], env: dict[str, str], *python_options: str,
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python_options, str(LAUNCHER), *args],
                          capture_output=True, text=True, env=env, timeout=30)


def imported_modules(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reported loading."""
    return {line.split("|")[-1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


# Runs the launcher with builtins.compile counting the code tokens of each module of the
# package it compiles (importlib compiles source through builtins.compile).
_COUNTING_RUNNER = r"""
import builtins, io, os, runpy, sys, tokenize
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
real_compile = builtins.compile

def counting_compile(source, filename, *args, **kwargs):
    if isinstance(source, bytes) and "compozy_client" in str(filename):
        tokens = tokenize.tokenize(io.BytesIO(source).readline)
        count = sum(1 for token in tokens if token.type not in NOT_CODE)
        os.write(2, f"compiled {os.path.basename(filename)} {count}\n".encode())
    return real_compile(source, filename, *args, **kwargs)

builtins.compile = counting_compile
launcher = sys.argv[1]
sys.argv = [launcher, *sys.argv[2:]]
runpy.run_path(launcher, run_name="__main__")
"""


def compiled_by_token_path(tmp_path: Path) -> dict[str, int]:
    """The package's modules `compozy auth token` compiles (answered with a token, no
    bytecode cached), with the code tokens of each."""
    with stand_in_agent(tmp_path, TOKEN_ANSWER):
        result = subprocess.run(
            [sys.executable, "-c", _COUNTING_RUNNER, str(LAUNCHER), "auth", "token"],
            capture_output=True, text=True, env=launcher_env(tmp_path), timeout=30)
    assert result.returncode == 0 and result.stdout == "tok-123\n", result.stderr[-2000:]
    return {line.split()[1]: int(line.split()[2]) for line in result.stderr.splitlines()
            if line.startswith("compiled ")}


def test_the_common_token_path_compiles_only_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without cached bytecode, `compozy auth token` answered with a token compiles its
    own modules only, and at most HOT_PATH_TOKEN_BUDGET tokens of them."""
    # A config file the full CLI validated, as most people have (compozy_client.configcheck).
    config = tmp_path / ".compozy" / "config.yaml"
    config.parent.mkdir()
    config.write_bytes(b"storage: memory\n")
    config.chmod(0o600)
    monkeypatch.setenv("COMPOZY_AGENT_SOCK", str(tmp_path / "agent.sock"))
    record_checked(str(config), config.read_bytes())
    compiled = compiled_by_token_path(tmp_path)
    # The modules the common path needs, each compiled from source here (so the count
    # is real), and no other module of the package.
    assert set(compiled) == {"__init__.py", "fasttoken.py", "paths.py", "configcheck.py",
                             "peercheck.py"}, compiled
    assert sum(compiled.values()) <= HOT_PATH_TOKEN_BUDGET, compiled
    # Without a config file there is nothing for configcheck to check.
    config.unlink()
    assert set(compiled_by_token_path(tmp_path)) == {
        "__init__.py", "fasttoken.py", "paths.py", "peercheck.py"}


def test_the_rare_turns_load_their_modules_only_when_taken(tmp_path: Path) -> None:
    with stand_in_agent(tmp_path, TOKEN_ANSWER):
        common = run_launcher(["auth", "token"], launcher_env(tmp_path), "-X", "importtime")
    assert common.returncode == 0 and common.stdout == "tok-123\n", common.stderr[-2000:]
    rare = {"compozy_client.fasttoken_rare", "compozy_client.autostart",
            "compozy_client.agentpaths", "compozy_client.getpeereid", "compozy_client.cli"}
    assert "compozy_client.fasttoken" in imported_modules(common.stderr)
    assert imported_modules(common.stderr) & rare == set()

    # Flags: parsed by the rare module, sent as the full CLI would send them.
    with stand_in_agent(tmp_path, TOKEN_ANSWER) as agent:
        flagged = run_launcher(["auth", "token", "--profile", "work", "--scope=a,b c",
                                "--min-valid", "60", "--audience", "https://api"],
                               launcher_env(tmp_path), "-X", "importtime")
    assert flagged.returncode == 0 and flagged.stdout == "tok-123\n", flagged.stderr[-2000:]
    assert "compozy_client.fasttoken_rare" in imported_modules(flagged.stderr)
    timeout = agent.request.pop("timeout")
    assert isinstance(timeout, float) and 0 < timeout <= 30
    assert agent.request == {"id": 1, "op": "token", "profile": "work", "scope": ["a", "b", "c"],
                             "min_valid": 60.0, "audience": "https://api"}


def test_an_error_answer_is_said_once_with_its_command(tmp_path: Path) -> None:
    refusal = (b'{"id":1,"ok":false,"error":{"code":"not_logged_in","message":'
               b'"profile \\"default\\" is not logged in","details":{"command":'
               b'"compozy login --profile default"}}}\n')
    with stand_in_agent(tmp_path, refusal) as agent:
        result = run_launcher(["auth", "token"], launcher_env(tmp_path))
    assert agent.request["profile"] == "default"
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ('error: profile "default" is not logged in\n'
                             "  run: compozy login --profile default\n")


def test_after_answering_the_token_path_skips_the_interpreters_teardown(
    tmp_path: Path,
) -> None:
    """Tearing the interpreter down (modules, objects, a last collection) costs about as
    much as the token path itself; the launcher ends the process once the answer is
    written (os._exit), so atexit handlers, which nothing on this path registers, do
    not run. The answer is complete all the same."""
    runner = ("import atexit, os, runpy, sys\n"
              "atexit.register(lambda: os.write(2, b'teardown ran\\n'))\n"
              "sys.argv = [sys.argv[1], 'auth', 'token']\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    with stand_in_agent(tmp_path, TOKEN_ANSWER):
        result = subprocess.run([sys.executable, "-c", runner, str(LAUNCHER)],
                                capture_output=True, text=True, env=launcher_env(tmp_path),
                                timeout=30)
    assert result.returncode == 0 and result.stdout == "tok-123\n", result.stderr[-2000:]
    assert "teardown ran" not in result.stderr
    # The full CLI's commands still end the ordinary way.
    fallback = subprocess.run([sys.executable, "-c", runner.replace("'token'", "'tokn'"),
                               str(LAUNCHER)], capture_output=True, text=True,
                              env=launcher_env(tmp_path), timeout=30)
    assert fallback.returncode == 2 and "teardown ran" in fallback.stderr


def test_ctrl_c_while_the_token_path_waits_exits_130_without_a_traceback(
    tmp_path: Path,
) -> None:
    with stand_in_agent(tmp_path, None) as agent:
        process = subprocess.Popen([sys.executable, str(LAUNCHER), "auth", "token"],
                                   env=launcher_env(tmp_path), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            assert agent.received.wait(20), "the launcher never sent its request"
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr and "error" not in stderr


@pytest.mark.parametrize("stdout", ["closed", "reader gone"])
def test_a_token_that_cannot_be_written_is_said_without_a_traceback(
    tmp_path: Path, stdout: str
) -> None:
    """`compozy auth token >&-` and `compozy auth token | head -c0`: exit 1, one line."""
    import os

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FLYZT_API_KEY": "key-never-shown",
           "COMPOZY_CONFIG": str(tmp_path / "none.yaml")}
    read, write = os.pipe()
    if stdout == "reader gone":
        os.close(read)
        target: int | None = write
    else:
        os.close(read)
        os.close(write)
        target = None
    try:
        result = subprocess.run(
            [sys.executable, str(LAUNCHER), "auth", "token"], env=env, timeout=60,
            stdout=target if target is not None else subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
            # "closed": the launcher starts with descriptor 1 closed.
            preexec_fn=None if target is not None else (lambda: os.close(1)))
    finally:
        if target is not None:
            os.close(target)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot write to standard output: "), result.stderr
    assert "Traceback" not in result.stderr and "key-never-shown" not in result.stderr
