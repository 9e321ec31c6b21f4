"""Where sessions outlive the agent: secrets in the keyring, metadata in a state file.

* Refresh tokens and stored API keys go to the OS keyring (service
  ``compozy-agent``, user ``<token_id>:<kind>``). The keyring is probed once at
  start with a timeout, and every call runs in a worker thread under a
  timeout, so a locked or hung Secret Service never hangs the agent.
* Where no keyring works, secrets stay in memory (``backend="memory"``,
  ``persistent=False``) and status says so. A ``0600`` plaintext
  ``secrets.json`` is used only when the person opts in (``storage: file``).
* Metadata (profile, issuer, subject, scopes, token id...) goes to
  ``sessions.json`` in the state directory (``0700``), written atomically
  (temp file, fsync, rename, fsync of the directory), never to the keyring.
  A state file that cannot be read is never overwritten.

Errors::

    StoreError                 anything this module raises
    ├── SecretStoreUnavailable the chosen secret store does not work at all
    ├── SecretStoreError       one secret could not be read, written or deleted
    └── StateFileCorrupt       the state file cannot be read; it is left alone

No message contains a secret. Nothing above this module sees keyring errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol, TypeVar

import anyio
import anyio.to_thread
import msgspec

from compozy_client.protocol import StorageInfo

log = logging.getLogger("compozy_agent.store")

SERVICE: Final = "compozy-agent"
STATE_FILE: Final = "sessions.json"
SECRETS_FILE: Final = "secrets.json"
STATE_VERSION: Final = 1
CALL_TIMEOUT: Final = 5.0

SecretKind = Literal["refresh_token", "api_key"]
StorageChoice = Literal["auto", "keyring", "file", "memory"]
_T = TypeVar("_T")


class StoreError(Exception):
    """Base of this module's errors."""


class SecretStoreUnavailable(StoreError):
    pass


class SecretStoreError(StoreError):
    pass


class StateFileCorrupt(StoreError):
    pass


