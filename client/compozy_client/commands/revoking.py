"""Revoking, for `compozy logout`, `compozy auth revoke` and `compozy auth revoke-all`:
send the request, and when the provider cannot be reached, ask before forgetting locally."""

from __future__ import annotations

from compozy_client.commands.common import EXIT_FAILURE, EXIT_OK, confirm, connect
from compozy_client.commands.output import error, info, warn

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def revoking(make_request: Any, force: bool, what: str) -> int:
    """Send a revoking request; when the provider is unreachable, confirm before forgetting."""
    from compozy_client.errors import ProviderUnavailable
    from compozy_client.protocol import RevokeResult

    with connect() as conn:
        try:
            result = conn.call(make_request(force), RevokeResult)
        except ProviderUnavailable as exc:
            if force:
                raise
            error(str(exc))
            if not confirm(f"Forget {what} locally anyway? It stays valid at the provider."):
                info("Nothing removed. Pass --force to remove it locally anyway.")
                return EXIT_FAILURE
            result = conn.call(make_request(True), RevokeResult)
    return print_revocation(result)


def print_revocation(result: Any) -> int:
    for token_id in result.forgotten:
        where = "revoked at the provider and " if token_id in result.revoked_at_provider else ""
        info(f"Session {token_id}: {where}removed")
    for token_id, reason in result.not_revoked.items():
        warn(f"session {token_id} was not revoked at the provider: {reason}")
    if not result.forgotten and not result.not_revoked:
        info("No sessions to remove.")
    return EXIT_OK
