"""compozy_client: the `compozy` CLI and the library local tools use to get tokens.

    >>> from compozy_client import get_token
    >>> headers = {"Authorization": f"Bearer {get_token(profile='prod')}"}

Importing this package is cheap: the public names load on first use.
"""

from __future__ import annotations

# typing is not imported at run time (it costs as much as the rest of the token
# path); mypy treats a name TYPE_CHECKING bound to False as typing's.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentUnavailable",
    "CompozyError",
    "NotLoggedIn",
    "__version__",
    "async_get_token",
    "get_token",
]

if TYPE_CHECKING:
    from typing import Any

    from compozy_client.api import async_get_token, get_token
    from compozy_client.errors import AgentError, AgentUnavailable, CompozyError, NotLoggedIn

_LAZY = {
    "get_token": "compozy_client.api",
    "async_get_token": "compozy_client.api",
    "AgentError": "compozy_client.errors",
    "AgentUnavailable": "compozy_client.errors",
    "CompozyError": "compozy_client.errors",
    "NotLoggedIn": "compozy_client.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compozy_client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
