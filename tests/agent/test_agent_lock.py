"""The agent lock on a fake clock: passphrases, wrong ones answered ever slower, a lock
that outlives the agent, and token requests caught in flight by a lock."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from compozy_agent.agent_lock import FIRST_DELAY, LOCK_FILE, MAX_DELAY, AgentLock
from compozy_agent.backend import EmptyBackend, OpError
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import AccessToken, Secret, SessionLifecycle
from compozy_agent.manager import SessionManager
from compozy_agent.peer import Peer
from compozy_agent.server import AgentServer, Client
from compozy_agent.sessions import Session
from compozy_agent.store import MemorySecrets, SessionStore, StoredSession
from compozy_client import protocol as p
from support.clock import FakeClock
from support.fake_provider import Behaviour, FakeProvider

pytestmark = pytest.mark.anyio


async def test_lock_then_unlock_with_the_same_passphrase() -> None:
    lock = AgentLock(FakeClock())
    assert not lock.locked
    await lock.lock("correct horse")
    assert lock.locked
    assert "correct horse" not in repr(lock)
    await lock.unlock("correct horse")
    assert not lock.locked


async def test_locking_twice_and_unlocking_an_unlocked_agent_are_errors() -> None:
    lock = AgentLock(FakeClock())
    with pytest.raises(OpError) as caught:
        await lock.unlock("x")
    assert caught.value.code == "bad_request"
    await lock.lock("x")
    with pytest.raises(OpError) as caught:
        await lock.lock("y")
    assert caught.value.code == "locked"
    with pytest.raises(OpError) as caught:
        await AgentLock(FakeClock()).lock("")
    assert caught.value.code == "bad_request"


async def test_wrong_passphrases_double_the_wait_before_the_next_check() -> None:
    clock = FakeClock()
    lock = AgentLock(clock)
    await lock.lock("right")
    with pytest.raises(OpError) as caught:
        await lock.unlock("wrong")  # the first attempt is checked at once
    assert caught.value.code == "wrong_passphrase"
    assert "right" not in caught.value.message and "wrong" in caught.value.message
    assert lock.delay() == FIRST_DELAY

    # Sooner than the delay, even the right passphrase is not checked: refused, not queued.
    clock.advance(FIRST_DELAY / 2)
    with pytest.raises(OpError) as early:
        await lock.unlock("right")
    assert early.value.code == "busy" and "try again in 1 s" in early.value.message
    assert lock.locked and lock.failures == 1  # an unchecked attempt counts for nothing
    clock.advance(FIRST_DELAY / 2)
    await lock.unlock("right")
    assert lock.failures == 0 and not lock.locked


async def test_the_delay_grows_to_its_cap() -> None:
    clock = FakeClock()
    lock = AgentLock(clock)
    await lock.lock("right")
    delays = []
    for _ in range(9):
        clock.advance(lock.delay())
        await _expect_wrong(lock)
        delays.append(lock.delay())
    assert delays == [0.5, 1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]


async def test_parallel_guessers_get_one_check_and_the_owner_waits_one_delay_at_most() -> None:
    # A queue of early attempts would make the right passphrase wait out every delay
    # ahead of it (six wrong attempts at once once held the owner for 31.8 s).
    clock = FakeClock()
    lock = AgentLock(clock)
    await lock.lock("right")
    codes: list[str] = []

    async def guess() -> None:
        try:
            await lock.unlock("wrong")
        except OpError as exc:
            codes.append(exc.code)

    with anyio.fail_after(10):  # queued attempts would wait on the fake clock for ever
        async with anyio.create_task_group() as group:
            for _ in range(50):
                group.start_soon(guess)
    assert sorted(codes) == ["busy"] * 49 + ["wrong_passphrase"]
    assert lock.failures == 1
    start = clock.monotonic
    clock.advance(lock.delay())
    await lock.unlock("right")  # checked at once, whatever was refused before
    assert not lock.locked and clock.monotonic - start == FIRST_DELAY


async def _expect_wrong(lock: AgentLock) -> None:
    with pytest.raises(OpError):
        await lock.unlock("wrong")


# --------------------------------------------------------------------------
# The lock outlives the agent.


async def test_the_lock_is_kept_on_disk_until_unlocked(tmp_path: Path) -> None:
    clock = FakeClock()
    path = str(tmp_path / LOCK_FILE)
    first = AgentLock.load(clock, path)
    assert not first.locked and not os.path.exists(path)
    await first.lock("correct horse")
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert b"correct horse" not in Path(path).read_bytes()

    # The next agent (as after SIGTERM or SIGKILL) starts locked, and counts on.
    second = AgentLock.load(clock, path)
    assert second.locked and second.failures == 0 and not second.warnings()
    await _expect_wrong(second)
    third = AgentLock.load(clock, path)
    assert third.failures == 1 and third.delay() == FIRST_DELAY
    with pytest.raises(OpError) as early:  # the delay holds across the restart
        await third.unlock("correct horse")
    assert early.value.code == "busy"
    clock.advance(FIRST_DELAY)
    await third.unlock("correct horse")
    assert not third.locked and not os.path.exists(path)
    assert not AgentLock.load(clock, path).locked


def _corrupt(path: Path) -> None:
    path.write_bytes(b'{"version": 1, "salt": ')


def _symlink(path: Path) -> None:
    (path.parent / "elsewhere").write_text("{}")
    path.symlink_to(path.parent / "elsewhere")


def _directory(path: Path) -> None:
    path.mkdir()


def _newer(path: Path) -> None:
    path.write_text(json.dumps({"version": 2, "salt": "00" * 16, "hash": "00" * 32,
                                "n": 16384, "r": 8, "p": 1}))


def _too_costly(path: Path) -> None:
    path.write_text(json.dumps({"version": 1, "salt": "00" * 16, "hash": "00" * 32,
                                "n": 2**30, "r": 8, "p": 1}))


def _other_uid(path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    path.write_text("{}")
    os.chown(path, 65534, 65534)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [(_corrupt, "it is corrupt"), (_symlink, "it is a symbolic link"),
     (_directory, "not a regular file"), (_newer, "version 2"), (_too_costly, "it is corrupt"),
     (_other_uid, "belongs to uid 65534")],
    ids=["corrupt", "symlink", "directory", "newer", "too-costly", "other-uid"])
async def test_an_unusable_lock_file_keeps_the_agent_locked(
    tmp_path: Path, spoil: Callable[[Path], None], reason: str
) -> None:
    path = tmp_path / LOCK_FILE
    spoil(path)
    lock = AgentLock.load(FakeClock(), str(path))
    assert lock.locked  # fail closed
    [warning] = lock.warnings()
    assert str(path) in warning and reason in warning
    assert "delete it and restart the agent" in warning
    with pytest.raises(OpError) as caught:
        await lock.unlock("anything")
    assert caught.value.code == "locked" and "no passphrase can unlock it" in caught.value.message
    with pytest.raises(OpError) as caught:
        await lock.lock("anything")
    assert caught.value.code == "locked"
    assert path.is_symlink() or path.is_dir() or path.exists()  # left for the person to see


@pytest.mark.parametrize(("n", "r", "p"), [(2, 1, 1), (2**10, 8, 1), (2**14, 1, 16)],
                         ids=["n=2", "n=1024", "r=1"])
async def test_a_lock_file_cheaper_than_the_agents_own_keeps_it_locked(
    tmp_path: Path, n: int, r: int, p: int
) -> None:
    """A planted lock file whose scrypt cost is far below what the agent writes (each
    guess at the hash then costs microseconds) is refused like a corrupt one: before the
    fix, n=2 was taken as the lock and its passphrase unlocked the agent."""
    path = tmp_path / LOCK_FILE
    salt = bytes(16)
    digest = hashlib.scrypt(b"planted", salt=salt, n=n, r=r, p=p, dklen=32)
    path.write_text(json.dumps({"version": 1, "salt": salt.hex(), "hash": digest.hex(),
                                "n": n, "r": r, "p": p}))
    lock = AgentLock.load(FakeClock(), str(path))
    assert lock.locked
    [warning] = lock.warnings()
    assert "it is corrupt" in warning and "delete it and restart the agent" in warning
    with pytest.raises(OpError) as caught:
        await lock.unlock("planted")
    assert caught.value.code == "locked"


async def test_a_lock_that_cannot_be_saved_still_locks_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = AgentLock(FakeClock(), str(tmp_path / "missing" / LOCK_FILE))
    await lock.lock("x")
    assert lock.locked
    [warning] = lock.warnings()
    assert "will not survive a restart" in warning
    assert any("will not survive a restart" in r.message for r in caplog.records)
    await lock.unlock("x")
    assert not lock.locked and not lock.warnings()


# --------------------------------------------------------------------------
# A token request in flight when the lock arrives.


class _SlowBackend(EmptyBackend):
    """Hands out a token only when told to, as a slow refresh would."""

    def __init__(self) -> None:
        self.asked = anyio.Event()
        self.answer = anyio.Event()

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult:
        self.asked.set()
        await self.answer.wait()
        return p.TokenResult(access_token=TOKEN, token_id="t1", profile=request.profile)


TOKEN = "at-canary-0c41aa"


async def test_a_token_request_in_flight_when_the_lock_arrives_gets_locked() -> None:
    backend = _SlowBackend()
    server = AgentServer(backend, socket_path="/nonexistent", clock=FakeClock())
    client = Client(Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
    answers: list[p.Response] = []

    async def ask_token() -> None:
        answers.append(await server.respond(b'{"id": 1, "op": "token"}', client))

    async with anyio.create_task_group() as group:
        group.start_soon(ask_token)
        with anyio.fail_after(10):
            await backend.asked.wait()
        locked = await server.respond(b'{"id": 2, "op": "lock", "passphrase": "p"}', client)
        assert locked.ok
        backend.answer.set()
    [answer] = answers
    assert not answer.ok and answer.error is not None and answer.error.code == "locked"
    assert TOKEN not in repr(answer)
    [entry] = server.audit.recent(10)
    assert entry.outcome == "locked"


async def test_a_refresh_stalled_at_the_provider_when_the_lock_arrives_gives_no_token(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    clock = FakeClock()
    store = SessionStore(str(tmp_path), MemorySecrets())
    provider = ProviderClient(now=clock.now, timeout=30)
    manager = SessionManager(store, provider, clock=clock)
    server = AgentServer(manager, socket_path="/nonexistent", clock=clock)
    client = Client(Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
    fake_provider.then(Behaviour.hold(access_token=TOKEN))
    answers: list[p.Response] = []

    async def ask_token() -> None:
        answers.append(await server.respond(b'{"id": 1, "op": "token"}', client))

    try:
        async with anyio.create_task_group() as group:
            await group.start(manager.run)
            now = clock.now()
            await store.put_secret("s1", "refresh_token", "rt-0")
            await manager.logins.adopt(Session(
                StoredSession(token_id="s1", profile="default", kind="oidc",
                              issuer=fake_provider.issuer, client_id="cli", created_at=now),
                SessionLifecycle(now, refresh_token="rt-0", access_token=AccessToken(
                    Secret("old-at"), issued_at=now, expires_at=now + 3600))))
            clock.jump(4000)  # expired: the next token request must refresh
            group.start_soon(ask_token)
            await fake_provider.arrived(1)  # the refresh is at the provider, held
            assert (await server.respond(
                b'{"id": 2, "op": "lock", "passphrase": "p"}', client)).ok
            fake_provider.release()
            with anyio.fail_after(10):
                while not answers:
                    await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()
    [answer] = answers
    assert answer.error is not None and answer.error.code == "locked"
    assert TOKEN not in p.encode(answer).decode()
    assert [e.outcome for e in server.audit.recent(10)] == ["locked"]
