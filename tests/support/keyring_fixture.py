"""Keyrings for tests: a real Secret Service, none at all, and one that hangs.

Fixtures:

* ``secret_service`` (session): gnome-keyring-daemon's Secret Service on a
  private D-Bus session bus (``dbus-run-session``), with its own temporary
  HOME, XDG_DATA_HOME and XDG_RUNTIME_DIR, its login collection unlocked with
  a test password. The person's own keyring is never touched. Give
  ``secret_service.env`` to an agent subprocess; inspect the keyring with
  ``items()``. Torn down (daemon killed, bus ended, HOME removed) at the end.
  Missing binaries fail the run under ``CI=true`` and skip it elsewhere,
  naming the Debian packages (``support.real_parts``). Mark tests
  ``real_keyring``.
* ``real_keyring``: points this process's ``keyring`` package at
  ``secret_service`` for one test, and removes every ``compozy-agent`` entry
  afterwards.
* ``locked_keyring``: ``real_keyring`` with the login collection locked. No
  prompter runs here, so unlocking fails (``KeyringLocked``); it is unlocked
  again with the test password afterwards.
* ``no_keyring``: ``keyring.backends.fail.Keyring``, as where nothing works.
* ``hanging_keyring``: :class:`HangingKeyring`, whose every call blocks until
  the test ends, like a locked Secret Service waiting on a prompt nobody sees.

Each of the last four returns a :class:`KeyringEnv` whose ``env`` is also the
environment to give a subprocess. In-process, they set ``os.environ`` and
reset ``keyring``'s cached backend, so it is detected again, from that
environment, on first use (by the store's probe, under its deadline).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keyring.backend
import keyring.core
import keyring.errors
import pytest

from support.real_parts import require_tools

PACKAGES = "gnome-keyring dbus-daemon dbus-user-session"
TEST_PASSWORD = "compozy-test-keyring"
SECRETS_BUS_NAME = "org.freedesktop.secrets"
LOGIN_COLLECTION = "/org/freedesktop/secrets/collection/login"
START_TIMEOUT = 15.0
#: The longest a HangingKeyring call blocks in a process whose test cannot release it.
HANG_LIMIT = 60.0
TESTS_DIR = str(Path(__file__).resolve().parent.parent)

# Runs inside dbus-run-session: start the keyring in the foreground (so its pid
# is known), report the pid and the bus, then live as long as our pipe to it.
# When pytest ends, however it ends, `cat` sees EOF, dbus-run-session ends the
# bus, and a keyring daemon still running loses its bus and exits.
_KEEPER = """\
printf %s "$COMPOZY_TEST_KEYRING_PASSWORD" \\
  | gnome-keyring-daemon --foreground --unlock --components=secrets >&2 &
echo "$!"
echo "$DBUS_SESSION_BUS_ADDRESS"
exec cat
"""


@dataclass
class SecretService:
    """A running test Secret Service; ``env`` is what a process needs to use it."""

    address: str
    home: str
    daemon_pid: int

    @property
    def env(self) -> dict[str, str]:
        return {
            "DBUS_SESSION_BUS_ADDRESS": self.address,
            "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
        }

    @contextlib.contextmanager
    def login_collection(self) -> Iterator[Any]:
        """The login collection (a ``secretstorage.Collection``) over a fresh connection."""
        import secretstorage
        from jeepney.io.blocking import open_dbus_connection

        connection = open_dbus_connection(self.address)
        try:
            yield secretstorage.Collection(connection, LOGIN_COLLECTION)
        finally:
            connection.close()

    def items(self) -> list[tuple[dict[str, str], str, bytes]]:
        """Every item of the login collection: (attributes, label, secret)."""
        with self.login_collection() as collection:
            return [(item.get_attributes(), item.get_label(), item.get_secret())
                    for item in collection.get_all_items()]

    def clear(self, service: str = "compozy-agent") -> None:
        """Delete every item stored for ``service``."""
        with self.login_collection() as collection:
            for item in collection.search_items({"service": service}):
                item.delete()

    def is_locked(self) -> bool:
        with self.login_collection() as collection:
            return bool(collection.is_locked())

    def lock(self) -> None:
        with self.login_collection() as collection:
            collection.lock()

    def unlock(self) -> None:
        """Unlock with the test password, as gnome-keyring's PAM module would."""
        from secretstorage.util import DBusAddressWrapper, format_secret, open_session

        with self.login_collection() as collection:
            connection = collection.connection
            internal = DBusAddressWrapper(
                "/org/freedesktop/secrets",
                "org.gnome.keyring.InternalUnsupportedGuiltRiddenInterface",
                connection,
            )
            session = open_session(connection)
            internal.call("UnlockWithMasterPassword", "o(oayays)", LOGIN_COLLECTION,
                          format_secret(session, TEST_PASSWORD.encode(), "text/plain"))


