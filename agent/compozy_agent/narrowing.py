"""Scope narrowing: a session's scopes as the provider actually holds them.

Sans-I/O, like ``lifecycle.py``, which owns a :class:`ScopeWatch` per session
and feeds it every successful refresh. This module owns two decisions:

1. **Has the session shrunk?** A refresh of the default token (no ``scope``
   asked) that comes back with fewer scopes than the login granted means the
   provider now holds less for this session. Some providers (django-oauth-
   toolkit) do this for good after *one* narrower refresh (RFC 6749 section 6
   downscoping): the rotated refresh token carries only the narrower scopes,
   asking for a dropped one fails ``invalid_scope``, and omitting ``scope``
   returns the narrowed set. The agent keeps serving what is truly held (a
   token with fewer scopes is still the best there is), says so in status, and
   says how to get the rest back (``compozy login``). When the shrink follows a
   narrower refresh of the same chain, the provider *narrows chains*: the
   driver records that for the profile (``downscope: never``, learned) so the
   next session of the profile is never narrowed by refresh again. A refresh
   whose answer omits ``scope`` holds what was asked (RFC 6749 section 5.1),
   i.e. the grant.

2. **What ``--scope`` gets under ``downscope: never``.** No narrower refresh
   is made: the caller gets the session's full token, and the result's
   ``scope`` lists everything that token holds, so a caller that cares sees
   that it is wider than asked. Scopes the session does not hold (never
   granted, or dropped by the provider) fail with bad_request, naming what is
   held and how to get the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal, TypeAlias

import msgspec

__all__ = [
    "DOWNSCOPE_MODES",
    "Downscope",
    "ScopeWatch",
    "missing_scopes_message",
    "unheld_scopes",
    "unheld_scopes_message",
]

#: How a profile's narrower-scope tokens are obtained: ``refresh`` asks the provider
#: for a token with only those scopes (RFC 6749 section 6); ``never`` hands out the
#: session's full token instead.
Downscope: TypeAlias = Literal["refresh", "never"]
DOWNSCOPE_MODES: Final[tuple[Downscope, ...]] = ("refresh", "never")

#: How many scope names a message lists before "and N more".
_NAMES_SHOWN: Final = 20


def _names(values: Iterable[str]) -> str:
    ordered = sorted(values)
    shown = " ".join(ascii(value)[1:-1] for value in ordered[:_NAMES_SHOWN])
    more = len(ordered) - _NAMES_SHOWN
    return (shown or "none") + (f" and {more} more" if more > 0 else "")


def unheld_scopes_message(unheld: frozenset[str], login_command: str) -> str:
    """The refusal of a request for scopes the provider no longer holds for the session."""
    return (f"the provider no longer grants this session {_names(unheld)}; to get "
            f"{'it' if len(unheld) == 1 else 'them'} back run: {login_command}")


def missing_scopes_message(missing: Iterable[str], login_command: str) -> str:
    """The status warning for a session the provider narrowed."""
    return (f"the provider no longer grants this session {_names(missing)} (a narrower "
            f"refresh narrowed it for good, or the provider's policy changed); tokens hold "
            f"only what remains; to get the full scopes back run: {login_command}")


def unheld_scopes(requested: frozenset[str], held: frozenset[str] | None) -> frozenset[str]:
    """The requested scopes the session does not hold (none when ``held`` is unknown)."""
    return frozenset() if held is None else requested - held


class ScopeWatch(msgspec.Struct):
    """What one session's chain of refresh tokens is known to hold.

    ``granted``: the login's scopes (None when not known: nothing is compared).
    """

    granted: frozenset[str] | None
    #: What the default token's last refresh said it holds (None: the grant).
    held: frozenset[str] | None = None
    #: A narrower-scope refresh spent this chain since the login.
    narrower_refreshed: bool = False
    #: A default refresh came back narrower *after* a narrower refresh: the provider
    #: narrows chains. The driver learns it for the profile once.
    narrows_chains: bool = False

    @property
    def missing(self) -> frozenset[str]:
        """Granted scopes the session no longer holds."""
        if self.granted is None or self.held is None:
            return frozenset()
        return self.granted - self.held

    @property
    def holds(self) -> frozenset[str] | None:
        """The scopes the session holds now, if known."""
        if self.held is None:
            return self.granted
        return self.held if self.granted is None else self.held & self.granted

    def narrower_refresh(self, scopes: frozenset[str] | None) -> None:
        """A refresh asking for ``scopes`` (None: the default, or an audience alone) succeeded."""
        if scopes is not None and (self.granted is None or scopes != self.granted):
            self.narrower_refreshed = True

    def default_refreshed(self, scope: Iterable[str] | None) -> bool:
        """The default token was refreshed and the answer said it holds ``scope``.

        True when this answer showed, for the first time, that the provider
        narrows chains (a shrink after a narrower refresh).
        """
        if scope is None:
            return False  # RFC 6749 section 5.1: identical to what was asked
        self.held = frozenset(scope)
        if self.missing and self.narrower_refreshed and not self.narrows_chains:
            self.narrows_chains = True
            return True
        return False
