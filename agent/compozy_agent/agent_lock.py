"""Locking the agent with a passphrase, as ``ssh-add -x`` / ``ssh-add -X`` do.

While locked the agent hands out no token and runs no operation but
``hello``, ``status`` and ``unlock``; sessions stay in memory and keep being
refreshed, so unlocking is instant. The passphrase is kept only as a salted
scrypt hash. Each wrong passphrase doubles the time before the next attempt
is even checked (0.5 s, 1 s, 2 s ... at most :data:`MAX_DELAY`); an attempt
that comes sooner is refused at once with ``busy`` and the time left, and
attempts are checked one at a time, so parallel guessing gains nothing. Early
attempts are refused rather than queued: a queue of them (a retry loop, many
guessers at once) would make the owner's right passphrase wait out every
delay ahead of it, where now it waits for one at most.

The lock outlives the agent. Locking writes :data:`LOCK_FILE` in the state
directory (salt, scrypt hash and parameters, wrong attempts so far; 0600,
written atomically by ``store.atomic_write``) and unlocking removes it; an
agent that finds it at start starts locked, with the same count of wrong
attempts. Rules:

* The file is written before ``lock`` is answered, and each wrong attempt is
  counted in it before ``wrong_passphrase`` is answered: killing the agent
  (SIGTERM, SIGKILL, a crash, a service manager's restart) neither unlocks it
  nor resets the delay.
* The delay runs from the last wrong attempt, and from the start of an agent
  that found wrong attempts on disk, so the count alone carries it across a
  restart; no "next attempt at" time is stored (a wall clock can be stepped,
  and a stored time would allow nothing the count does not).
* Fail closed: a lock file that cannot be read (corrupt, a symbolic link,
  another user's, from a newer agent) keeps the agent locked, and no passphrase
  can unlock it, because there is no hash to check against. The log and
  ``status`` name the file and the way out: look at it, delete it, restart the
  agent.
* A lock that cannot be written still locks the agent in memory (locking more
  is never unsafe); the log and ``status`` say it will not survive a restart.

What it does not stop: anyone running as you can delete the file and restart
the agent, just as they can read the keyring directly (``docs/security.md``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from typing import Final

import anyio
import anyio.to_thread
import msgspec

from compozy_agent.backend import OpError
from compozy_agent.clock import Clock
from compozy_agent.store import atomic_write, read_own_file, remove_interrupted_writes
from compozy_client.errors import ErrorCode

log = logging.getLogger("compozy_agent.lock")

FIRST_DELAY: Final = 0.5
MAX_DELAY: Final = 30.0
#: scrypt cost (RFC 7914): about 16 MiB and a few tens of milliseconds per check.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_MAXMEM: Final = 64 * 1024 * 1024
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MIN_PASSPHRASE: Final = 1
#: The lock's file in the state directory; present exactly while the agent is locked.
LOCK_FILE: Final = "agent-lock.json"
LOCK_FILE_VERSION: Final = 1
#: A lock file is a few hundred bytes; anything much larger is not one.
_MAX_FILE_BYTES: Final = 4096


class _LockFile(msgspec.Struct, forbid_unknown_fields=False):
    """What :data:`LOCK_FILE` holds. Never the passphrase."""

    version: int
    salt: str  # hex
    hash: str  # hex, scrypt(passphrase, salt, n, r, p)
    n: int
    r: int
    p: int
    failures: int = 0
    locked_at: float | None = None


def _hash(passphrase: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
          p: int = SCRYPT_P) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM,
                          dklen=HASH_BYTES)


class LockFileUnreadable(Exception):
    """The lock file exists but cannot be used; the agent stays locked."""


class AgentLock:
    """The agent's lock: locked or not, the passphrase hash, the wrong-attempt delay.

    ``path`` is where the lock is kept while locked (None: in memory only).
    Build it with :meth:`load` to pick up a lock an earlier agent left.
    """

    def __init__(self, clock: Clock, path: str | None = None) -> None:
        self._clock = clock
        self.path = path
        self._salt: bytes | None = None
        self._hash: bytes | None = None
        self._cost = (SCRYPT_N, SCRYPT_R, SCRYPT_P)
        self._failures = 0
        #: When the next attempt may be checked (clock.now()); None: at once.
        self._next_check_at: float | None = None
        self._locked_at: float | None = None
        #: Why the lock cannot be opened (an unreadable lock file); None when it can.
        self.unusable: str | None = None
        #: Why the lock is not on disk although the agent is locked; None otherwise.
        self.not_saved: str | None = None
        self._checking = anyio.Lock()

    def __repr__(self) -> str:
        return f"AgentLock(locked={self.locked}, failures={self._failures})"

    @classmethod
    def load(cls, clock: Clock, path: str) -> AgentLock:
        """The lock as an earlier agent left it at ``path``: unlocked when there is no file.

        Blocking (reads a small file); call it before serving, as it also removes the
        temp file of a write a crash interrupted.
        """
        remove_interrupted_writes(os.path.dirname(path) or ".", (os.path.basename(path),))
        lock = cls(clock, path)
        try:
            document = _read_lock_file(path)
        except LockFileUnreadable as exc:
            lock.unusable = (
                f"the lock file {path} cannot be used ({exc}), so the agent stays locked and "
                "no passphrase can unlock it; if you did not expect it, look at the file, "
                "then delete it and restart the agent")
            return lock
        if document is not None:
            lock._salt = bytes.fromhex(document.salt)
            lock._hash = bytes.fromhex(document.hash)
            lock._cost = (document.n, document.r, document.p)
            lock._failures = document.failures
            if lock._failures:
                lock._next_check_at = clock.now() + lock.delay()
            lock._locked_at = document.locked_at
        return lock

    @property
    def locked(self) -> bool:
        return self._hash is not None or self.unusable is not None

    @property
    def failures(self) -> int:
        """Wrong passphrases since the last lock or unlock."""
        return self._failures

    @property
    def locked_at(self) -> float | None:
        return self._locked_at

    def warnings(self) -> list[str]:
        """What ``status`` should say about the lock, if anything is wrong with it."""
        return [w for w in (self.unusable, self.not_saved) if w is not None]

    def delay(self) -> float:
        """How long after a wrong attempt the next one is checked."""
        if self._failures == 0:
            return 0.0
        return min(MAX_DELAY, FIRST_DELAY * 2.0 ** min(self._failures - 1, 16))

    async def lock(self, passphrase: str) -> None:
        if self.locked:
            raise OpError(ErrorCode.LOCKED, "the agent is already locked")
        if len(passphrase) < MIN_PASSPHRASE:
            raise OpError(ErrorCode.BAD_REQUEST, "the passphrase must not be empty")
        salt = secrets.token_bytes(SALT_BYTES)
        digest = await anyio.to_thread.run_sync(_hash, passphrase, salt)
        if self.locked:  # locked by someone else meanwhile
            raise OpError(ErrorCode.LOCKED, "the agent is already locked")
        # Locked in memory first: no token goes out while the file is being written.
        self._salt, self._hash, self._failures = salt, digest, 0
        self._next_check_at = None
        self._cost = (SCRYPT_N, SCRYPT_R, SCRYPT_P)
        self._locked_at = self._clock.now()
        await self._save()

    async def unlock(self, passphrase: str) -> None:
        async with self._checking:  # one attempt at a time: the delay holds for all
            if self.unusable is not None:
                raise OpError(ErrorCode.LOCKED, self.unusable)
            if not self.locked:
                raise OpError(ErrorCode.BAD_REQUEST, "the agent is not locked")
            now = self._clock.now()
            left = self._check_wait(now)
            if left > 0:
                raise OpError(ErrorCode.BUSY, (
                    f"not checked: after {self._failures} wrong passphrase(s) the next attempt "
                    f"is checked only {self.delay():g} s after the last; try again in "
                    f"{math.ceil(left):.0f} s"), {"retry_after_seconds": f"{left:.3f}"})
            assert self._salt is not None and self._hash is not None
            digest = await anyio.to_thread.run_sync(_hash, passphrase, self._salt, *self._cost)
            if not hmac.compare_digest(digest, self._hash):
                self._failures += 1
                self._next_check_at = self._clock.now() + self.delay()
                await self._save()  # counted on disk before anyone hears of it
                raise OpError(
                    ErrorCode.WRONG_PASSPHRASE,
                    f"wrong passphrase ({self._failures} in a row; the next attempt is checked "
                    f"in {self.delay():g} s at the earliest)")
            await self._remove()
            self._salt = self._hash = self._locked_at = self._next_check_at = None
            self._failures = 0
            self.not_saved = None

    def _check_wait(self, now: float) -> float:
        """Seconds until an attempt may be checked; never more than the current delay,
        so a wall clock stepped back cannot stretch it."""
        if self._next_check_at is None:
            return 0.0
        return min(self._next_check_at - now, self.delay())

    async def _save(self) -> None:
        if self.path is None:
            return
        assert self._salt is not None and self._hash is not None
        n, r, p = self._cost
        document = _LockFile(version=LOCK_FILE_VERSION, salt=self._salt.hex(),
                             hash=self._hash.hex(), n=n, r=r, p=p, failures=self._failures,
                             locked_at=self._locked_at)
        try:
            await anyio.to_thread.run_sync(atomic_write, self.path, msgspec.json.encode(document))
        except OSError as exc:
            self.not_saved = (f"the lock could not be saved to {self.path} "
                              f"({exc.strerror or type(exc).__name__}): it will not survive a "
                              "restart of the agent")
            log.error("%s", self.not_saved)
        else:
            self.not_saved = None

    async def _remove(self) -> None:
        if self.path is None:
            return
        try:
            await anyio.to_thread.run_sync(os.unlink, self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Unlocked now; an agent started later finds the file and starts locked (fail closed).
            log.error("unlocked, but the lock file %s could not be removed (%s): the next agent "
                      "will start locked", self.path, exc.strerror)


def _read_lock_file(path: str) -> _LockFile | None:
    """The lock file's contents; None when there is none. Raises :class:`LockFileUnreadable`."""
    try:
        found = read_own_file(path, _MAX_FILE_BYTES)
    except OSError as exc:
        raise LockFileUnreadable(exc.strerror or type(exc).__name__) from None
    if found is None:
        return None
    data = found[0]
    try:
        document = msgspec.json.decode(data, type=_LockFile)
    except msgspec.DecodeError:
        raise LockFileUnreadable("it is corrupt") from None
    if document.version != LOCK_FILE_VERSION:
        raise LockFileUnreadable(f"version {document.version}, which this agent does not read")
    if not _sane(document):
        raise LockFileUnreadable("it is corrupt")
    return document


def _sane(document: _LockFile) -> bool:
    try:
        salt, digest = bytes.fromhex(document.salt), bytes.fromhex(document.hash)
    except ValueError:
        return False
    # Bounds on the cost: above, a planted file must not make each check take minutes or
    # GiB; below, never less memory or work than this agent's own (a file with n=2 makes
    # every guess at its hash, online or offline, cost microseconds).
    n, r, p = document.n, document.r, document.p
    return (len(salt) == SALT_BYTES and len(digest) == HASH_BYTES
            and document.failures >= 0
            and 2 <= n <= 2**20 and n & (n - 1) == 0
            and 1 <= r <= 32 and 1 <= p <= 16
            and 128 * r * n <= _MAXMEM // 2
            and n * r >= SCRYPT_N * SCRYPT_R and n * r * p >= SCRYPT_N * SCRYPT_R * SCRYPT_P)


def describe_locked_at(lock: AgentLock) -> str:
    """``since 2026-11-30 12:00:00 UTC`` for a log line, or empty when unknown."""
    if lock.locked_at is None:
        return ""
    return " since " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lock.locked_at))