def _read_lines(stream: Any, count: int, deadline: float) -> list[str]:
    """``count`` lines from a pipe, or fewer if it closes or the deadline passes."""
    data = b""
    fd = stream.fileno()
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").splitlines()[:count]


def _wait_for_bus_name(address: str, deadline: float) -> None:
    """Block until the keyring owns ``org.freedesktop.secrets`` on the bus.

    gnome-keyring-daemon registers a moment after it starts; asking before
    that would make the bus activate a second, locked daemon.
    """
    from jeepney import MatchRule
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    connection = open_dbus_connection(address)
    try:
        rule = MatchRule(type="signal", sender=message_bus.bus_name,
                         interface=message_bus.interface, member="NameOwnerChanged")
        rule.add_arg_condition(0, SECRETS_BUS_NAME)
        connection.send_and_get_reply(message_bus.AddMatch(rule), timeout=5)
        with connection.filter(rule) as signals:
            owned = connection.send_and_get_reply(
                message_bus.NameHasOwner(SECRETS_BUS_NAME), timeout=5).body[0]
            while not owned:
                message = connection.recv_until_filtered(
                    signals, timeout=max(deadline - time.monotonic(), 0.01))
                owned = bool(message.body[2])
    finally:
        connection.close()


def _check_usable(service: SecretService) -> None:
    """The login collection is unlocked and stores, returns and deletes an item."""
    with service.login_collection() as collection:
        if collection.is_locked():
            raise RuntimeError("the login collection is locked after --unlock")
        item = collection.create_item("fixture check", {"service": "compozy-fixture-check"},
                                      b"check", replace=True)
        try:
            if item.get_secret() != b"check":
                raise RuntimeError("the keyring returned another secret than it was given")
        finally:
            item.delete()


def _stop(keeper: subprocess.Popen[bytes], daemon_pid: int | None) -> None:
    if daemon_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon_pid, signal.SIGTERM)
    assert keeper.stdin is not None and keeper.stdout is not None
    keeper.stdin.close()  # cat exits; dbus-run-session ends the bus
    try:
        keeper.wait(10)
    except subprocess.TimeoutExpired:
        keeper.kill()
        keeper.wait()
    keeper.stdout.close()


@pytest.fixture(scope="session")
def secret_service() -> Iterator[SecretService]:
    """A real, unlocked Secret Service on a private session bus, for the whole run."""
    with running_secret_service() as service:
        yield service


@contextlib.contextmanager
def running_secret_service() -> Iterator[SecretService]:
    """The Secret Service of :func:`secret_service`, for code outside pytest (benchmarks)."""
    require_tools(("dbus-run-session", "gnome-keyring-daemon"), PACKAGES, "for the real keyring")
    home = tempfile.mkdtemp(prefix="cz-keyring-")
    runtime = os.path.join(home, "run")
    os.mkdir(runtime, 0o700)
    env = {
        **os.environ,
        "HOME": home,
        "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_RUNTIME_DIR": runtime,
        "COMPOZY_TEST_KEYRING_PASSWORD": TEST_PASSWORD,
    }
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    log_path = os.path.join(home, "keyring.log")
    with open(log_path, "wb") as log:
        keeper = subprocess.Popen(
            ["dbus-run-session", "--", "sh", "-c", _KEEPER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
        )
    assert keeper.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    daemon_pid: int | None = None
    try:
        lines = _read_lines(keeper.stdout, 2, deadline)
        if len(lines) < 2 or not lines[0].isdigit() or not lines[1].startswith("unix:"):
            raise RuntimeError(f"dbus-run-session printed {lines!r}")
        daemon_pid = int(lines[0])
        service = SecretService(address=lines[1], home=home, daemon_pid=daemon_pid)
        _wait_for_bus_name(service.address, deadline)
        _check_usable(service)
    except Exception as exc:
        _stop(keeper, daemon_pid)
        output = Path(log_path).read_text(errors="replace")[-2000:]
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"could not start gnome-keyring-daemon on a private bus: {exc!r}\n{output}")
    try:
        yield service
    finally:
        _stop(keeper, daemon_pid)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------
