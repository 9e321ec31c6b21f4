"""Where sessions outlive the agent: secrets in the keyring, metadata in a state file.

Rules:

* Access tokens are never stored. Refresh tokens, stored API keys and DPoP
  private keys (RFC 9449, ``dpop.py``) go to the OS keyring (the ``keyring``
  package; service ``compozy-agent``, user ``<token_id>:<kind>``).
* The keyring is probed once, when the store is opened: write, read back and
  delete a probe entry, under a deadline (3 s by default). Every later call
  runs off the event loop under a deadline too, so a locked or hung Secret
  Service (common over SSH and on WSL) never hangs a login or a token call.
* Where no keyring works, secrets stay in memory: ``backend="memory"``,
  ``persistent=False`` and a ``detail`` that says why. Never silent plaintext:
  a ``0600`` plaintext ``secrets.json`` is used only when the person opts in
  (``storage: file``).
* Metadata (profile, issuer, subject, account, scopes, token id...) goes to
  ``sessions.json`` in the state directory (``0700``), never to the keyring
  (Windows limits the size of a secret). It is written atomically: a ``0600``
  temp file in the same directory, fsync, rename, fsync of the directory.
* The state directory must be ours, not writable by others, and so must every
  directory above it (root's allowed; sticky ones and user private groups too):
  whoever can write above it could swap it for their own. The state and
  secrets files are read only as regular files of ours, never through a
  symbolic link, without blocking, at most :data:`MAX_FILE_BYTES`.
* A state file that cannot be read (corrupt, or from a newer agent) is never
  overwritten: loading and saving raise :class:`StateFileCorrupt`, naming the
  file and what to do.
* No message or repr contains a secret, and no exception raised here carries a
  third-party exception (or its message) as its cause or context.

Errors::

    StoreError                   anything this module raises; also an unusable state dir
    ├── SecretStoreUnavailable   storage: keyring was asked for, and no keyring works
    ├── SecretStoreError         one secret could not be read, written or deleted in time
    └── StateFileCorrupt         the state file cannot be read; it is left alone

Third-party errors are mapped here and nowhere else (see :data:`_PLAIN_REASONS`):
keyring, secretstorage and jeepney (D-Bus) exceptions, ``OSError`` and
timeouts become one of the above with a plain reason. Nothing above this
module sees a keyring exception.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import anyio
import anyio.to_thread
import msgspec

from compozy_client.protocol import StorageInfo

__all__ = [
    "CALL_TIMEOUT",
    "PROBE_TIMEOUT",
    "SECRETS_FILE",
    "SERVICE",
    "STATE_FILE",
    "STATE_VERSION",
    "FileSecrets",
    "KeyringSecrets",
    "LearnedDownscope",
    "MemorySecrets",
    "SecretBackend",
    "SecretKind",
    "SecretStoreError",
    "SecretStoreUnavailable",
    "SessionStore",
    "StateFileCorrupt",
    "StorageChoice",
    "StoreError",
    "StoredSession",
    "atomic_write",
    "open_store",
    "prepare_state_dir",
]

log = logging.getLogger("compozy_agent.store")

SERVICE: Final = "compozy-agent"
STATE_FILE: Final = "sessions.json"
SECRETS_FILE: Final = "secrets.json"
STATE_VERSION: Final = 1
#: How long the start-up probe of the keyring may take, in seconds.
PROBE_TIMEOUT: Final = 3.0
#: How long one secret-store call may take, waiting behind earlier calls included.
CALL_TIMEOUT: Final = 5.0
#: Calls allowed to wait behind a stuck one before new calls fail at once.
MAX_WAITING_CALLS: Final = 16
#: The keyring user of the start-up probe; fixed, so a probe left behind is reused.
PROBE_USER: Final = "compozy-agent-probe"

SecretKind = Literal["refresh_token", "api_key", "dpop_key"]
#: ``auto``: the keyring, else memory. ``keyring``: the keyring, else an error.
#: ``file``: a 0600 plaintext file (opt-in). ``memory``: nothing outlives the agent.
StorageChoice = Literal["auto", "keyring", "file", "memory"]
_T = TypeVar("_T")


class StoreError(Exception):
    """Base of this module's errors; raised as such for an unusable state directory."""


class SecretStoreUnavailable(StoreError):
    """The secret store asked for does not work at all (``storage: keyring``)."""


