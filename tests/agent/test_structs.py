"""The agent's own records are msgspec Structs (cheaper to define at start than dataclasses,
issue 15 item 5) and keep what their dataclasses did: no repr, str or rich repr shows a
token, refresh token, API key, nonce or DPoP key; what was frozen stays frozen and compares
and hashes by value; the mutable ones stay mutable and unhashable; connections, sessions
and logins compare by identity."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from compozy_agent.http import HttpResponse
from compozy_agent.lifecycle import (
    DEFAULT_SLOT,
    AccessToken,
    AccessTokenSlot,
    DeleteRefreshToken,
    Fail,
    Grant,
    PersistRefreshToken,
    Ready,
    Secret,
    SessionLifecycle,
    StartRefresh,
    State,
    Status,
    WaitForRefresh,
    slot_key,
)
from compozy_agent.logins import Login
from compozy_agent.narrowing import ScopeWatch
from compozy_agent.peer import Peer
from compozy_agent.server import BoundSocket, Client, ExecGrant, ServerStats
from compozy_agent.sessions import Session
from compozy_agent.store import StoredSession

pytestmark = pytest.mark.anyio

TOKEN = "tok-5e1f0c9a-never-shown"
PEER = Peer(uid=1000, gid=1000, pid=4242)


class RevealingKey:
    """Stands in for a DPoP key whose own repr would give it away."""

    def __repr__(self) -> str:
        return f"RevealingKey({TOKEN})"


def access_token(value: str = TOKEN) -> AccessToken:
    return AccessToken(Secret(value), 100.0, 3700.0, ("openid", "read"))


def session_with_secrets() -> Session:
    meta = StoredSession(token_id="s1", profile="dev", kind="oidc", issuer="https://i.test")
    lifecycle = SessionLifecycle(100.0, refresh_token=TOKEN, access_token=access_token())
    return Session(meta, lifecycle, api_key=TOKEN, dpop_key=RevealingKey(),  # type: ignore[arg-type]
                   last_used_at=150.0)


def login_with_secrets() -> Login:
    return Login("l1", "dev", "https://i.test", "cli", ["openid"], [], 700.0, owner=PEER,
                 nonce=TOKEN, session=session_with_secrets(),
                 dpop_key=RevealingKey())  # type: ignore[arg-type]


def refresh_with_secret() -> StartRefresh:
    return StartRefresh(1, slot_key(["read"], "https://api.test"), Secret(TOKEN))


def token_response() -> HttpResponse:
    body = b'{"access_token": "' + TOKEN.encode() + b'", "refresh_token": "' + \
        TOKEN.encode() + b'"}'
    return HttpResponse(200, {"content-type": "application/json"}, body, 101.0, 100.0)


#: Every record that holds a secret, made in the test (a Login needs the event loop).
CARRYING_SECRETS: dict[str, Callable[[], object]] = {
    "AccessToken": access_token,
    "Ready": lambda: Ready(access_token(), refresh_with_secret()),
    "StartRefresh": refresh_with_secret,
    "PersistRefreshToken": lambda: PersistRefreshToken(2, Secret(TOKEN)),
    "AccessTokenSlot": lambda: AccessTokenSlot(DEFAULT_SLOT, access_token(), refresh_due_at=2800.0),
    "HttpResponse": token_response,
    "Session": session_with_secrets,
    "Login": login_with_secrets,
}


def every_rendering(record: object) -> str:
    """What logs, tracebacks and pretty-printers (rich reads ``__rich_repr__``) would show."""
    shown = [repr(record), str(record), f"{record}", f"{record!r}", repr([record])]
    rich_repr = getattr(record, "__rich_repr__", None)
    if rich_repr is not None:
        shown += [repr(list(rich_repr())), str(list(rich_repr()))]
    return "\n".join(shown)


@pytest.mark.parametrize("make", list(CARRYING_SECRETS.values()), ids=list(CARRYING_SECRETS))
async def test_no_rendering_of_a_record_shows_its_secret(make: Callable[[], object]) -> None:
    record = make()
    shown = every_rendering(record)
    assert TOKEN not in shown, shown
    assert shown.startswith(type(record).__name__ + "("), shown  # a real repr, not a blank


async def test_the_reprs_that_leave_fields_out_still_show_the_rest() -> None:
    session = repr(session_with_secrets())
    assert session.startswith("Session(meta=StoredSession(token_id='s1'")
    assert "last_used_at=150.0, active=True)" in session and "api_key" not in session
    login = repr(login_with_secrets())
    assert login.startswith("Login(login_id='l1', profile='dev', issuer='https://i.test'")
    assert "token_binding='bearer')" in login and "nonce" not in login
    assert "dpop_key" not in login and "session=Session(" in login
    client = repr(Client(PEER, "exec"))
    assert client.startswith("Client(peer=Peer(uid=1000, gid=1000, pid=4242), kind='exec'")
    assert "sock" not in client and client.endswith("timed_out=False, grant=None)")


async def test_a_connection_and_its_exec_grant_render_despite_the_cycle() -> None:
    grant = ExecGrant("dev", frozenset({"read"}), None, "/run/x.sock", 7)
    client = Client(PEER, "exec", grant=grant)
    grant.clients.add(client)
    assert "clients={Client(" in repr(grant) and "grant=..." in repr(grant)
    assert repr(client).count("Client(") == 1 and "clients={...}" in repr(client)


FROZEN: list[Callable[[], object]] = [
    access_token,
    lambda: Grant.of(["openid", "read"], ["https://api.test"]),
    lambda: Ready(access_token(), None),
    lambda: StartRefresh(3, DEFAULT_SLOT, Secret("rt")),
    lambda: WaitForRefresh(4, 50.0),
    lambda: Fail("bad_request", "no"),
    lambda: PersistRefreshToken(5, Secret("rt")),
    DeleteRefreshToken,
    lambda: Status(State.FRESH, 3700.0, True, True, None, None, None, 2800.0, False, None, ()),
    lambda: Peer(uid=1, gid=2, pid=None),
    lambda: HttpResponse(204, {}, b"", 1.0),
]


@pytest.mark.parametrize("make", FROZEN, ids=lambda make: type(make()).__name__)
def test_frozen_records_stay_frozen_and_compare_and_hash_by_value(make: Callable[[], Any]) -> None:
    one, two = make(), make()
    assert one == two and one is not two
    if not isinstance(one, HttpResponse):  # its headers are a dict: never hashable
        assert hash(one) == hash(two) and len({one, two}) == 1
    for name in type(one).__match_args__:
        with pytest.raises(AttributeError):
            setattr(one, name, None)
    with pytest.raises(AttributeError):
        one.not_a_field = 1


def test_changing_one_field_makes_a_frozen_record_unequal() -> None:
    assert access_token("a") != access_token("b")
    assert WaitForRefresh(1) != WaitForRefresh(1, 2.0) and WaitForRefresh(1) == WaitForRefresh(1)
    assert Fail("a", "m") != Fail("b", "m")
    assert Peer(uid=1, gid=2, pid=3) != Peer(uid=1, gid=2, pid=None)


def test_mutable_records_stay_mutable_unhashable_and_compare_by_value() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        makers: list[Callable[[], Any]] = [
            lambda: AccessTokenSlot(DEFAULT_SLOT),
            lambda: ScopeWatch(frozenset({"read"})),
            lambda: BoundSocket(sock, "/run/a.sock"),
            ServerStats,
        ]
        for make in makers:
            one, two = make(), make()
            assert one == two
            with pytest.raises(TypeError):
                hash(one)
        slot = AccessTokenSlot(DEFAULT_SLOT)
        slot.token = access_token()
        assert slot != AccessTokenSlot(DEFAULT_SLOT) and slot.attempt_forced is True
        stats = ServerStats()
        stats.errors_by_code["x"] = 1
        assert ServerStats().errors_by_code == {}  # each gets its own dict


async def test_connections_sessions_and_logins_compare_by_identity() -> None:
    makers: list[Callable[[], Any]] = [
        lambda: Client(PEER),
        lambda: ExecGrant("dev", None, None, "/run/x.sock", 7),
        session_with_secrets,
        login_with_secrets,
    ]
    for make in makers:
        one, two = make(), make()
        assert one == one and one != two
        assert len({one, two, one}) == 2
    first, second = Client(PEER), Client(PEER)
    assert first.process is not second.process  # each gets its own
    grants = [ExecGrant("a", None, None, "/p", 1) for _ in range(2)]
    assert grants[0].clients is not grants[1].clients


async def test_each_session_and_login_gets_its_own_events() -> None:
    session, other = session_with_secrets(), session_with_secrets()
    assert session.changed is not other.changed
    login = login_with_secrets()
    assert login.done is not login.released
    assert isinstance(login.cancel_scope, anyio.CancelScope)


def test_records_match_by_keyword_and_position() -> None:
    decision: object = Ready(access_token(), None)
    match decision:
        case Ready(token=token, background=None):
            assert token.value.matches(TOKEN)
        case _:
            pytest.fail(f"no match: {decision}")
    match WaitForRefresh(9, 12.0):
        case WaitForRefresh(op_id, until):
            assert (op_id, until) == (9, 12.0)
