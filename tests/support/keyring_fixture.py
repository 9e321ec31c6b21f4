"""A real Secret Service keyring for tests: gnome-keyring-daemon inside dbus-run-session.

The keyring lives in a temporary HOME, is unlocked with a test password, and
is torn down with its private session bus at the end of the test session, so
the person's own keyring is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from support.real_parts import require_tools

PACKAGES = "gnome-keyring dbus-daemon dbus-user-session"
TEST_PASSWORD = "compozy-test-keyring"

_KEEPER = """\
printf %s "$COMPOZY_TEST_KEYRING_PASSWORD" \
  | gnome-keyring-daemon --unlock --components=secrets >/dev/null
echo "DBUS_SESSION_BUS_ADDRESS=$DBUS_SESSION_BUS_ADDRESS"
exec cat
"""


@dataclass
class SecretService:
    """The environment a process needs to use the test keyring."""

    env: dict[str, str]
    home: str

    def items(self) -> list[tuple[dict[str, str], str, bytes]]:
        """Every item of the default collection: (attributes, label, secret)."""
        code = (
            "import json, secretstorage\n"
            "bus = secretstorage.dbus_init()\n"
            "collection = secretstorage.get_default_collection(bus)\n"
            "print(json.dumps([[i.get_attributes(), i.get_label(), i.get_secret().decode()] "
            "for i in collection.get_all_items()]))\n"
        )
        import json
        import sys

        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return [(a, label, secret.encode()) for a, label, secret in json.loads(out.stdout)]


@pytest.fixture(scope="session")
def secret_service() -> Iterator[SecretService]:
    require_tools(("dbus-run-session", "gnome-keyring-daemon"), PACKAGES, "for the real keyring")
    home = tempfile.mkdtemp(prefix="cz-keyring-")
    runtime = os.path.join(home, "run")
    os.mkdir(runtime, 0o700)
    env = {
        **os.environ,
        "HOME": home,
        "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
        "XDG_RUNTIME_DIR": runtime,
        "COMPOZY_TEST_KEYRING_PASSWORD": TEST_PASSWORD,
    }
    keeper = subprocess.Popen(
        ["dbus-run-session", "--", "sh", "-c", _KEEPER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert keeper.stdout is not None and keeper.stdin is not None
    line = keeper.stdout.readline().decode().strip()
    if not line.startswith("DBUS_SESSION_BUS_ADDRESS="):
        keeper.kill()
        pytest.fail("could not start gnome-keyring-daemon in dbus-run-session")
    service = SecretService(
        env={
            "DBUS_SESSION_BUS_ADDRESS": line.split("=", 1)[1],
            "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
        },
        home=home,
    )
    yield service
    keeper.stdin.close()  # cat exits, dbus-run-session ends the bus and the keyring
    try:
        keeper.wait(10)
    except subprocess.TimeoutExpired:
        keeper.kill()
        keeper.wait()
    keeper.stdout.close()
    shutil.rmtree(home, ignore_errors=True)
