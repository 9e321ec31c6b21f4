"""The storage edge: keyring probed under a deadline, memory said plainly, atomic 0600 state.

The keyring tests run against a real Secret Service (gnome-keyring on a
private D-Bus bus, ``support.keyring_fixture``); the hanging and missing
keyrings are selected the way a person would, with PYTHON_KEYRING_BACKEND.
Real time is spent only in the short deadlines under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import textwrap
import time
import traceback
from pathlib import Path

import anyio
import anyio.lowlevel
import keyring.backend
import keyring.errors
import msgspec
import pytest

from compozy_agent.store import (
    FileSecrets,
    KeyringSecrets,
    MemorySecrets,
    SecretStoreError,
    SecretStoreUnavailable,
    SessionStore,
    StateFileCorrupt,
    StoredSession,
    StoreError,
    open_store,
)
from support.keyring_fixture import HangingKeyring, KeyringEnv, SecretService

pytestmark = pytest.mark.anyio

SECRET = "rt-Zq8vN3kS0-very-secret"
SESSION = StoredSession(
    token_id="tok-1", profile="dev", kind="oidc", issuer="https://id.example.test",
    client_id="cli", subject="sub-4711", account="alice@example.test", scopes=["openid"],
    created_at=1_800_000_000.0,
)
#: The largest state file the store reads (store.MAX_FILE_BYTES).
MAX_STATE_BYTES = 16 * 1024 * 1024
#: Short deadlines under test; generous bounds for the time they may take.
DEADLINE = 0.3
SLACK = 2.0


@pytest.fixture(autouse=True)
def _never_the_persons_keyring(no_keyring: KeyringEnv) -> None:
    """Tests that want a keyring ask for one; the rest see none, never the person's own."""


def shown(exc: BaseException) -> str:
    """Everything an exception can show: str, repr, and the traceback with its chain."""
    return str(exc) + repr(exc) + "".join(traceback.format_exception(exc))


def state_path(directory: Path) -> Path:
    return directory / "sessions.json"


# --------------------------------------------------------------------------
# The real Secret Service.


@pytest.mark.real_keyring
async def test_probe_passes_and_secrets_round_trip_in_the_real_keyring(
    tmp_path: Path, real_keyring: SecretService
) -> None:
    store = await open_store("auto", str(tmp_path))
    assert store.info.backend == "keyring" and store.info.persistent is True
    assert "SecretService" in store.info.detail
    await store.put_secret("tok-1", "refresh_token", SECRET)
    assert await store.get_secret("tok-1", "refresh_token") == SECRET
    await store.put_secret("tok-1", "refresh_token", SECRET + "-rotated")  # replaces
    assert await store.get_secret("tok-1", "refresh_token") == SECRET + "-rotated"
    await store.delete_secret("tok-1", "refresh_token")
    assert await store.get_secret("tok-1", "refresh_token") is None
    await store.delete_secret("tok-1", "refresh_token")  # already gone: fine
    assert [i for i in real_keyring.items() if i[0].get("service") == "compozy-agent"] == []


@pytest.mark.real_keyring
async def test_metadata_never_in_the_keyring_and_secrets_never_in_the_state_file(
    tmp_path: Path, real_keyring: SecretService
) -> None:
    store = await open_store("keyring", str(tmp_path))
    await store.put_secret(SESSION.token_id, "refresh_token", SECRET)
    await store.save_metadata([SESSION])

    items = [i for i in real_keyring.items() if i[0].get("service") == "compozy-agent"]
    assert [(attributes["username"], secret) for attributes, _, secret in items] == [
        ("tok-1:refresh_token", SECRET.encode())]
    visible = json.dumps([[attributes, label] for attributes, label, _ in items])
    for value in ("dev", "id.example.test", "sub-4711", "alice", "openid", "cli"):
        assert value not in visible.replace("compozy-agent", "")

    text = state_path(tmp_path).read_text()
    assert SECRET not in text
    assert "alice@example.test" in text and "tok-1" in text
    assert store.load() == [SESSION]


