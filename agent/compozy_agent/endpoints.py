"""The provider endpoints a profile names in the config file, for the issuer they belong to.

A provider's metadata may lack an endpoint the agent uses (django-oauth-toolkit's
lists no device authorization endpoint in either document); the profile names it
with the RFC 8414 field name (``client/compozy_client/config.py``). Those apply
only to a session or login of that profile *and* that profile's issuer: a login
to another issuer (``compozy login --issuer``) must never send a token to
endpoints configured for a different provider.

The config is read each time (it is small, and the agent is not restarted when
a person adds ``revocation_endpoint`` to retry a logout); a config that cannot
be read gives no endpoints, with a warning, so refreshing carries on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from compozy_client.config import DEFAULT_ISSUER, Config, ProfileConfig
from compozy_client.errors import ConfigError

log = logging.getLogger("compozy_agent.endpoints")

#: ``(profile, issuer) -> {field name: url}``.
EndpointsFor = Callable[[str, str], dict[str, str]]


def for_issuer(profile: ProfileConfig | None, issuer: str) -> ProfileConfig | None:
    """``profile`` if ``issuer`` is the profile's issuer (or the default, when it names
    none), else None: its endpoints and device client belong to that provider only."""
    if profile is None:
        return None
    configured = (profile.issuer or DEFAULT_ISSUER).rstrip("/")
    return profile if configured == issuer.rstrip("/") else None


def profile_endpoints(profile: ProfileConfig | None, issuer: str) -> dict[str, str]:
    """The endpoints ``profile`` names, if ``issuer`` is the profile's issuer; else none."""
    applies = for_issuer(profile, issuer)
    return applies.endpoints() if applies is not None else {}


def endpoints_from(config_loader: Callable[[], Config]) -> EndpointsFor:
    """An :data:`EndpointsFor` that reads the config file at each call."""

    def endpoints_for(profile: str, issuer: str) -> dict[str, str]:
        try:
            config = config_loader()
        except ConfigError as exc:
            log.warning("profile %s: the config file cannot be read (%s); using the "
                        "provider's metadata alone", profile, exc)
            return {}
        return profile_endpoints(config.profiles.get(profile), issuer)

    return endpoints_for


def no_endpoints(profile: str, issuer: str) -> dict[str, str]:
    """For drivers built without a config (tests): the metadata alone."""
    return {}
