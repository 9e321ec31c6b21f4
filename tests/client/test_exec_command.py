"""`compozy exec`'s parts in-process: the token file, --env names, the handler-based
supervisor used where ``sigtimedwait`` is missing (macOS). The command with a real
agent is in tests/integration/test_exec.py."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from compozy_client.commands import exec as exec_command
from compozy_client.errors import UsageError

#: Sends its parent (the supervisor) a signal, and reports the one passed back to it.
SIGNALS_ITS_PARENT = r"""
import os, signal, sys
def report(signum, frame):
    sys.exit(40 + signum)
signal.signal(signal.SIGTERM, report)
os.kill(os.getppid(), signal.SIGTERM)
while True:
    signal.pause()
"""


def test_the_token_file_is_private_replaced_whole_and_removed_only_if_ours(
        tmp_path: Path) -> None:
    path = tmp_path / "token"
    token_file = exec_command.TokenFile(str(path))
    token_file.create("first")
    assert path.read_text() == "first\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    token_file.write("second")
    assert path.read_text() == "second\n" and path.stat().st_ino != inode  # a rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]  # no temporary left
    token_file.remove()
    assert not path.exists()

    # A file someone else put at the path since is not ours to remove.
    token_file.create("third")
    path.unlink()
    path.write_text("not ours\n")  # on tmpfs, often with the inode ours had
    token_file.remove()
    assert path.read_text() == "not ours\n"


def test_a_token_file_path_that_exists_or_has_no_directory_is_refused(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    with pytest.raises(UsageError, match="already exists"):
        exec_command.TokenFile(str(existing)).create("token")
    assert existing.read_text() == "keep me\n"
    with pytest.raises(UsageError, match="directory does not exist"):
        exec_command.TokenFile(str(tmp_path / "missing" / "token")).create("token")


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "Ä", "COMPOZY_AGENT_SOCK",
                                  "COMPOZY_PROFILE", "COMPOZY_AGENT_AUTOSTART"])
def test_an_env_name_that_is_no_variable_or_is_ours_is_refused(name: str) -> None:
    with pytest.raises(UsageError):
        exec_command._check_env_name(name)


def test_env_names_that_are_variables_are_taken() -> None:
    for name in ("API_TOKEN", "_x", "token2"):
        exec_command._check_env_name(name)


def test_without_sigtimedwait_signals_are_still_passed_on(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The macOS path (handlers), run here by hiding sigtimedwait."""
    monkeypatch.delattr(signal, "sigtimedwait")
    before = signal.getsignal(signal.SIGTERM)
    code = exec_command.supervise([sys.executable, "-c", SIGNALS_ITS_PARENT],
                                  dict(os.environ), None)
    assert code == 40 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # our handlers are undone


def test_without_sigtimedwait_exit_codes_are_the_commands(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """(The sigtimedwait path is run in its own process, as the CLI, in
    tests/integration/test_exec.py: it blocks signals, which a test process with
    threads would take elsewhere.)"""
    monkeypatch.delattr(signal, "sigtimedwait")
    env = dict(os.environ)
    assert exec_command.supervise(["sh", "-c", "exit 5"], env, None) == 5
    assert exec_command.supervise(["sh", "-c", "kill -KILL $$"], env, None) == 137
    assert exec_command.supervise(["no-such-command-anywhere"], env, None) == 127
