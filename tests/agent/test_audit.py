"""The audit log: who connected (bound at connect), no token, private files, floods contained."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from compozy_agent import audit
from compozy_agent.audit import AuditLog, ProcessInfo, capture, entry_for, process_info
from compozy_agent.peer import Peer, peer_of
from compozy_client import protocol as p
from support.clock import FakeClock

TOKEN = "at-canary-5d1e0c"
LINUX = sys.platform.startswith("linux")
linux_only = pytest.mark.skipif(not LINUX, reason="reads /proc (Linux)")


def _own_start_time() -> int:
    with open("/proc/self/stat", "rb") as file:
        raw = file.read()
    return int(raw[raw.rfind(b")") + 2:].split()[19])


@linux_only
def test_process_info_is_what_the_kernel_says() -> None:
    info = process_info(os.getpid())
    assert info.exe == os.path.realpath(sys.executable)
    with open("/proc/self/cmdline", "rb") as file:
        expected = [a.decode() for a in file.read().split(b"\0")[:-1]]
    assert info.cmdline == audit._cap(expected)
    assert info.start_time == _own_start_time() and not info.gone
    assert process_info(None) == ProcessInfo()
    # No such process: gone, and nothing invented.
    assert process_info(2**22 + 12345) == ProcessInfo(gone=True)


def test_long_command_lines_are_capped() -> None:
    capped = audit._cap(["a" * 700, "b" * 700, "c"])
    assert capped == ["a" * 700, "b" * (audit.MAX_CMDLINE_CHARS - 700) + "…", "…"]


def _record_one(log: AuditLog, request: p.Token, now: float, *, pid: int = 4242,
                error_code: str | None = None, result: p.TokenResult | None = None) -> None:
    peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=pid)
    process = ProcessInfo(exe="/usr/bin/tool", cmdline=["tool", "deploy"], start_time=pid * 10)
    log.record(entry_for(request, peer, process, "full", now, result=result,
                         error_code=error_code))


def test_entries_name_the_caller_and_never_hold_the_token(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path))
    request = p.Token(id=1, profile="prod", scope=["compozy:read"], audience="https://api",
                      rejected_token=TOKEN)
    result = p.TokenResult(access_token=TOKEN, token_id="t1", profile="prod")
    _record_one(log, request, 1000.0, result=result)
    _record_one(log, p.Token(id=2), 1001.0, error_code="not_logged_in")
    [issued, refused] = log.recent(10)
    assert (issued.profile, issued.outcome, issued.token_id, issued.pid, issued.exe) == (
        "prod", "issued", "t1", 4242, "/usr/bin/tool")
    assert issued.self_reported_argv == ["tool", "deploy"] and issued.cmdline is None
    assert issued.start_time == 42420
    assert issued.scope == ["compozy:read"] and issued.audience == "https://api"
    assert (refused.outcome, refused.socket_kind, refused.profile) == (
        "not_logged_in", "full", "default")
    issued_text = (tmp_path / audit.AUDIT_FILE).read_text()
    failed_text = (tmp_path / audit.FAILED_FILE).read_text()
    for text in (issued_text, failed_text):
        assert TOKEN not in text and len(text.splitlines()) == 1
    assert TOKEN not in repr(log.recent(10))
    assert json.loads(issued_text)["outcome"] == "issued"
    assert json.loads(failed_text)["outcome"] == "not_logged_in"
    for name in (audit.AUDIT_FILE, audit.FAILED_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert [e.outcome for e in log.recent(10, profile="prod")] == ["issued"]
    assert log.recent(10, outcome="failed") == [refused]
    assert log.recent(10, outcome="issued") == [issued]
    assert log.recent(1) == [refused] and log.recent(0) == []


def test_the_files_rotate_through_several_generations_and_memory_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "MAX_FILE_BYTES", 2000)
    log = AuditLog(str(tmp_path))
    for n in range(audit.MEMORY_ENTRIES + 50):  # a process each: nothing collapses
        _record_one(log, p.Token(id=n), float(n), pid=n + 1, error_code="locked")
    assert len(log.recent(10_000)) == audit.MEMORY_ENTRIES
    assert log.recent(1)[0].time == audit.MEMORY_ENTRIES + 49
    path = tmp_path / audit.FAILED_FILE
    generations = [path, *(Path(f"{path}.{n}") for n in range(1, audit.ROTATIONS + 1))]
    assert all(g.stat().st_size <= 2000 for g in generations)
    assert not Path(f"{path}.{audit.ROTATIONS + 1}").exists()
    assert all(stat.S_IMODE(g.stat().st_mode) == 0o600 for g in generations)


def test_a_failing_file_keeps_entries_in_memory_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(str(tmp_path / "missing-dir"))
    for n in range(3):
        _record_one(log, p.Token(id=n), 1.0, pid=n + 1, error_code="x")
    assert len(log.recent(10)) == 3
    assert len([r for r in caplog.records if "audit log: cannot write" in r.message]) == 1
    assert any("entries are kept in memory only" in w for w in log.warnings())


def test_repeated_failures_collapse_into_one_counted_entry(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path))
    for n in range(2500):
        _record_one(log, p.Token(id=n, profile="prod"), 1000.0 + n / 1000, error_code="locked")
    first, repeats = log.recent(1000)
    assert (first.count, repeats.count) == (1, 2499)
    assert (repeats.time, repeats.last_time) == (1000.001, 1000.0 + 2499 / 1000)
    path = tmp_path / audit.FAILED_FILE
    assert len(path.read_text().splitlines()) == 1  # the first, at once
    log.flush(1000.0 + audit.COLLAPSE_WINDOW)  # the window ends: the count is written
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("count", 1) for line in lines] == [1, 2499]
    # After the window, the same failure is written at once again.
    _record_one(log, p.Token(id=0, profile="prod"), 1100.0, error_code="locked")
    assert len(path.read_text().splitlines()) == 3


def test_a_flood_of_varied_failures_cannot_push_an_issued_entry_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "MAX_FILE_BYTES", 4000)
    log = AuditLog(str(tmp_path))
    result = p.TokenResult(access_token=TOKEN, token_id="t1", profile="prod")
    _record_one(log, p.Token(id=0, profile="prod"), 999.0, result=result)
    # One process, 2,500 failures that all differ; then 2,500 processes failing once each.
    for n in range(2500):
        _record_one(log, p.Token(id=n, profile=f"p{n}-" + "x" * 200), 1000.0,
                    error_code="not_logged_in")
    mine = log.recent(1000)
    assert [e.outcome for e in mine] == (
        ["issued"] + ["not_logged_in"] * audit.FAILURES_PER_CALLER + [audit.MORE_FAILURES])
    assert mine[-1].count == 2500 - audit.FAILURES_PER_CALLER and mine[-1].profile == "*"
    for n in range(2500):
        _record_one(log, p.Token(id=n, profile=f"q{n}-" + "x" * 200), 1001.0, pid=10_000 + n,
                    error_code="not_logged_in")
    assert [e.token_id for e in log.recent(1000, outcome="issued")] == ["t1"]
    assert json.loads((tmp_path / audit.AUDIT_FILE).read_text())["token_id"] == "t1"
    assert Path(f"{tmp_path / audit.FAILED_FILE}.{audit.ROTATIONS}").exists()  # it did rotate


@pytest.mark.anyio
async def test_counts_reach_the_file_when_the_window_ends_without_new_requests(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    log = AuditLog(str(tmp_path))
    path = tmp_path / audit.FAILED_FILE
    async with anyio.create_task_group() as group:
        group.start_soon(log.run, clock)
        for n in range(3):
            _record_one(log, p.Token(id=n), clock.now(), error_code="locked")
        await clock.wait_for_sleepers()
        clock.advance(audit.COLLAPSE_WINDOW)
        with anyio.fail_after(5):
            while len(path.read_text().splitlines()) < 2:
                await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    assert [json.loads(line).get("count", 1) for line in path.read_text().splitlines()] == [1, 2]


def test_a_planted_symbolic_link_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / audit.AUDIT_FILE).symlink_to(victim)
    log = AuditLog(str(state))
    log.open()
    _record_one(log, p.Token(id=1), 1.0, result=p.TokenResult(access_token=TOKEN))
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    [warning] = log.warnings()
    assert "is a symbolic link; refusing to follow it" in warning
    assert log.recent(10)[0].outcome == "issued"  # still in memory


def test_an_existing_readable_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / audit.AUDIT_FILE
    path.write_text("")
    path.chmod(0o644)
    AuditLog(str(tmp_path)).open()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another uid")
def test_a_file_of_another_uid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / audit.FAILED_FILE
    path.write_text("theirs\n")
    os.chown(path, 65534, 65534)
    log = AuditLog(str(tmp_path))
    _record_one(log, p.Token(id=1), 1.0, error_code="locked")
    assert path.read_text() == "theirs\n"
    assert any("belongs to uid 65534" in w for w in log.warnings())


# --------------------------------------------------------------------------
# Who connected: bound at connect.


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    server.settimeout(30)
    yield server, path
    server.close()


@contextlib.contextmanager
def _child(path: str, then: str) -> Iterator[subprocess.Popen[str]]:
    """A Python process that connects to ``path``, says "connected", then runs ``then``."""
    code = ("import os, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "print('connected', flush=True)\n" + then)
    with subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        try:
            yield child
        finally:
            child.kill()


@linux_only
def test_capture_reads_the_connecting_process_and_sees_it_exec_and_exit(
    listener: tuple[socket.socket, str],
) -> None:
    server, path = listener
    with _child(path, "sys.stdin.readline()\n"
                "os.execv('/bin/sh', ['sh', '-c', 'echo execd; read line'])\n") as child:
        assert child.stdout is not None and child.stdin is not None
        conn, _ = server.accept()
        with conn:
            assert child.stdout.readline() == "connected\n"
            peer = peer_of(conn)
            connected = capture(conn, peer.pid)
            info = connected.info
            assert peer.pid == child.pid
            assert info.exe == os.path.realpath(sys.executable)
            assert info.cmdline is not None and info.cmdline[0] == sys.executable
            assert info.start_time is not None and not info.gone
            assert connected.at_request() == ("same", None)

            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "execd\n"
            assert connected.at_request() == ("exec", os.path.realpath("/bin/sh"))

            child.stdin.close()
            child.wait(30)  # exited and reaped: the pid is free for another process
            assert connected.at_request() == ("gone", None)
            assert connected.info == info  # what connected is kept
            connected.close()


@linux_only
@pytest.mark.parametrize("pidfd", [True, False], ids=["SO_PEERPIDFD", "proc-only"])
def test_a_connector_that_exited_before_it_was_looked_at_is_gone(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    if not pidfd:
        monkeypatch.setattr(audit, "SO_PEERPIDFD", 0x7FFF)  # no such option: the fallback
    server, path = listener
    with _child(path, "") as child:
        conn, _ = server.accept()
        child.wait(30)  # exited and reaped: its pid is free for anyone
    with conn:
        peer = peer_of(conn)
        assert peer.pid == child.pid
        gone = capture(conn, peer.pid)
        assert gone.info == ProcessInfo(gone=True)
        assert gone.at_request() == ("gone", None)


@linux_only
def test_the_pidfd_check_discards_what_was_read_if_the_connector_died_meanwhile(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening /proc/<pid> races with exit and pid reuse; the pidfd says who it was."""
    server, path = listener
    with _child(path, "sys.stdin.readline()\n") as child:
        assert child.stdin is not None and child.stdout is not None
        conn, _ = server.accept()
        try:
            os.close(conn.getsockopt(socket.SOL_SOCKET, audit.SO_PEERPIDFD))
        except OSError:
            conn.close()
            pytest.skip("this kernel has no SO_PEERPIDFD")
        read = audit._linux_process

        def read_then_die(procfd: int) -> ProcessInfo:
            info = read(procfd)
            assert child.stdin is not None and info.exe is not None
            child.stdin.close()
            child.wait(30)  # between the read and the check, the connector goes
            return info

        monkeypatch.setattr(audit, "_linux_process", read_then_die)
        with conn:
            assert child.stdout.readline() == "connected\n"
            assert capture(conn, child.pid).info == ProcessInfo(gone=True)


