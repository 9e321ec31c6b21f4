"""What the socket server asks of the agent's session logic, and how it fails.

The server owns framing, peers and dispatch; a :class:`Backend` owns what each
op does. Ops that fail raise :class:`OpError` with a wire code from
:class:`compozy_client.errors.ErrorCode`; its message goes to the client as is,
so it must never contain a token or key.
"""

from __future__ import annotations

from typing import Protocol

from compozy_agent.peer import Peer
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode


class OpError(Exception):
    """An op failed in a way the client should be told about."""

    def __init__(self, code: str, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


def not_implemented(op: str) -> OpError:
    return OpError(ErrorCode.NOT_IMPLEMENTED, f"op {op!r} is not implemented by this agent yet")


class Backend(Protocol):
    """The session side of the agent. Every method may raise :class:`OpError`."""

    def storage_info(self) -> p.StorageInfo: ...

    def warnings(self) -> list[str]: ...

    def clock_skew(self) -> float | None: ...

    async def sessions(self, profile: str | None) -> list[p.SessionInfo]: ...

    async def token(self, request: p.Token, peer: Peer) -> p.TokenResult: ...

    async def refresh(self, request: p.Refresh) -> p.RefreshResult: ...

    async def revoke(self, request: p.Revoke) -> p.RevokeResult: ...

    async def revoke_all(self, request: p.RevokeAll) -> p.RevokeResult: ...

    async def logout(self, request: p.Logout) -> p.RevokeResult: ...

    async def login_start(self, request: p.LoginStart) -> p.LoginStartResult: ...

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult: ...

    async def login_cancel(self, request: p.LoginCancel) -> p.Empty: ...

    async def store_api_key(self, request: p.StoreApiKey) -> p.SessionInfo: ...


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

    async def refresh(self, request: p.Refresh) -> p.RefreshResult:
        raise not_implemented("refresh")

    async def revoke(self, request: p.Revoke) -> p.RevokeResult:
        raise not_implemented("revoke")

    async def revoke_all(self, request: p.RevokeAll) -> p.RevokeResult:
        raise not_implemented("revoke_all")

    async def logout(self, request: p.Logout) -> p.RevokeResult:
        raise not_implemented("logout")

    async def login_start(self, request: p.LoginStart) -> p.LoginStartResult:
        raise not_implemented("login_start")

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult:
        raise not_implemented("login_wait")

    async def login_cancel(self, request: p.LoginCancel) -> p.Empty:
        raise not_implemented("login_cancel")

    async def store_api_key(self, request: p.StoreApiKey) -> p.SessionInfo:
        raise not_implemented("store_api_key")