class SecretStoreError(StoreError):
    """One secret could not be read, written or deleted, or not in time."""


class StateFileCorrupt(StoreError):
    """The state file cannot be read; it is not overwritten until moved aside."""


# --------------------------------------------------------------------------
# Third-party errors in plain words.

#: Exceptions by (module, class name), matched along the class's MRO and along
#: the ``__cause__``/``__context__`` chain (innermost first, because keyring
#: wraps secretstorage's precise error in a vaguer one). Matched by name so
#: that secretstorage and jeepney, which exist only on Linux, are not imported.
_PLAIN_REASONS: Final[dict[tuple[str, str], str]] = {
    ("secretstorage.exceptions", "SecretServiceNotAvailableException"):
        "Secret Service not available on the session bus",
    ("secretstorage.exceptions", "LockedException"): "the keyring is locked",
    ("secretstorage.exceptions", "PromptDismissedException"):
        "the prompt to unlock the keyring was dismissed",
    ("secretstorage.exceptions", "ItemNotFoundException"): "the keyring entry disappeared",
    ("jeepney.wrappers", "DBusErrorResponse"): "the Secret Service answered with a D-Bus error",
    ("keyring.errors", "KeyringLocked"): "the keyring is locked and could not be unlocked",
    ("keyring.errors", "NoKeyringError"): "no keyring backend is available",
    ("keyring.errors", "InitError"): "the keyring could not be opened",
    ("keyring.errors", "PasswordSetError"): "the keyring refused to store the entry",
    ("keyring.errors", "PasswordDeleteError"): "the keyring refused to delete the entry",
    ("keyring.errors", "KeyringError"): "the keyring failed",
    ("builtins", "UnicodeError"): "the stored value is not valid text",
    ("builtins", "ConnectionError"): "the connection to the keyring broke",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, outermost first, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _plain_reason(exc: BaseException) -> str:
    """What went wrong, in words that never include a third-party message.

    Messages of third-party exceptions are not shown: one raised while a
    secret was being handled might quote it. Only our own words, class names,
    ``strerror`` and D-Bus error names (which are fixed strings) appear.
    """
    links = list(_chain(exc))
    for link in reversed(links):  # innermost first: keyring wraps precise errors vaguely
        if type(link).__module__ == "compozy_agent.secretservice":
            return str(link)  # its own words and D-Bus error names only
        for cls in type(link).__mro__:
            reason = _PLAIN_REASONS.get((cls.__module__, cls.__qualname__))
            if reason is None:
                continue
            dbus_name = getattr(link, "name", None)
            if cls.__qualname__ == "DBusErrorResponse" and isinstance(dbus_name, str):
                reason = f"{reason} ({dbus_name})"
            return reason
    for link in links:
        if isinstance(link, OSError):
            return f"the keyring could not be reached: {link.strerror or type(link).__name__}"
    return f"unexpected {type(exc).__name__}"


# --------------------------------------------------------------------------
# Running blocking calls with a deadline.


class _Deadline(TimeoutError):
    """A call to the store did not finish in time; the message is ours."""


class _Job(Generic[_T]):
    __slots__ = ("done", "error", "finished", "function", "value")

    def __init__(self, function: Callable[[], _T]) -> None:
        self.function = function
        self.finished = threading.Event()
        self.done = False
        self.value: _T | None = None
        self.error: BaseException | None = None


class _CallThread:
    """One daemon thread that runs a store's blocking calls, in the order they were made.

    Why not ``anyio.to_thread.run_sync(..., abandon_on_cancel=True)`` alone:
    anyio's worker threads are not daemons, so a call stuck in a hung Secret
    Service keeps the interpreter from exiting even after the task gave up on
    it. Why one thread, not one per call: a write that hung and completes late
    then cannot land after a newer write of the same key.

    The caller waits for its job in an anyio worker thread, bounded by the
    deadline and released at once when the caller is cancelled.
    """

    IDLE_EXIT: Final = 10.0

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._waiting = 0

    async def run(self, function: Callable[[], _T], timeout: float) -> _T:
        """``function()`` in the thread; raises :class:`_Deadline` after ``timeout`` seconds.

        Its own exceptions are re-raised as they are; the caller maps them.
        """
        job: _Job[_T] = _Job(function)
        with self._lock:
            if self._waiting >= MAX_WAITING_CALLS:
                raise _Deadline(f"{self._waiting} earlier calls are still waiting for an answer")
            self._waiting += 1
            self._jobs.put(job)
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        try:
            await anyio.to_thread.run_sync(job.finished.wait, timeout, abandon_on_cancel=True)
        finally:
            job.finished.set()  # cancelled: let the waiting worker thread go at once
        if not job.done:
            raise _Deadline(f"no answer within {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]  # done without error: a _T

    def _serve(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._waiting == 0:
                        self._running = False
                        return
                continue
            try:
                job.value = job.function()
            except BaseException as exc:  # handed to the caller, who maps it
                job.error = exc
            job.done = True
            job.finished.set()
            del job
            with self._lock:
                self._waiting -= 1


# --------------------------------------------------------------------------
# Secret backends: blocking, called only through _CallThread.


class SecretBackend(Protocol):
    """Where secrets go. Blocking; :class:`SessionStore` calls it off the event loop."""

    name: str
    persistent: bool

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> None: ...


class MemorySecrets:
    """Secrets that end with the agent."""

    name = "memory"
    persistent = False

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"MemorySecrets(<{len(self._values)} secrets>)"

    def get(self, key: str) -> str | None:
        return self._values.get(key)

    def put(self, key: str, value: str) -> None:
        self._values[key] = value

    def delete(self, key: str) -> None:
        self._values.pop(key, None)


class UnavailableSecrets:
    """The keyring the config insists on (``storage: keyring``), which does not work.

    Every call fails with the reason, so a login keeps its refresh token in
    memory, retries the write and warns, and a restore says why a session
    needs a new login; nothing falls back to another store silently.
    """

    name = "keyring"
    persistent = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return "UnavailableSecrets()"

    def _fail(self) -> None:
        raise SecretStoreError(f"no working keyring: {self.reason}")

    def get(self, key: str) -> str | None:
        self._fail()
        return None

    def put(self, key: str, value: str) -> None:
        self._fail()

    def delete(self, key: str) -> None:
        self._fail()


class KeyringSecrets:
    """Secrets in a ``keyring`` backend, under service :data:`SERVICE`."""

    name = "keyring"
    persistent = True

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __repr__(self) -> str:
        return f"KeyringSecrets({self.description})"

    @property
    def description(self) -> str:
        """The backend's display name, e.g. ``SecretService Keyring``."""
        chained = getattr(self._backend, "backends", None)
        if isinstance(chained, list) and chained:
            return ", ".join(str(getattr(b, "name", type(b).__name__)) for b in chained)
        return str(getattr(self._backend, "name", None) or type(self._backend).__name__)

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
    """Opt-in plaintext secrets: one 0600 JSON object, rewritten atomically.

    A file that cannot be read, or that others may read, is refused and never
    overwritten.
    """

    name = "file"
    persistent = True

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"FileSecrets({self.path!r})"

    def _load(self) -> dict[str, str]:
        try:
            read = read_own_file(self.path)
        except OSError as exc:
            failure = f"cannot read {self.path}: {exc.strerror}"
        else:
            if read is None:
                return {}
            data, mode = read
            if stat.S_IMODE(mode) & 0o077:
                raise SecretStoreError(
                    f"{self.path} may be read by others; run: chmod 600 {self.path}")
            document = _decode_json_object(data)
            if document is not None and all(isinstance(v, str) for v in document.values()):
                return document
            failure = f"{self.path} is corrupt"
        raise SecretStoreError(
            f"{failure}; move it aside (its sessions will need a new login) and try again")

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, value: str) -> None:
        values = self._load()
        values[key] = value
        atomic_write(self.path, json.dumps(values, indent=1).encode())

    def delete(self, key: str) -> None:
        values = self._load()
        if values.pop(key, None) is not None:
            atomic_write(self.path, json.dumps(values, indent=1).encode())


#: The most of the state or secrets file read; each session takes a few hundred bytes.
MAX_FILE_BYTES: Final = 16 * 1024 * 1024


def read_own_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes, int] | None:
    """The contents and mode of ``path``, a regular file of ours of at most ``max_bytes``;
    None when there is none.

    Never follows a symbolic link, and never blocks on or reads without end from
    what is not a file (a FIFO would hang the agent's start, a link to /dev/zero
    fill its memory). Raises ``OSError`` whose ``strerror`` says what is wrong.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "it is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file")
        if info.st_uid != os.getuid():
            raise OSError(errno.EPERM, f"it belongs to uid {info.st_uid}")
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"it is larger than {max_bytes} bytes")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise OSError(errno.EFBIG, f"it is larger than {max_bytes} bytes")
        return b"".join(chunks), info.st_mode
    finally:
        os.close(fd)


def _decode_json_object(data: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


# --------------------------------------------------------------------------
# The state file.


class StoredSession(msgspec.Struct, kw_only=True, omit_defaults=True,
                    forbid_unknown_fields=False):
    """A session's metadata as the state file keeps it. Never a secret.

    Unknown fields are tolerated (a newer agent's file still loads) and dropped
    on the next save.
    """

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
    #: ``dpop``: the session's tokens are bound to a key kept in the secret store
    #: (``<token_id>:dpop_key``); its algorithm and public thumbprint are kept here.
    token_binding: Literal["bearer", "dpop"] = "bearer"
    dpop_algorithm: str | None = None
    dpop_thumbprint: str | None = None


class LearnedDownscope(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What the agent learned about a profile's provider: it narrows the whole chain of
    refresh tokens on a narrower refresh, so the profile is ``downscope: never``
    (``narrowing.py``). Holds for the profile while its issuer stays the same."""

    issuer: str
    learned_at: float


class _StateDocument(msgspec.Struct, forbid_unknown_fields=False):
    """``{"version": 1, "sessions": [...], "narrows_chains": {profile: ...}}``; unknown
    top-level fields are tolerated."""

    version: int
    sessions: list[StoredSession]
    narrows_chains: dict[str, LearnedDownscope] = {}


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` as a 0600 file, or leave it as it was.

    A temp file in the same directory (created 0600 and exclusively), write,
    fsync, rename over ``path``, fsync the directory so the rename survives a
    crash.
    """
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_interrupted_writes(directory: str, names: tuple[str, ...]) -> list[str]:
    """Delete the temp files :func:`atomic_write` leaves when the process is killed
    between creating and renaming them; they may hold secrets. Returns their paths.

    Call it only while no write can be running: at start-up, before anything is served.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if any(entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp")
                   for name in names) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


# --------------------------------------------------------------------------
# The store.


class SessionStore:
    """Secrets plus the state file.

    Secret calls are async, run off the event loop one at a time, and fail
    with :class:`SecretStoreError` after ``call_timeout`` seconds.
    """

    def __init__(
        self,
        state_dir: str,
        secrets: SecretBackend,
        detail: str = "",
        *,
        call_timeout: float = CALL_TIMEOUT,
        _calls: _CallThread | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.secrets = secrets
        self.call_timeout = call_timeout
        self.info = StorageInfo(backend=secrets.name, detail=detail, persistent=secrets.persistent)
        self.state_path = os.path.join(state_dir, STATE_FILE)
        self._calls = _calls or _CallThread(f"compozy-agent {secrets.name} store")
        self._save_lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"SessionStore({self.state_dir!r}, {self.secrets!r})"

    # ------------------------------------------------------------ secrets

    async def _call(self, function: Callable[[], _T], what: str) -> _T:
        try:
            return await self._calls.run(function, self.call_timeout)
        except StoreError:
            raise
        except _Deadline as exc:
            reason = str(exc)
            if self.secrets.name == "keyring":
                reason += " (is the keyring locked, or waiting on a prompt nobody sees?)"
        except Exception as exc:
            reason = _plain_reason(exc)
        # Raised outside the except block: the third-party exception, which
        # might quote a secret, is not kept as the context.
        raise SecretStoreError(f"{self.secrets.name} store: {what}: {reason}")

    async def get_secret(self, token_id: str, kind: SecretKind) -> str | None:
        """The secret, or None if the store has none for this session."""
        key = f"{token_id}:{kind}"
        return await self._call(lambda: self.secrets.get(key), f"could not read {key}")

    async def put_secret(self, token_id: str, kind: SecretKind, value: str) -> None:
        """Store the secret, replacing any earlier one."""
        key = f"{token_id}:{kind}"
        await self._call(lambda: self.secrets.put(key, value), f"could not save {key}")

    async def delete_secret(self, token_id: str, kind: SecretKind) -> None:
        """Remove the secret; removing a missing one is not an error."""
        key = f"{token_id}:{kind}"
        await self._call(lambda: self.secrets.delete(key), f"could not delete {key}")

    async def forget(self, token_id: str) -> None:
        """Delete the session's secrets, then its metadata.

        If a secret cannot be deleted the metadata is kept, so the session is
        still known and forgetting it can be tried again.
        """
        kinds: tuple[SecretKind, ...] = ("refresh_token", "api_key", "dpop_key")
        for kind in kinds:
            await self.delete_secret(token_id, kind)
        async with self._saving():
            sessions = await anyio.to_thread.run_sync(self.load)
            remaining = [s for s in sessions if s.token_id != token_id]
            if len(remaining) != len(sessions):
                await anyio.to_thread.run_sync(self.save, remaining)

    # ------------------------------------------------------------ metadata

    def load(self) -> list[StoredSession]:
        """The sessions in the state file; none if there is no file yet.

        Raises :class:`StateFileCorrupt` (naming the file and what to do) when
        the file cannot be read.
        """
        return self.load_document().sessions

    def load_narrows_chains(self) -> dict[str, LearnedDownscope]:
        """The profiles whose provider was seen narrowing chains (see :meth:`load`)."""
        return self.load_document().narrows_chains

    def load_document(self) -> _StateDocument:
        """The whole state file (see :meth:`load`); an empty one if there is none yet."""
        try:
            read = read_own_file(self.state_path)
        except OSError as exc:
            failure = f"cannot read {self.state_path}: {exc.strerror}"
            raise StateFileCorrupt(f"{failure}; fix its permissions or move it aside") from None
        if read is None:
            return _StateDocument(version=STATE_VERSION, sessions=[])
        try:
            document = msgspec.json.decode(read[0], type=_StateDocument)
        except msgspec.DecodeError:
            document = None
        if document is None:
            raise StateFileCorrupt(
                f"{self.state_path} is corrupt; move it aside (its sessions will need a new "
                "login) and restart the agent")
        if document.version != STATE_VERSION:
            raise StateFileCorrupt(
                f"{self.state_path} has version {document.version}, which this agent "
                f"(version {STATE_VERSION}) does not read; upgrade the agent or move the "
                "file aside")
        return document

    def remove_interrupted_writes(self) -> list[str]:
        """Delete temp files of writes a crash interrupted (see the module function)."""
        return remove_interrupted_writes(self.state_dir, (STATE_FILE, SECRETS_FILE))

    def save(self, sessions: list[StoredSession],
             narrows_chains: dict[str, LearnedDownscope] | None = None) -> None:
        """Replace the state file with ``sessions``, atomically, as 0600; the profiles
        learned to narrow chains are ``narrows_chains``, or kept as they are if None.

        Blocking (it fsyncs); from the event loop prefer :meth:`save_metadata`.
        Raises :class:`StateFileCorrupt` rather than overwrite a file that
        cannot be read. A state directory removed meanwhile is made again.
        """
        prepare_state_dir(self.state_dir)
        try:
            current = self.load_document()
        except StateFileCorrupt as exc:
            raise StateFileCorrupt(f"not overwriting the unreadable state file: {exc}") from None
        document = _StateDocument(
            version=STATE_VERSION, sessions=sessions,
            narrows_chains=current.narrows_chains if narrows_chains is None else narrows_chains)
        try:
            atomic_write(self.state_path, msgspec.json.format(msgspec.json.encode(document)))
        except OSError as exc:
            failure = f"cannot write {self.state_path}: {exc.strerror}"
            raise StoreError(failure) from None

    async def save_metadata(self, sessions: list[StoredSession],
                            narrows_chains: dict[str, LearnedDownscope] | None = None) -> None:
        """:meth:`save` in a worker thread; concurrent saves land in call order."""
        async with self._saving():
            await anyio.to_thread.run_sync(self.save, list(sessions),
                                           None if narrows_chains is None
                                           else dict(narrows_chains))

    def _saving(self) -> anyio.Lock:
        # Made on first use, inside the event loop (the store may be built outside one).
        if self._save_lock is None:
            self._save_lock = anyio.Lock()
        return self._save_lock


# --------------------------------------------------------------------------
# Opening: choosing and probing the secret store.


def prepare_state_dir(state_dir: str) -> None:
    """Create the state directory 0700, or check that an existing one is private enough."""
    try:
        os.makedirs(state_dir, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        failure = f"cannot create the state directory {state_dir}: {exc.strerror}"
        raise StoreError(failure) from None
    else:
        os.chmod(state_dir, 0o700)  # makedirs' mode is cut by the umask
    try:
        info = os.stat(state_dir)
    except OSError as exc:
        failure = f"cannot use the state directory {state_dir}: {exc.strerror}"
        raise StoreError(failure) from None
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"the state directory {state_dir} is not a directory")
    if info.st_uid != os.getuid():
        raise StoreError(f"the state directory {state_dir} belongs to another user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(f"the state directory {state_dir} is writable by others; "
                         f"run: chmod 700 {state_dir}")
    _check_ancestors(state_dir)


def _check_ancestors(state_dir: str) -> None:
    """Refuse a state directory that another user could swap for one of their own.

    Whoever can write a directory above it can rename it away and put their own
    in its place, between this check and any later write: the lock file would
    then be written where they can delete it, the audit files where they can
    erase them. So, as ssh does for its files, every directory above it (as
    written and as resolved) must be root's or ours, and not writable by others,
    unless it is sticky (``/tmp``: others cannot rename what is not theirs) or only
    group-writable by a group of ours alone (user private groups).
    """
    absolute = os.path.abspath(state_dir)
    seen: set[str] = set()
    for path in (absolute, os.path.realpath(absolute)):
        parent = os.path.dirname(path)
        while parent not in seen:
            seen.add(parent)
            try:
                info = os.stat(parent)
            except OSError as exc:
                failure = f"cannot check {parent}, above the state directory: {exc.strerror}"
                raise StoreError(failure) from None
            problem = _unsafe_ancestor(info)
            if problem is not None:
                raise StoreError(
                    f"the state directory {state_dir} is inside {parent}, which {problem}: "
                    "another user could replace the state directory (and unlock a locked "
                    "agent, or erase its audit log); choose a state directory "
                    "(COMPOZY_STATE_DIR or XDG_STATE_HOME) under directories only you and "
                    "root can write")
            if parent == os.path.dirname(parent):
                break
            parent = os.path.dirname(parent)


def _unsafe_ancestor(info: os.stat_result) -> str | None:
    """Why another user could rename entries of this directory, or None."""
    if info.st_uid not in (0, os.getuid()):
        return f"belongs to uid {info.st_uid}"
    if info.st_mode & stat.S_ISVTX:
        return None  # sticky: nobody else may rename or delete entries they do not own
    if info.st_mode & stat.S_IWOTH:
        return "anyone may write"
    if info.st_mode & stat.S_IWGRP and not _group_is_only_us(info.st_gid):
        return f"group {info.st_gid} may write"
    return None


def _group_is_only_us(gid: int) -> bool:
    """Whether ``gid`` is a group of ours alone (a user private group), as ssh allows."""
    import grp
    import pwd

    try:
        group = grp.getgrgid(gid)
        me = pwd.getpwuid(os.getuid())
    except KeyError:
        return False
    members = set(group.gr_mem)
    return members == {me.pw_name} or (not members and gid == me.pw_gid)


def _loading_reason(exc: BaseException) -> str:
    """Why a keyring backend could not be loaded or chosen.

    No secret has been handled yet at that point, so the backend's own words
    may be shown (``keyring`` explains non-viable backends in them), cut short.
    """
    reason = _plain_reason(exc)
    oserror = next((link for link in _chain(exc) if isinstance(link, OSError)), None)
    if oserror is not None and sys.platform.startswith("linux"):
        # secretstorage lets the socket's error through when the bus cannot be reached.
        return ("Secret Service not available: cannot connect to the D-Bus session bus "
                f"({oserror.strerror or type(oserror).__name__})")
    message = " ".join(str(exc).split())
    if reason.startswith("unexpected ") and message:
        return message[:200]
    return reason


def _no_backend_reason() -> str:
    """Why ``keyring`` found no backend, as precisely as can be said."""
    forced = os.environ.get("PYTHON_KEYRING_BACKEND")
    if forced:
        return f"PYTHON_KEYRING_BACKEND={forced} offers no keyring"
    if not sys.platform.startswith("linux"):
        return "the keyring package found no backend"
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
        bus = os.path.join(runtime_dir, "bus") if runtime_dir else None
        if bus is not None and os.path.exists(bus):
            return ("Secret Service not available: DBUS_SESSION_BUS_ADDRESS is not set, "
                    f"though a session bus is at {bus} (export "
                    f"DBUS_SESSION_BUS_ADDRESS=unix:path={bus})")
        return "Secret Service not available: there is no D-Bus session bus (as over SSH)"
    try:
        from keyring.backends import SecretService

        SecretService.Keyring.priority  # noqa: B018  # raises, saying why
    except Exception as exc:
        reason = _loading_reason(exc)
    else:
        reason = "the keyring package found no usable backend"
    return reason if reason.startswith("Secret Service") else (
        f"Secret Service not available: {reason}")


#: The keyring backend naming the Secret Service (``PYTHON_KEYRING_BACKEND``).
_SECRET_SERVICE_BACKEND: Final = "keyring.backends.SecretService.Keyring"


def _direct_secret_service() -> Any:
    """The Secret Service client of :mod:`compozy_agent.secretservice`, or None where the
    ``keyring`` package chooses: not Linux, another backend asked for (by
    ``PYTHON_KEYRING_BACKEND`` or keyring's own config file), a KDE session
    (keyring prefers KWallet there), no session bus address, no jeepney."""
    if not sys.platform.startswith("linux") or not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return None
    forced = os.environ.get("PYTHON_KEYRING_BACKEND", "").strip()
    if forced:
        if forced != _SECRET_SERVICE_BACKEND:
            return None
    elif "KDE" in os.environ.get("XDG_CURRENT_DESKTOP", "").upper() or os.path.exists(
            _keyring_config_file()):
        return None
    try:
        from compozy_agent.secretservice import SecretServiceSecrets
    except ImportError:
        return None
    return SecretServiceSecrets(SERVICE)


def _keyring_config_file() -> str:
    """keyring's ``keyringrc.cfg``, where a person may choose a backend (Linux's place)."""
    config_home = os.environ.get("XDG_CONFIG_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".config")
    return os.path.join(config_home, "python_keyring", "keyringrc.cfg")


def _no_secret_service(exc: BaseException) -> bool:
    """``exc`` says there is no Secret Service (checked by name: the module may be absent)."""
    return any(type(link).__name__ == "SecretServiceUnavailable"
               and type(link).__module__ == "compozy_agent.secretservice" for link in _chain(exc))


def _load_keyring() -> Any:
    """``keyring``'s backend, detected on first use (D-Bus calls); raises with a reason."""
    try:
        import keyring
        import keyring.backends.fail

        backend = keyring.get_keyring()
    except Exception as exc:
        # An explicit PYTHON_KEYRING_BACKEND whose backend is not viable raises here.
        reason = _loading_reason(exc)
    else:
        chained = getattr(backend, "backends", None)
        if isinstance(backend, keyring.backends.fail.Keyring) or (
            isinstance(chained, list) and not chained
        ):
            reason = _no_backend_reason()
        else:
            return backend
    raise SecretStoreUnavailable(reason)


def _probe_keyring() -> KeyringSecrets:
    """The keyring, once it has stored, returned and deleted a probe entry.

    Blocking, and may hang on a locked Secret Service: run under a deadline.
    Raises :class:`SecretStoreUnavailable` with a plain reason.
    """
    return _probe(KeyringSecrets(_load_keyring()))


class _ProbedBackend(SecretBackend, Protocol):
    @property
    def description(self) -> str: ...


_Probed = TypeVar("_Probed", bound=_ProbedBackend)


def _probe(candidate: _Probed) -> _Probed:
    """``candidate``, once it has stored, returned and deleted a probe entry (blocking)."""
    expected = secrets.token_hex(16)
    try:
        candidate.put(PROBE_USER, expected)
        read_back = candidate.get(PROBE_USER)
        candidate.delete(PROBE_USER)
    except Exception as exc:
        if _no_secret_service(exc):
            raise  # the caller asks the keyring package instead
        reason = f"{_plain_reason(exc)} ({candidate.description})"
    else:
        if read_back == expected:
            return candidate
        reason = f"{candidate.description} did not return the entry it was given"
    raise SecretStoreUnavailable(reason)


async def open_store(
    choice: StorageChoice,
    state_dir: str,
    *,
    probe_timeout: float = PROBE_TIMEOUT,
    call_timeout: float = CALL_TIMEOUT,
    loaded: Callable[[], object] | None = None,
) -> SessionStore:
    """The store ``choice`` asks for (see :data:`StorageChoice`).

    Creates ``state_dir`` (0700) if needed. ``auto`` and ``keyring`` probe the
    keyring once, for at most ``probe_timeout`` seconds; ``auto`` then falls
    back to memory and says why in ``info.detail``, ``keyring`` raises
    :class:`SecretStoreUnavailable`. Raises :class:`StoreError` for an unusable
    state directory.

    ``loaded`` is called (in the event loop, possibly more than once) once the
    keyring package is imported and its backend chosen, or was not needed, or
    failed to load: from then on the probe
    mostly waits on D-Bus, so the agent's start imports the rest meanwhile.
    """
    try:
        return await _open_store(choice, state_dir, probe_timeout, call_timeout, loaded)
    finally:
        if loaded is not None:
            loaded()  # also when there was nothing to load, or loading failed


async def _open_store(
    choice: StorageChoice,
    state_dir: str,
    probe_timeout: float,
    call_timeout: float,
    loaded: Callable[[], object] | None,
) -> SessionStore:
    prepare_state_dir(state_dir)
    if choice == "memory":
        return SessionStore(state_dir, MemorySecrets(), "storage: memory in the config",
                            call_timeout=call_timeout)
    if choice == "file":
        path = os.path.join(state_dir, SECRETS_FILE)
        return SessionStore(state_dir, FileSecrets(path),
                            f"plaintext file {path} (storage: file in the config)",
                            call_timeout=call_timeout)
    calls = _CallThread("compozy-agent keyring")
    started = time.monotonic()
    direct = _direct_secret_service()
    if direct is not None:
        if loaded is not None:
            loaded()  # nothing heavy was imported: the agent's start goes on meanwhile
        try:
            probed = await calls.run(lambda: _probe(direct), probe_timeout)
        except _Deadline:
            reason = f"the keyring did not answer within {probe_timeout:g} s (locked or hung?)"
        except SecretStoreUnavailable as exc:
            reason = str(exc)
        except Exception as exc:
            if not _no_secret_service(exc):
                raise
            reason = ""  # no Secret Service at all: the keyring package looks further
        else:
            log.debug("keyring probe passed: %s", probed.description)
            return SessionStore(state_dir, probed, probed.description,
                                call_timeout=call_timeout, _calls=calls)
        if reason:
            return _without_keyring(choice, state_dir, reason, call_timeout)
        await calls.run(direct.close, probe_timeout)
    try:
        candidate = KeyringSecrets(await calls.run(_load_keyring, probe_timeout))
        if loaded is not None:
            loaded()
        left = max(0.0, probe_timeout - (time.monotonic() - started))
        keyring_secrets = await calls.run(lambda: _probe(candidate), left)
    except _Deadline:
        reason = f"the keyring did not answer within {probe_timeout:g} s (locked or hung?)"
    except SecretStoreUnavailable as exc:
        reason = str(exc)
    except Exception as exc:  # a keyring backend may raise anything while loading
        reason = f"the keyring failed: {_loading_reason(exc)}"
    else:
        log.debug("keyring probe passed: %s", keyring_secrets.description)
        return SessionStore(state_dir, keyring_secrets, keyring_secrets.description,
                            call_timeout=call_timeout, _calls=calls)
    return _without_keyring(choice, state_dir, reason, call_timeout)


def _without_keyring(choice: StorageChoice, state_dir: str, reason: str,
                     call_timeout: float) -> SessionStore:
    """Memory for ``auto``; for ``keyring``, :class:`SecretStoreUnavailable` saying ``reason``."""
    if choice == "keyring":
        raise SecretStoreUnavailable(
            f"storage: keyring is set in the config, but there is no working keyring: {reason}; "
            "fix the keyring, or set storage: memory (or file) in the config")
    log.warning("no working keyring (%s); sessions are kept in memory only", reason)
    return SessionStore(state_dir, MemorySecrets(), f"no working keyring: {reason}",
                        call_timeout=call_timeout)