_REUSE_A_PID = """
import json, os
from compozy_agent.audit import _open_process, process_info
release, hold = os.pipe()
first = os.fork()
if first == 0:
    os.read(release, 1)
    os._exit(0)
connected = _open_process(first)
before = connected.at_request()
os.write(hold, b"x")
os.waitpid(first, 0)
with open("/proc/sys/kernel/ns_last_pid", "w") as file:
    file.write(str(first - 1))  # the next fork gets the first one's pid
execd, exec_done = os.pipe2(os.O_CLOEXEC)
second = os.fork()
if second == 0:
    os.execv("/bin/sleep", ["sleep", "60"])
os.close(exec_done)
os.read(execd, 1)  # EOF: the second process has exec'd
print(json.dumps({"first": first, "second": second, "before": before,
                  "after": connected.at_request(), "kept": connected.info.exe,
                  "pid_now_runs": process_info(second).exe}))
os.kill(second, 9)
os.waitpid(second, 0)
"""


@linux_only
@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a pid namespace")
def test_a_reused_pid_is_never_attributed_to_the_new_process() -> None:
    # In a pid namespace of its own, a process exits and the next fork is given its pid.
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                           _REUSE_A_PID], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["second"] == seen["first"]  # the pid was reused
    assert seen["pid_now_runs"] == os.path.realpath("/bin/sleep")
    assert seen["before"] == ["same", None]
    assert seen["after"] == ["gone", None]  # not "exec", not the sleeper
    assert seen["kept"] == os.path.realpath(sys.executable)


@linux_only
@pytest.mark.parametrize("failing", ["/proc/", "stat"], ids=["the-process", "its-stat"])
def test_running_out_of_descriptors_is_unknown_not_gone(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    real_open = os.open

    def out_of_descriptors(path: str, *args: object, **kwargs: object) -> int:
        if path.startswith(failing):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", out_of_descriptors)
    info = process_info(os.getpid())
    monkeypatch.undo()
    assert not info.gone and info.start_time is None
    assert info.exe == (None if failing == "/proc/" else os.path.realpath(sys.executable))