class StoredSession(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A session's metadata as the state file keeps it. Never a secret."""

    token_id: str
    profile: str
    kind: Literal["oidc", "api_key"]
    issuer: str | None = None
    client_id: str | None = None
    subject: str | None = None
    account: str | None = None
    scopes: list[str] = []
    resources: list[str] = []
    created_at: float | None = None


class _StateDocument(msgspec.Struct):
    # Unknown fields are kept out but tolerated: a newer agent's file still loads.
    version: int
    sessions: list[StoredSession]


class SecretBackend(Protocol):
    name: str
    persistent: bool

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> None: ...


class MemorySecrets:
    name = "memory"
    persistent = False

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self._values.get(key)

    def put(self, key: str, value: str) -> None:
        self._values[key] = value

    def delete(self, key: str) -> None:
        self._values.pop(key, None)


class KeyringSecrets:
    name = "keyring"
    persistent = True

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def get(self, key: str) -> str | None:
        value = self._backend.get_password(SERVICE, key)
        return value if isinstance(value, str) else None

    def put(self, key: str, value: str) -> None:
        self._backend.set_password(SERVICE, key, value)

    def delete(self, key: str) -> None:
        import keyring.errors

        with contextlib.suppress(keyring.errors.PasswordDeleteError):  # already gone
            self._backend.delete_password(SERVICE, key)


class FileSecrets:
    """Opt-in plaintext secrets: one 0600 JSON file, written atomically."""

    name = "file"
    persistent = True

    def __init__(self, path: str) -> None:
        self._path = path

    def _load(self) -> dict[str, str]:
        try:
            with open(self._path, "rb") as file:
                document = json.loads(file.read())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            raise SecretStoreError(
                f"cannot read {self._path}; move it aside to start without stored secrets"
            ) from None
        return {str(k): str(v) for k, v in document.items()} if isinstance(document, dict) else {}

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, value: str) -> None:
        values = self._load()
        values[key] = value
        atomic_write(self._path, json.dumps(values).encode())

    def delete(self, key: str) -> None:
        values = self._load()
        if values.pop(key, None) is not None:
            atomic_write(self._path, json.dumps(values).encode())


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` as a 0600 file: temp file, fsync, rename, fsync dir."""
    directory = os.path.dirname(path)
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _probe_keyring() -> KeyringSecrets:
    """Find a working keyring: write, read back and delete a probe entry."""
    import keyring
    import keyring.backends.fail

    backend = keyring.get_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring):
        raise SecretStoreUnavailable("no keyring backend is available")
    chained = getattr(backend, "backends", None)
    if chained is not None and not chained:
        raise SecretStoreUnavailable("no keyring backend is available")
    secrets = KeyringSecrets(backend)
    probe = f"probe:{os.getpid()}"
    try:
        secrets.put(probe, "probe")
        ok = secrets.get(probe) == "probe"
        secrets.delete(probe)
    except Exception as exc:
        raise SecretStoreUnavailable(
            f"the keyring ({type(backend).__name__}) does not work: {type(exc).__name__}"
        ) from None
    if not ok:
        raise SecretStoreUnavailable(f"the keyring ({type(backend).__name__}) lost a test entry")
    return secrets


def _describe_keyring(secrets: KeyringSecrets) -> str:
    backend = secrets._backend
    name = getattr(backend, "name", None) or type(backend).__name__
    return str(name)


class SessionStore:
    """Secrets plus the state file. Secret calls are async and bounded in time."""

    def __init__(self, state_dir: str, secrets: SecretBackend, detail: str = "") -> None:
        self.state_dir = state_dir
        self.secrets = secrets
        self.info = StorageInfo(backend=secrets.name, detail=detail, persistent=secrets.persistent)
        self.state_path = os.path.join(state_dir, STATE_FILE)
        #: Set when the state file could not be read; saving is then refused.
        self.load_error: str | None = None

    async def _call(self, function: Callable[[], _T], what: str) -> _T:
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                return await anyio.to_thread.run_sync(function, abandon_on_cancel=True)
        except TimeoutError:
            raise SecretStoreError(f"the {self.secrets.name} store did not answer "
                                   f"within {CALL_TIMEOUT:.0f} s while {what}") from None
        except StoreError:
            raise
        except Exception as exc:
            raise SecretStoreError(
                f"the {self.secrets.name} store failed while {what}: {type(exc).__name__}"
            ) from None

    async def get_secret(self, token_id: str, kind: SecretKind) -> str | None:
        key = f"{token_id}:{kind}"
        return await self._call(lambda: self.secrets.get(key), f"reading {key}")

    async def put_secret(self, token_id: str, kind: SecretKind, value: str) -> None:
        key = f"{token_id}:{kind}"
        await self._call(lambda: self.secrets.put(key, value), f"saving {key}")

    async def delete_secret(self, token_id: str, kind: SecretKind) -> None:
        key = f"{token_id}:{kind}"
        await self._call(lambda: self.secrets.delete(key), f"deleting {key}")

    def load(self) -> list[StoredSession]:
        """The sessions in the state file; none if it does not exist yet."""
        try:
            with open(self.state_path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            self.load_error = f"cannot read {self.state_path}: {exc.strerror}"
            raise StateFileCorrupt(self.load_error) from None
        try:
            document = msgspec.json.decode(data, type=_StateDocument)
        except msgspec.DecodeError:
            self.load_error = (f"{self.state_path} is corrupt; move it aside (sessions in it will "
                               "need a new login) and restart the agent")
            raise StateFileCorrupt(self.load_error) from None
        if document.version != STATE_VERSION:
            self.load_error = (f"{self.state_path} has version {document.version}, which this "
                               "agent does not read; upgrade the agent or move the file aside")
            raise StateFileCorrupt(self.load_error)
        return document.sessions

    def save(self, sessions: list[StoredSession]) -> None:
        if self.load_error is not None:
            raise StateFileCorrupt(f"not overwriting the unreadable state file: {self.load_error}")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        document = _StateDocument(version=STATE_VERSION, sessions=sessions)
        atomic_write(self.state_path, msgspec.json.format(msgspec.json.encode(document)))


async def open_store(
    choice: StorageChoice, state_dir: str, *, probe_timeout: float = 3.0
) -> SessionStore:
    """The store the configuration asks for; ``auto`` falls back to memory, loudly."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    info = os.stat(state_dir)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(f"{state_dir} is writable by others; run: chmod 700 {state_dir}")
    if choice == "memory":
        return SessionStore(state_dir, MemorySecrets(), "storage: memory in the config")
    if choice == "file":
        path = os.path.join(state_dir, SECRETS_FILE)
        return SessionStore(state_dir, FileSecrets(path), f"plaintext file {path} (opted in)")
    try:
        with anyio.fail_after(probe_timeout):
            secrets = await anyio.to_thread.run_sync(_probe_keyring, abandon_on_cancel=True)
    except TimeoutError:
        reason = f"the keyring did not answer within {probe_timeout:.0f} s (locked?)"
    except SecretStoreUnavailable as exc:
        reason = str(exc)
    except Exception as exc:  # a keyring backend may raise anything while loading
        reason = f"the keyring failed to load: {type(exc).__name__}"
    else:
        return SessionStore(state_dir, secrets, _describe_keyring(secrets))
    if choice == "keyring":
        raise SecretStoreUnavailable(f"storage: keyring was asked for, but {reason}")
    log.warning("no working keyring (%s); sessions are kept in memory only", reason)
    return SessionStore(state_dir, MemorySecrets(), f"no working keyring: {reason}")
