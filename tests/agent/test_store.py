"""The storage edge: keyring probing with a deadline, memory fallback, atomic 0600 state."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import pytest

from compozy_agent.store import (
    SecretStoreError,
    SecretStoreUnavailable,
    StateFileCorrupt,
    StoredSession,
    open_store,
)

pytestmark = pytest.mark.anyio


class HangingKeyring(keyring.backend.KeyringBackend):
    """A Secret Service that never answers, as a locked one over SSH may."""

    priority = 1  # type: ignore[assignment]
    release = threading.Event()

    def get_password(self, service: str, username: str) -> str | None:
        self.release.wait(30)
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        self.release.wait(30)

    def delete_password(self, service: str, username: str) -> None:
        self.release.wait(30)


class DictKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.values.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.values[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.values.pop((service, username), None)


@pytest.fixture
def use_keyring() -> Iterator[object]:
    previous = keyring.get_keyring()

    def install(backend: keyring.backend.KeyringBackend) -> None:
        keyring.set_keyring(backend)

    yield install
    HangingKeyring.release.set()
    keyring.set_keyring(previous)
    HangingKeyring.release.clear()


async def test_no_keyring_means_memory_said_plainly(tmp_path: Path, use_keyring) -> None:  # type: ignore[no-untyped-def]
    use_keyring(keyring.backends.fail.Keyring())
    store = await open_store("auto", str(tmp_path))
    assert store.info.backend == "memory" and store.info.persistent is False
    assert "no working keyring" in store.info.detail
    with pytest.raises(SecretStoreUnavailable, match="storage: keyring was asked for"):
        await open_store("keyring", str(tmp_path))


async def test_a_hanging_keyring_is_probed_with_a_deadline(tmp_path: Path, use_keyring) -> None:  # type: ignore[no-untyped-def]
    use_keyring(HangingKeyring())
    store = await open_store("auto", str(tmp_path), probe_timeout=0.3)
    assert store.info.backend == "memory"
    assert "did not answer within" in store.info.detail


async def test_keyring_round_trip_keeps_secrets_out_of_the_state_file(
    tmp_path: Path,
    use_keyring,  # type: ignore[no-untyped-def]
) -> None:
    backend = DictKeyring()
    use_keyring(backend)
    store = await open_store("auto", str(tmp_path))
    assert store.info.backend == "keyring"
    await store.put_secret("abc", "refresh_token", "rt-secret")
    assert await store.get_secret("abc", "refresh_token") == "rt-secret"
    store.save([StoredSession(token_id="abc", profile="dev", kind="oidc", account="a@b")])
    text = (tmp_path / "sessions.json").read_text()
    assert "rt-secret" not in text and "a@b" in text
    assert list(backend.values) == [("compozy-agent", "abc:refresh_token")]
    assert stat.S_IMODE((tmp_path / "sessions.json").stat().st_mode) == 0o600
    await store.delete_secret("abc", "refresh_token")
    assert await store.get_secret("abc", "refresh_token") is None
    assert [p.name for p in tmp_path.iterdir()] == ["sessions.json"]  # no temp files left


async def test_a_keyring_call_that_hangs_times_out_cleanly(tmp_path: Path, use_keyring) -> None:  # type: ignore[no-untyped-def]
    import compozy_agent.store as store_module

    backend = DictKeyring()
    use_keyring(backend)
    store = await open_store("auto", str(tmp_path))
    store.secrets._backend = HangingKeyring()  # type: ignore[attr-defined]
    original = store_module.CALL_TIMEOUT
    store_module.CALL_TIMEOUT = 0.3
    try:
        with pytest.raises(SecretStoreError, match="did not answer") as caught:
            await store.put_secret("abc", "refresh_token", "rt-secret")
        assert "rt-secret" not in str(caught.value)
    finally:
        store_module.CALL_TIMEOUT = original


async def test_file_storage_only_on_opt_in_and_0600(tmp_path: Path) -> None:
    store = await open_store("file", str(tmp_path / "state"))
    assert store.info.backend == "file" and "opted in" in store.info.detail
    await store.put_secret("abc", "api_key", "k-1")
    secrets = tmp_path / "state" / "secrets.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert await store.get_secret("abc", "api_key") == "k-1"


async def test_corrupt_state_file_is_reported_and_never_overwritten(tmp_path: Path) -> None:
    state = tmp_path / "sessions.json"
    state.write_text("{half a file")
    store = await open_store("memory", str(tmp_path))
    with pytest.raises(StateFileCorrupt, match="move it aside") as caught:
        store.load()
    assert str(state) in str(caught.value)
    with pytest.raises(StateFileCorrupt, match="not overwriting"):
        store.save([])
    assert state.read_text() == "{half a file"


async def test_state_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()
    os.chmod(target, 0o777)
    with pytest.raises(Exception, match="writable by others"):
        await open_store("memory", str(target))
