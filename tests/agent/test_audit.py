"""The audit log: kernel-reported process facts, no token, a private rotating file."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from compozy_agent import audit
from compozy_agent.audit import AuditLog, ProcessInfo, entry_for, process_info
from compozy_agent.peer import Peer
from compozy_client import protocol as p

TOKEN = "at-canary-5d1e0c"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_process_info_is_what_the_kernel_says() -> None:
    info = process_info(os.getpid())
    assert info.exe == os.path.realpath(sys.executable)
    with open("/proc/self/cmdline", "rb") as file:
        expected = [a.decode() for a in file.read().split(b"\0")[:-1]]
    assert info.cmdline == audit._cap(expected)
    assert process_info(None) == ProcessInfo()
    assert process_info(2**22 + 12345) == ProcessInfo()  # no such process: nothing invented


def test_long_command_lines_are_capped() -> None:
    capped = audit._cap(["a" * 700, "b" * 700, "c"])
    assert capped == ["a" * 700, "b" * (audit.MAX_CMDLINE_CHARS - 700) + "…", "…"]


def test_entries_name_the_caller_and_never_hold_the_token(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"))
    request = p.Token(id=1, profile="prod", scope=["compozy:read"], audience="https://api",
                      rejected_token=TOKEN)
    result = p.TokenResult(access_token=TOKEN, token_id="t1", profile="prod")
    peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=4242)
    process = ProcessInfo(exe="/usr/bin/tool", cmdline=["tool", "deploy"])
    log.record(entry_for(request, peer, process, "full", 1000.0, result=result))
    log.record(entry_for(p.Token(id=2), peer, process, "forward", 1001.0,
                         error_code="not_logged_in"))
    [issued, refused] = log.recent(10)
    assert (issued.profile, issued.outcome, issued.token_id, issued.pid, issued.exe) == (
        "prod", "issued", "t1", 4242, "/usr/bin/tool")
    assert issued.scope == ["compozy:read"] and issued.audience == "https://api"
    assert (refused.outcome, refused.socket_kind, refused.profile) == (
        "not_logged_in", "forward", "default")
    text = (tmp_path / "audit.log").read_text()
    assert TOKEN not in text and TOKEN not in repr(log.recent(10))
    assert len(text.splitlines()) == 2
    assert stat.S_IMODE(os.stat(tmp_path / "audit.log").st_mode) == 0o600
    assert [e.outcome for e in log.recent(10, profile="prod")] == ["issued"]
    assert log.recent(1) == [refused] and log.recent(0) == []


def test_the_file_rotates_and_memory_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "MAX_FILE_BYTES", 2000)
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    peer = Peer(uid=0, gid=0, pid=1)
    for n in range(audit.MEMORY_ENTRIES + 50):
        log.record(entry_for(p.Token(id=n), peer, ProcessInfo(), "full", float(n),
                             error_code="locked"))
    assert len(log.recent(10_000)) == audit.MEMORY_ENTRIES
    assert log.recent(1)[0].time == audit.MEMORY_ENTRIES + 49
    assert path.stat().st_size <= 2000 and (tmp_path / "audit.log.1").stat().st_size <= 2000


def test_a_failing_file_keeps_entries_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(str(tmp_path / "missing-dir" / "audit.log"))
    peer = Peer(uid=0, gid=0, pid=1)
    for n in range(3):
        log.record(entry_for(p.Token(id=n), peer, ProcessInfo(), "full", 1.0, error_code="x"))
    assert len(log.recent(10)) == 3
    assert len([r for r in caplog.records if "cannot write the audit log" in r.message]) == 1
