"""Shared fixtures. Each real part has its fixture module under tests/support/."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = [
    "support.agent",
    "support.provider",
    "support.dot_provider",
    "support.keyring_fixture",
    "support.browser",
    "support.fake_provider",
]


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp (the loopback listener, the fake provider) runs on asyncio only."""
    return "asyncio"