@pytest.mark.real_keyring
async def test_missing_secret_restores_as_login_required(
    tmp_path: Path, real_keyring: SecretService
) -> None:
    from compozy_agent.http import ProviderClient
    from compozy_agent.manager import SessionManager

    store = await open_store("keyring", str(tmp_path))
    await store.save_metadata([SESSION])  # the keyring entry is gone (or never made it)
    assert await store.get_secret(SESSION.token_id, "refresh_token") is None
    provider = ProviderClient(now=time.time)
    try:
        manager = SessionManager(store, provider)
        await manager.restore()
        [info] = await manager.sessions(None)
    finally:
        await provider.aclose()
    assert (info.token_id, info.state, info.account) == ("tok-1", "login_required",
                                                         "alice@example.test")


@pytest.mark.real_keyring
async def test_a_locked_keyring_falls_back_to_memory_plainly(
    tmp_path: Path, locked_keyring: SecretService
) -> None:
    store = await open_store("auto", str(tmp_path), probe_timeout=SLACK)
    assert store.info.backend == "memory" and store.info.persistent is False
    assert store.info.detail.startswith("no working keyring: the keyring is locked")
    with pytest.raises(SecretStoreUnavailable, match="storage: keyring is set") as caught:
        await open_store("keyring", str(tmp_path), probe_timeout=SLACK)
    assert "locked" in str(caught.value)


@pytest.mark.real_keyring
async def test_a_keyring_locked_after_start_gives_a_clear_error(
    tmp_path: Path, real_keyring: SecretService
) -> None:
    store = await open_store("keyring", str(tmp_path))
    await store.put_secret("tok-1", "refresh_token", SECRET)
    real_keyring.lock()
    try:
        with pytest.raises(SecretStoreError, match="could not read tok-1:refresh_token: "
                           "the keyring is locked") as read:
            await store.get_secret("tok-1", "refresh_token")
        with pytest.raises(SecretStoreError, match="could not save") as write:
            await store.put_secret("tok-1", "refresh_token", SECRET + "-rotated")
    finally:
        real_keyring.unlock()
    assert SECRET not in shown(read.value) + shown(write.value)
    assert await store.get_secret("tok-1", "refresh_token") == SECRET  # works again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Secret Service is Linux's")
