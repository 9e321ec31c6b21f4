"""Helpers for tests that run the session driver in-process."""

from __future__ import annotations

import anyio

from compozy_agent.sessions import SessionManager


async def settle(manager: SessionManager, timeout: float = 10.0) -> None:
    """Wait until no session has a refresh or persist in flight (HTTP is real I/O)."""
    with anyio.fail_after(timeout):
        for session in list(manager.by_id.values()):
            assert session.lifecycle is not None
            while session.lifecycle.in_flight is not None:
                await session.changed.wait()
