"""Locking the agent with a passphrase, as ``ssh-add -x`` / ``ssh-add -X`` do.

While locked the agent hands out no token and runs no operation but
``hello``, ``status`` and ``unlock``; sessions stay in memory and keep being
refreshed, so unlocking is instant. The passphrase is kept only as a salted
scrypt hash. Each wrong passphrase doubles the delay before the next attempt
is even checked (0.5 s, 1 s, 2 s ... at most :data:`MAX_DELAY`), and attempts
are checked one at a time, so parallel guessing gains nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

import anyio

from compozy_agent.backend import OpError
from compozy_agent.clock import Clock
from compozy_client.errors import ErrorCode

FIRST_DELAY: Final = 0.5
MAX_DELAY: Final = 30.0
#: scrypt cost (RFC 7914): about 16 MiB and a few tens of milliseconds per check.
_SCRYPT: Final[dict[str, int]] = {
    "n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}
MIN_PASSPHRASE: Final = 1


def _hash(passphrase: str, salt: bytes) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, **_SCRYPT)


class AgentLock:
    """The agent's lock: locked or not, the passphrase hash, the wrong-attempt delay."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._salt: bytes | None = None
        self._hash: bytes | None = None
        self._failures = 0
        self._checking = anyio.Lock()

    def __repr__(self) -> str:
        return f"AgentLock(locked={self.locked}, failures={self._failures})"

    @property
    def locked(self) -> bool:
        return self._hash is not None

    @property
    def failures(self) -> int:
        """Wrong passphrases since the last lock or unlock."""
        return self._failures

    def delay(self) -> float:
        """How long the next attempt waits before it is checked."""
        if self._failures == 0:
            return 0.0
        return min(MAX_DELAY, FIRST_DELAY * 2.0 ** min(self._failures - 1, 16))

    async def lock(self, passphrase: str) -> None:
        if self.locked:
            raise OpError(ErrorCode.LOCKED, "the agent is already locked")
        if len(passphrase) < MIN_PASSPHRASE:
            raise OpError(ErrorCode.BAD_REQUEST, "the passphrase must not be empty")
        salt = secrets.token_bytes(16)
        digest = await anyio.to_thread.run_sync(_hash, passphrase, salt)
        if self.locked:  # locked by someone else meanwhile
            raise OpError(ErrorCode.LOCKED, "the agent is already locked")
        self._salt, self._hash, self._failures = salt, digest, 0

    async def unlock(self, passphrase: str) -> None:
        async with self._checking:  # one attempt at a time: the delay holds for all
            if not self.locked:
                raise OpError(ErrorCode.BAD_REQUEST, "the agent is not locked")
            await self._clock.sleep_until(self._clock.now() + self.delay())
            assert self._salt is not None and self._hash is not None
            digest = await anyio.to_thread.run_sync(_hash, passphrase, self._salt)
            if not hmac.compare_digest(digest, self._hash):
                self._failures += 1
                raise OpError(
                    ErrorCode.WRONG_PASSPHRASE,
                    f"wrong passphrase ({self._failures} in a row; the next attempt waits "
                    f"{self.delay():g} s)")
            self._salt = self._hash = None
            self._failures = 0
