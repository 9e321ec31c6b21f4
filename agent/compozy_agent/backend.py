"""What the socket server asks of the agent's session logic, and how it fails.

The server owns framing, peers and dispatch; a :class:`Backend` owns what each
op does. Ops that fail raise :class:`OpError` with a wire code from
:class:`compozy_client.errors.ErrorCode`; its message goes to the client, so it
must never contain a token or key. It is made one printable line (control
characters escaped, ``safetext.one_line``) whatever went into it: messages
quote provider text, and the client prints them on a terminal.
"""

from __future__ import annotations

from typing import Protocol

from compozy_agent.peer import Peer
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode
from compozy_client.safetext import one_line

#: The longest message sent to a client (a revocation names each session's reason).
MESSAGE_LIMIT = 4000


class OpError(Exception):
    """An op failed in a way the client should be told about."""

    def __init__(self, code: str, message: str, details: dict[str, str] | None = None) -> None:
        message = one_line(message, MESSAGE_LIMIT)
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = {key: one_line(value, MESSAGE_LIMIT)
                        for key, value in (details or {}).items()}


def not_implemented(op: str) -> OpError:
    return OpError(ErrorCode.NOT_IMPLEMENTED, f"op {op!r} is not implemented by this agent yet")


class Backend(Protocol):
    """The session side of the agent. Every method may raise :class:`OpError`."""

    def storage_info(self) -> p.StorageInfo: ...

    def warnings(self) -> list[str]: ...

    def clock_skew(self) -> float | None: ...

    async def sessions(self, profile: str | None) -> list[p.SessionInfo]: ...

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult: ...

    async def dpop_proof(self, request: p.DpopProof, peer: Peer) -> p.DpopProofResult: ...

    async def refresh(self, request: p.Refresh) -> p.RefreshResult: ...

    async def revoke(self, request: p.Revoke) -> p.RevokeResult: ...

    async def revoke_all(self, request: p.RevokeAll) -> p.RevokeResult: ...

    async def logout(self, request: p.Logout) -> p.RevokeResult: ...

    async def login_start(
        self, request: p.LoginStart, owner: object = None
    ) -> p.LoginStartResult:
        """Start a login; ``owner`` is the connection that asked (see connection_closed)."""
        ...

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult: ...

    async def login_cancel(self, request: p.LoginCancel) -> p.Empty: ...

    async def store_api_key(self, request: p.StoreApiKey) -> p.SessionInfo: ...

    def connection_closed(self, owner: object) -> None:
        """The connection ``owner`` has closed: end what it started and no one else can finish."""
        ...


class EmptyBackend:
    """A backend with no sessions: reads work, everything else is not implemented.

    It lets the server, CLI and packaging be built and tested on their own.
    """

    def storage_info(self) -> p.StorageInfo:
        return p.StorageInfo(backend="memory", detail="no session backend", persistent=False)

    def warnings(self) -> list[str]:
        return []

    def clock_skew(self) -> float | None:
        return None

    async def sessions(self, profile: str | None) -> list[p.SessionInfo]:
        return []

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult:
        raise not_implemented("token")

    async def dpop_proof(self, request: p.DpopProof, peer: Peer) -> p.DpopProofResult:
        raise not_implemented("dpop_proof")

    async def refresh(self, request: p.Refresh) -> p.RefreshResult:
        raise not_implemented("refresh")

    async def revoke(self, request: p.Revoke) -> p.RevokeResult:
        raise not_implemented("revoke")

    async def revoke_all(self, request: p.RevokeAll) -> p.RevokeResult:
        raise not_implemented("revoke_all")

    async def logout(self, request: p.Logout) -> p.RevokeResult:
        raise not_implemented("logout")

    async def login_start(
        self, request: p.LoginStart, owner: object = None
    ) -> p.LoginStartResult:
        raise not_implemented("login_start")

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult:
        raise not_implemented("login_wait")

    async def login_cancel(self, request: p.LoginCancel) -> p.Empty:
        raise not_implemented("login_cancel")

    async def store_api_key(self, request: p.StoreApiKey) -> p.SessionInfo:
        raise not_implemented("store_api_key")

    def connection_closed(self, owner: object) -> None:
        pass