# This process's keyring, per test.


@dataclass
class KeyringEnv:
    """The keyring environment of one test; ``env`` is for subprocesses too."""

    env: dict[str, str]


def _use_keyring_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> KeyringEnv:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # keyring caches the backend it detected; make it detect again, from this
    # environment (monkeypatch puts the old one back afterwards).
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)
    return KeyringEnv(env=dict(env))


#: keyring's SecretService backend leaves its D-Bus connection open when the
#: collection is locked (get_preferred_collection raises before closing it;
#: jaraco/keyring#380, still so in keyring 25.7). The socket is closed when
#: collected; in tests that is a ResourceWarning, which this suite makes an error.
_LEAKED_BUS_SOCKET = "unclosed <socket.socket"


@pytest.fixture
def real_keyring(
    secret_service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SecretService]:
    """This process's keyring is the test Secret Service, for one test."""
    # Added to the filters pytest set up for this test, and gone with them.
    warnings.filterwarnings("ignore", _LEAKED_BUS_SOCKET, ResourceWarning)
    _use_keyring_env(monkeypatch, secret_service.env)
    try:
        yield secret_service
    finally:
        secret_service.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()  # close leaked connections now, not during a later test


@pytest.fixture
def locked_keyring(real_keyring: SecretService) -> Iterator[SecretService]:
    """The test Secret Service with its login collection locked, for one test."""
    real_keyring.lock()
    assert real_keyring.is_locked()
    try:
        yield real_keyring
    finally:
        real_keyring.unlock()
        assert not real_keyring.is_locked()


@pytest.fixture
def no_keyring(monkeypatch: pytest.MonkeyPatch) -> KeyringEnv:
    """No keyring at all: every call raises NoKeyringError."""
    return _use_keyring_env(
        monkeypatch, {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"})


class HangingKeyring(keyring.backend.KeyringBackend):
    """A keyring whose calls block, as a locked Secret Service waiting on an unseen prompt.

    Calls return (finding nothing, storing nothing) once :attr:`released` is
    set, which the ``hanging_keyring`` fixture does when its test ends, or
    after :data:`HANG_LIMIT` seconds.
    """

    # keyring declares a classproperty. Negative: never chosen unless named (as
    # keyring.backends.null is), though every backend class defined is a candidate.
    priority = -1  # type: ignore[assignment]
    released = threading.Event()
    calls = 0

    def _hang(self) -> None:
        type(self).calls += 1
        type(self).released.wait(HANG_LIMIT)

    def get_password(self, service: str, username: str) -> str | None:
        self._hang()
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        self._hang()
        raise keyring.errors.PasswordSetError("released without storing")

    def delete_password(self, service: str, username: str) -> None:
        self._hang()


@pytest.fixture
def hanging_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyringEnv]:
    """A keyring that never answers; its blocked calls are released when the test ends."""
    HangingKeyring.released.clear()
    HangingKeyring.calls = 0
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
    try:
        yield _use_keyring_env(monkeypatch, {
            "PYTHON_KEYRING_BACKEND": "support.keyring_fixture.HangingKeyring",
            "PYTHONPATH": pythonpath,  # so that a subprocess finds this module
        })
    finally:
        HangingKeyring.released.set()