@pytest.mark.parametrize("bus_socket_exists", [False, True], ids=["no-bus", "bus-not-exported"])
async def test_no_session_bus_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bus_socket_exists: bool
) -> None:
    # As over SSH: no bus address, no keyring configured; keyring detects what it can.
    for name in ("DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no keyringrc.cfg
    if bus_socket_exists:
        (tmp_path / "bus").touch()
    store = await open_store("auto", str(tmp_path / "state"))
    assert store.info.backend == "memory" and store.info.persistent is False
    if bus_socket_exists:
        assert store.info.detail == (
            "no working keyring: Secret Service not available: DBUS_SESSION_BUS_ADDRESS is not "
            f"set, though a session bus is at {tmp_path}/bus (export "
            f"DBUS_SESSION_BUS_ADDRESS=unix:path={tmp_path}/bus)")
    else:
        assert store.info.detail == ("no working keyring: Secret Service not available: "
                                     "there is no D-Bus session bus (as over SSH)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Secret Service is Linux's")
async def test_an_unreachable_session_bus_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.SecretService.Keyring")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    store = await open_store("auto", str(tmp_path / "state"))
    assert store.info.backend == "memory"
    assert store.info.detail == ("no working keyring: Secret Service not available: cannot "
                                 "connect to the D-Bus session bus (No such file or directory)")


# --------------------------------------------------------------------------
# No keyring, a hanging keyring, failing keyrings.


async def test_no_keyring_means_memory_said_plainly(tmp_path: Path) -> None:
    store = await open_store("auto", str(tmp_path))
    assert store.info.backend == "memory" and store.info.persistent is False
    assert store.info.detail == ("no working keyring: PYTHON_KEYRING_BACKEND="
                                 "keyring.backends.fail.Keyring offers no keyring")
    await store.put_secret("tok-1", "refresh_token", SECRET)  # kept for the agent's life
    assert await store.get_secret("tok-1", "refresh_token") == SECRET
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no plaintext anywhere
    with pytest.raises(SecretStoreUnavailable, match="storage: keyring is set in the config"):
        await open_store("keyring", str(tmp_path))


async def test_memory_storage_is_said_plainly(tmp_path: Path) -> None:
    store = await open_store("memory", str(tmp_path))
    assert store.info.backend == "memory" and store.info.persistent is False
    assert store.info.detail == "storage: memory in the config"


async def test_a_hanging_keyring_is_probed_with_a_deadline(
    tmp_path: Path, hanging_keyring: KeyringEnv
) -> None:
    started = time.monotonic()
    store = await open_store("auto", str(tmp_path), probe_timeout=DEADLINE)
    assert DEADLINE <= time.monotonic() - started < DEADLINE + SLACK
    assert HangingKeyring.calls == 1
    assert store.info.backend == "memory" and store.info.persistent is False
    assert store.info.detail == ("no working keyring: the keyring did not answer within "
                                 "0.3 s (locked or hung?)")

    started = time.monotonic()
    with pytest.raises(SecretStoreUnavailable, match=r"did not answer within 0\.3 s"):
        await open_store("keyring", str(tmp_path), probe_timeout=DEADLINE)
    assert time.monotonic() - started < DEADLINE + SLACK


async def test_a_keyring_call_that_hangs_times_out_cleanly(
    tmp_path: Path, hanging_keyring: KeyringEnv
) -> None:
    store = SessionStore(str(tmp_path), KeyringSecrets(HangingKeyring()), call_timeout=DEADLINE)
    started = time.monotonic()
    with pytest.raises(SecretStoreError, match=r"could not save tok-1:refresh_token: "
                       r"no answer within 0\.3 s") as caught:
        await store.put_secret("tok-1", "refresh_token", SECRET)
    assert DEADLINE <= time.monotonic() - started < DEADLINE + SLACK
    assert SECRET not in shown(caught.value)
    # Later calls queue behind the stuck one (so writes keep their order) and time out too.
    with pytest.raises(SecretStoreError, match="could not read"):
        await store.get_secret("tok-1", "refresh_token")


async def test_a_hung_keyring_does_not_keep_the_agent_from_exiting(
    tmp_path: Path, hanging_keyring: KeyringEnv
) -> None:
    # anyio's worker threads are not daemons: a call stuck in one would block
    # interpreter exit. The store's calls run in a daemon thread instead.
    code = textwrap.dedent(f"""
        import anyio
        from compozy_agent.store import open_store
        store = anyio.run(lambda: open_store("auto", {str(tmp_path)!r}, probe_timeout=0.2))
        print(store.info.detail, flush=True)
    """)
    started = time.monotonic()
    with anyio.fail_after(30):
        result = await anyio.run_process([sys.executable, "-c", code], check=False,
                                         env={**os.environ, **hanging_keyring.env})
    assert result.returncode == 0, result.stderr.decode()
    assert b"did not answer within 0.2 s" in result.stdout
    assert time.monotonic() - started < 15  # an interpreter start, not HANG_LIMIT (60 s)


class RaisingKeyring(keyring.backend.KeyringBackend):
    """A keyring failing with an exception whose message quotes the secret."""

    priority = -1  # type: ignore[assignment]  # never chosen unless named

    def __init__(self, error: type[BaseException] | BaseException) -> None:
        super().__init__()
        self.error = error

    def _raise(self, secret: str) -> None:
        if isinstance(self.error, BaseException):
            raise self.error
        try:
            raise RuntimeError(f"inner failure on {secret}")
        except RuntimeError as inner:
            raise self.error(f"could not handle {secret}") from inner

    def get_password(self, service: str, username: str) -> str | None:
        self._raise(SECRET)
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        self._raise(password)

    def delete_password(self, service: str, username: str) -> None:
        self._raise(SECRET)


@pytest.mark.parametrize(
    ("error_name", "reason"),
    [
        ("keyring.errors.PasswordSetError", "the keyring refused to store the entry"),
        ("keyring.errors.KeyringLocked", "the keyring is locked and could not be unlocked"),
        ("secretstorage.exceptions.LockedException", "the keyring is locked"),
        ("secretstorage.exceptions.SecretServiceNotAvailableException",
         "Secret Service not available on the session bus"),
        ("builtins.ValueError", "unexpected ValueError"),
        ("builtins.UnicodeDecodeError", "the stored value is not valid text"),
    ],
    ids=["PasswordSetError", "KeyringLocked", "LockedException", "SecretServiceNotAvailable",
         "other", "not-utf8"],
)
async def test_keyring_errors_are_mapped_without_their_messages(
    tmp_path: Path, error_name: str, reason: str
) -> None:
    module, _, name = error_name.rpartition(".")
    error: type[BaseException] | BaseException = getattr(pytest.importorskip(module), name)
    if error is UnicodeDecodeError:  # as a secret that is not UTF-8 would fail
        error = UnicodeDecodeError("utf-8", SECRET.encode(), 0, 1, "invalid start byte")
    store = SessionStore(str(tmp_path), KeyringSecrets(RaisingKeyring(error)))
    with pytest.raises(SecretStoreError) as caught:
        await store.put_secret("tok-1", "refresh_token", SECRET)
    assert str(caught.value) == f"keyring store: could not save tok-1:refresh_token: {reason}"
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert SECRET not in shown(caught.value)


async def test_a_dbus_error_is_named(tmp_path: Path) -> None:
    jeepney = pytest.importorskip("jeepney")
    header = jeepney.low_level.Header(
        jeepney.low_level.Endianness.little, jeepney.MessageType.error, 0, 1, 0, 1,
        {jeepney.HeaderFields.error_name: "org.freedesktop.DBus.Error.ServiceUnknown"})
    error = jeepney.DBusErrorResponse(jeepney.low_level.Message(header, (SECRET,)))
    store = SessionStore(str(tmp_path), KeyringSecrets(RaisingKeyring(error)))
    with pytest.raises(SecretStoreError) as caught:
        await store.get_secret("tok-1", "refresh_token")
    assert str(caught.value).endswith("the Secret Service answered with a D-Bus error "
                                      "(org.freedesktop.DBus.Error.ServiceUnknown)")
    assert SECRET not in shown(caught.value)


async def test_reprs_show_no_secret(tmp_path: Path) -> None:
    store = await open_store("memory", str(tmp_path))
    await store.put_secret("tok-1", "refresh_token", SECRET)
    for value in (store, store.secrets, store.info):
        assert SECRET not in repr(value)


# --------------------------------------------------------------------------
# The state file.


async def test_state_file_is_0600_in_a_0700_dir_and_written_atomically(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = await open_store("memory", str(directory))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert store.load() == []
    old = os.umask(0o022)  # a usual umask: the file is still 0600
    try:
        await store.save_metadata([SESSION])
        store.save([SESSION, StoredSession(token_id="tok-2", profile="x", kind="api_key")])
    finally:
        os.umask(old)
    assert stat.S_IMODE(state_path(directory).stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == ["sessions.json"]  # no temp files left
    document = json.loads(state_path(directory).read_text())
    assert document["version"] == 1 and [s["token_id"] for s in document["sessions"]] == [
        "tok-1", "tok-2"]
    assert [s.token_id for s in store.load()] == ["tok-1", "tok-2"]

    state_path(directory).unlink()
    directory.rmdir()  # removed while the agent runs: made again, 0700
    store.save([SESSION])
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and store.load() == [SESSION]


async def test_a_failed_write_leaves_the_good_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store("memory", str(tmp_path))
    store.save([SESSION])
    good = state_path(tmp_path).read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StoreError, match=r"cannot write .*sessions\.json: No space left"):
        store.save([])
    monkeypatch.undo()
    assert state_path(tmp_path).read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["sessions.json"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{half a file", "is corrupt; move it aside"),
        (b'{"version": 2, "sessions": []}', "has version 2, which this agent"),
        (b'{"version": 1, "sessions": [{"profile": "no token id"}]}', "is corrupt"),
    ],
    ids=["truncated", "newer", "invalid"],
)
async def test_corrupt_state_file_is_reported_and_never_overwritten(
    tmp_path: Path, content: bytes, says: str
) -> None:
    state_path(tmp_path).write_bytes(content)
    store = await open_store("memory", str(tmp_path))
    with pytest.raises(StateFileCorrupt, match=says) as caught:
        store.load()
    assert str(state_path(tmp_path)) in str(caught.value)
    with pytest.raises(StateFileCorrupt, match="not overwriting the unreadable state file"):
        store.save([SESSION])
    with pytest.raises(StateFileCorrupt, match="not overwriting"):
        await store.save_metadata([SESSION])
    assert state_path(tmp_path).read_bytes() == content
    state_path(tmp_path).rename(tmp_path / "sessions.json.bad")  # moved aside: saving works
    store.save([SESSION])
    assert store.load() == [SESSION]


def _plant(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "endless":
        path.symlink_to("/dev/zero")
    else:  # a link to a file of ours, which an atomic write would replace anyway
        (path.parent / "elsewhere.json").write_text('{"version": 1, "sessions": []}')
        path.symlink_to(path.parent / "elsewhere.json")


def _release_a_blocked_reader(path: Path) -> None:
    """Open a planted FIFO for writing, so a reader blocked on opening it (the code before
    the fix) returns and its thread ends."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(("kind", "says"), [
    ("fifo", "it is not a regular file"),
    ("endless", "it is a symbolic link"),
    ("link", "it is a symbolic link"),
])
async def test_a_state_file_that_is_no_file_is_refused_at_once(
    tmp_path: Path, kind: str, says: str
) -> None:
    """A FIFO planted as sessions.json hung the agent's start; a link to /dev/zero read
    until memory ran out. Both are refused at once, named, and never overwritten."""
    store = await open_store("memory", str(tmp_path))
    _plant(state_path(tmp_path), kind)
    try:
        with anyio.fail_after(5):
            with pytest.raises(StateFileCorrupt, match=f"cannot read {state_path(tmp_path)}: "
                               f"{says}; fix its permissions or move it aside"):
                await anyio.to_thread.run_sync(store.load, abandon_on_cancel=True)
    finally:
        _release_a_blocked_reader(state_path(tmp_path))
    with pytest.raises(StateFileCorrupt, match="not overwriting"):
        store.save([SESSION])
    assert state_path(tmp_path).is_symlink() or stat.S_ISFIFO(
        state_path(tmp_path).lstat().st_mode)


@pytest.mark.parametrize(("kind", "says"), [
    ("fifo", "it is not a regular file"),
    ("endless", "it is a symbolic link"),
])
async def test_a_secrets_file_that_is_no_file_is_refused_at_once(
    tmp_path: Path, kind: str, says: str
) -> None:
    store = await open_store("file", str(tmp_path))
    path = tmp_path / "secrets.json"
    _plant(path, kind)
    try:
        with anyio.fail_after(5):
            with pytest.raises(SecretStoreError, match=f"cannot read {path}: {says}"):
                await store.get_secret("tok-1", "api_key")
    finally:
        _release_a_blocked_reader(path)


async def test_a_state_file_of_another_uid_or_too_large_is_refused(tmp_path: Path) -> None:
    store = await open_store("memory", str(tmp_path))
    store.save([SESSION])
    os.chown(state_path(tmp_path), 65534, 65534)
    with pytest.raises(StateFileCorrupt, match="it belongs to uid 65534"):
        store.load()
    state_path(tmp_path).unlink()
    with state_path(tmp_path).open("wb") as file:
        file.truncate(MAX_STATE_BYTES + 1)
    with pytest.raises(StateFileCorrupt, match=f"it is larger than {MAX_STATE_BYTES} bytes"):
        store.load()


async def test_unknown_fields_are_tolerated(tmp_path: Path) -> None:
    document = {"version": 1, "written_by": "a newer agent",
                "sessions": [{**msgspec.to_builtins(SESSION), "colour": "blue"}]}
    state_path(tmp_path).write_text(json.dumps(document))
    store = await open_store("memory", str(tmp_path))
    assert store.load() == [SESSION]


async def test_forget_removes_secrets_and_metadata(tmp_path: Path) -> None:
    store = await open_store("memory", str(tmp_path))
    other = StoredSession(token_id="tok-2", profile="x", kind="api_key")
    await store.put_secret("tok-1", "refresh_token", SECRET)
    await store.put_secret("tok-2", "api_key", "key-2")
    await store.save_metadata([SESSION, other])
    await store.forget("tok-1")
    assert store.load() == [other]
    assert await store.get_secret("tok-1", "refresh_token") is None
    assert await store.get_secret("tok-2", "api_key") == "key-2"


async def test_state_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()
    os.chmod(target, 0o777)
    with pytest.raises(StoreError, match="writable by others; run: chmod 700"):
        await open_store("memory", str(target))


async def test_a_state_directory_inside_one_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename "state" away and put their own in its place
    with pytest.raises(StoreError, match=f"inside {shared}, which anyone may write"):
        await open_store("memory", str(shared / "state"))
    os.chown(shared, 0, 65534)
    shared.chmod(0o770)  # a group with someone else in it
    with pytest.raises(StoreError, match=f"inside {shared}, which group 65534 may write"):
        await open_store("memory", str(shared / "state" / "deeper"))
    # Reached through a symbolic link: the directories it resolves into are checked too.
    (shared / "ours").mkdir(mode=0o700)
    private = tmp_path / "private"
    private.mkdir()
    (private / "link").symlink_to(shared / "ours")
    with pytest.raises(StoreError, match=f"inside {shared}, which group 65534 may write"):
        await open_store("memory", str(private / "link" / "state"))
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename what is not theirs
    store = await open_store("memory", str(shared / "state"))
    store.save([SESSION])
    assert store.load() == [SESSION]


# --------------------------------------------------------------------------
# The opt-in plaintext file.


async def test_file_storage_only_on_opt_in_and_0600(tmp_path: Path) -> None:
    auto = await open_store("auto", str(tmp_path / "auto"))  # no keyring: memory, no file
    await auto.put_secret("tok-1", "api_key", SECRET)
    assert not (tmp_path / "auto" / "secrets.json").exists()

    store = await open_store("file", str(tmp_path / "state"))
    assert store.info.backend == "file" and store.info.persistent is True
    assert "storage: file in the config" in store.info.detail
    await store.put_secret("tok-1", "api_key", SECRET)
    secrets_file = tmp_path / "state" / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert await store.get_secret("tok-1", "api_key") == SECRET
    await store.delete_secret("tok-1", "api_key")
    assert await store.get_secret("tok-1", "api_key") is None
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["secrets.json"]


async def test_a_bad_secrets_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    store = SessionStore(str(tmp_path), FileSecrets(str(path)))
    path.write_text("[not an object")
    os.chmod(path, 0o600)
    with pytest.raises(SecretStoreError, match=r"secrets\.json is corrupt; move it aside"):
        await store.put_secret("tok-1", "api_key", SECRET)
    assert path.read_text() == "[not an object"

    path.write_text(json.dumps({"tok-1:api_key": SECRET}))
    os.chmod(path, 0o644)
    with pytest.raises(SecretStoreError, match="may be read by others; run: chmod 600") as caught:
        await store.get_secret("tok-1", "api_key")
    assert SECRET not in shown(caught.value)


# --------------------------------------------------------------------------
# Order of calls.


class RecordingSecrets(MemorySecrets):
    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def put(self, key: str, value: str) -> None:
        self.order.append(value)
        super().put(key, value)


async def test_calls_run_in_the_order_they_were_made(tmp_path: Path) -> None:
    secrets = RecordingSecrets()
    store = SessionStore(str(tmp_path), secrets)
    values = [f"rt-{n}" for n in range(20)]
    async with anyio.create_task_group() as group:
        for value in values:
            group.start_soon(store.put_secret, "tok-1", "refresh_token", value)
            await anyio.lowlevel.checkpoint()
    assert secrets.order == values
    assert await store.get_secret("tok-1", "refresh_token") == "rt-19"


async def test_a_write_interrupted_by_a_crash_leaves_no_secret_behind(tmp_path: Path) -> None:
    """SIGKILL between creating and renaming the temp file of an atomic write leaves it
    (found by the kill loop's canary check); the next agent removes it before serving."""
    from compozy_agent.http import ProviderClient
    from compozy_agent.manager import SessionManager

    store = await open_store("file", str(tmp_path))
    await store.save_metadata([SESSION])
    await store.put_secret(SESSION.token_id, "refresh_token", SECRET)
    leftovers = [tmp_path / ".secrets.json.0123456789ab.tmp",
                 tmp_path / ".sessions.json.ba9876543210.tmp"]
    for path in leftovers:
        path.write_text(json.dumps({"tok-1:refresh_token": "a-rotated-token"}))
    unrelated = tmp_path / ".other.tmp"
    unrelated.write_text("not ours")
    provider = ProviderClient(now=time.time)
    try:
        await SessionManager(store, provider).restore()
    finally:
        await provider.aclose()
    assert not any(path.exists() for path in leftovers)
    assert unrelated.exists()
    assert store.load() == [SESSION]
    assert await store.get_secret(SESSION.token_id, "refresh_token") == SECRET
