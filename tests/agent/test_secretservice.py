"""The agent's own Secret Service client, against the real gnome-keyring.

It must store exactly what the ``keyring`` package stores (an upgrade keeps
every session, and a downgrade too), on one kept D-Bus connection, opened
again when it breaks, with no secret in what it raises.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import keyring
import pytest

from compozy_agent import secretservice
from compozy_agent.secretservice import SecretServiceLocked, SecretServiceSecrets
from compozy_agent.store import SERVICE, open_store
from support.keyring_fixture import SecretService

SECRET = "rt-secret-never-shown-3f9a"
KEY = "tok-ss:refresh_token"

pytestmark = [pytest.mark.real_keyring, pytest.mark.anyio]


def test_entries_are_the_keyring_packages_both_ways(real_keyring: SecretService) -> None:
    """An upgrade reads what keyring wrote; a write replaces it rather than adding a second."""
    backend = keyring.get_keyring()
    backend.set_password(SERVICE, KEY, SECRET)
    ours = SecretServiceSecrets(SERVICE)
    try:
        assert ours.get(KEY) == SECRET
        ours.put(KEY, SECRET + "-rotated")
        assert backend.get_password(SERVICE, KEY) == SECRET + "-rotated"
        entries = [(attributes, label) for attributes, label, _ in real_keyring.items()
                   if attributes.get("service") == SERVICE]
        assert entries == [({"service": SERVICE, "username": KEY,
                             "application": "Python keyring library"},
                            f"Password for '{KEY}' on '{SERVICE}'")]
        ours.delete(KEY)
        assert backend.get_password(SERVICE, KEY) is None
        ours.delete(KEY)  # nothing left: no error
        assert ours.get(KEY) is None
    finally:
        ours.close()


def test_one_connection_serves_every_call(
    real_keyring: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = secretservice.open_dbus_connection

    def counting_open(bus: str) -> object:
        opened.append(bus)
        return real_open(bus)

    monkeypatch.setattr(secretservice, "open_dbus_connection", counting_open)
    ours = SecretServiceSecrets(SERVICE)
    try:
        for n in range(3):
            ours.put(KEY, f"{SECRET}-{n}")
            assert ours.get(KEY) == f"{SECRET}-{n}"
        ours.delete(KEY)
    finally:
        ours.close()
    assert len(opened) == 1


def test_a_broken_connection_is_opened_again(real_keyring: SecretService) -> None:
    ours = SecretServiceSecrets(SERVICE)
    try:
        ours.put(KEY, SECRET)
        connection = ours._connection
        assert connection is not None
        connection.sock.shutdown(socket.SHUT_RDWR)  # as when the bus goes away under us
        assert ours.get(KEY) == SECRET
        assert ours._connection is not connection
    finally:
        ours.delete(KEY)
        ours.close()


def test_a_locked_keyring_raises_plain_words_without_the_secret(
    locked_keyring: SecretService,
) -> None:
    ours = SecretServiceSecrets(SERVICE)
    try:
        with pytest.raises(SecretServiceLocked) as caught:
            ours.put(KEY, SECRET)
    finally:
        ours.close()
    assert str(caught.value).startswith("the keyring is locked")
    shown = str(caught.value) + repr(caught.value) + "".join(
        traceback.format_exception(caught.value))
    assert SECRET not in shown and SECRET not in repr(ours)


def test_the_store_uses_it_without_importing_the_keyring_package(
    real_keyring: SecretService, tmp_path: Path
) -> None:
    """The cold start's saving (docs/performance.md): keyring and its imports stay out."""
    script = textwrap.dedent(f"""
        import sys, anyio
        from compozy_agent.store import open_store
        async def main():
            store = await open_store("auto", {str(tmp_path)!r})
            assert type(store.secrets).__name__ == "SecretServiceSecrets", store.info
            await store.put_secret("tok-1", "refresh_token", "value")
            assert await store.get_secret("tok-1", "refresh_token") == "value"
            await store.delete_secret("tok-1", "refresh_token")
            print(sorted(m for m in ("keyring", "secretstorage", "cryptography")
                         if m in sys.modules))
        anyio.run(main)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **real_keyring.env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_the_store_says_which_keyring(real_keyring: SecretService, tmp_path: Path) -> None:
    store = await open_store("auto", str(tmp_path))
    assert isinstance(store.secrets, SecretServiceSecrets)
    assert store.info.backend == "keyring" and store.info.persistent is True
    assert "SecretService" in store.info.detail


async def test_another_backend_asked_for_is_left_to_the_keyring_package(
    real_keyring: SecretService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    store = await open_store("auto", str(tmp_path))
    assert store.info.backend == "memory"
    assert "PYTHON_KEYRING_BACKEND=keyring.backends.fail.Keyring" in store.info.detail
