"""The library API for local tools: get a token the way `compozy auth token` does.

Both functions follow the credential chain (``FLYZT_API_KEY``, then the config
file's ``auth.api_key``, then the agent's session for the profile) and start
the agent when none runs. The async one uses asyncio streams, so it runs under
asyncio (and anyio on asyncio) without blocking the loop. Both refuse a config
file another uid owns or others can write
(:class:`~compozy_client.errors.UnsafeConfigFile`), and a socket that is not
provably our own agent's (:class:`~compozy_client.errors.UnsafeAgentSocket`,
raised before anything is sent).

``url`` (the request the token is for) and ``audience`` pick a profile and an
audience from the config file's ``rules:`` (:mod:`compozy_client.rules`); an
explicit ``profile`` or ``audience`` wins over the rule's, and the rule over
``$COMPOZY_PROFILE``.

``timeout`` is one budget for the whole call (connecting, starting an agent,
the answer); the agent is told how long is left, so it answers before then
with what it knows, and a request is never sent twice.
"""

from __future__ import annotations

import time

from compozy_client import protocol
from compozy_client.chain import resolve_profile, static_credential
from compozy_client.config import Config, load_config
from compozy_client.connection import DEFAULT_TIMEOUT, connect
from compozy_client.errors import (
    AgentTimedOut,
    AgentUnavailable,
    UnsafeAgentSocket,
    error_from_wire,
)
from compozy_client.paths import socket_path
from compozy_client.peercheck import peer_problem, socket_path_problem
from compozy_client.rules import match_rule

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    import msgspec

    _Result = TypeVar("_Result", bound=msgspec.Struct)


def _by_rules(
    config: Config, profile: str | None, audience: str | None, url: str | None
) -> tuple[str | None, str | None]:
    """``profile`` and ``audience``, each filled from the first matching rule when not given.

    A rule for another profile than the one named explicitly does not apply at all (its
    audience is that profile's business)."""
    if (profile is not None and audience is not None) or (url is None and audience is None):
        return profile, audience
    rule = match_rule(config, url=url, audience=audience)
    if rule is None or (profile is not None and rule.profile not in (None, profile)):
        return profile, audience
    return profile or rule.profile, audience or rule.audience


def _request(
    profile: str | None,
    scope: list[str] | None,
    audience: str | None,
    min_valid: float,
    force_new: bool,
    rejected_token: str | None,
    accept_dpop: bool = False,
) -> protocol.Token:
    return protocol.Token(
        id=1,
        profile=resolve_profile(profile),
        scope=scope,
        audience=audience,
        min_valid=min_valid,
        force_new=force_new,
        rejected_token=rejected_token,
        accept_dpop=accept_dpop,
    )


def _ask(request: protocol.Token | protocol.DpopProof, result_type: type[_Result],
         timeout: float, deadline: float) -> _Result:
    """One request to the agent (started if none runs), within ``deadline``."""
    with connect(timeout=timeout, deadline=deadline) as conn:
        request.timeout = max(0.0, deadline - time.monotonic())
        return conn.call(request, result_type)


def get_token(
    profile: str | None = None,
    *,
    scope: list[str] | None = None,
    audience: str | None = None,
    min_valid: float = 0.0,
    force_new: bool = False,
    rejected_token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
) -> str:
    """Return an access token (or API key) for ``profile``.

    ``scope``/``audience`` ask for a narrower token; ``min_valid`` makes sure it
    stays valid that many seconds; pass the token a server refused with 401 as
    ``rejected_token`` (or ``force_new=True``) to get a new one (at most one
    forced every 5 s: a second rejection sooner raises RefreshFailed). ``timeout``
    bounds the whole call. ``url``, the request the token is for, and ``audience``
    choose the profile (and audience) by the config file's ``rules:``.
    Raises :class:`~compozy_client.errors.NotLoggedIn` when the profile needs
    ``compozy login``, :class:`~compozy_client.errors.TokenBindingMismatch` when its
    tokens are DPoP-bound (``token_binding: dpop``; use :func:`get_dpop_proof`), and
    other :class:`~compozy_client.errors.CompozyError`\\ s.
    """
    return get_token_result(profile, scope=scope, audience=audience, min_valid=min_valid,
                            force_new=force_new, rejected_token=rejected_token,
                            timeout=timeout, url=url).access_token


def get_token_result(
    profile: str | None = None,
    *,
    scope: list[str] | None = None,
    audience: str | None = None,
    min_valid: float = 0.0,
    force_new: bool = False,
    rejected_token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
    accept_dpop: bool = False,
) -> protocol.TokenResult:
    """As :func:`get_token`, with the token's type and expiry. ``accept_dpop`` says the
    caller can use a DPoP-bound token (``token_type`` ``DPoP``, with proofs from
    :func:`get_dpop_proof`); without it such a session raises TokenBindingMismatch."""
    deadline = time.monotonic() + timeout
    config = load_config()
    static = static_credential(config)
    if static is not None:
        return protocol.TokenResult(access_token=static.api_key, kind="api_key")
    profile, audience = _by_rules(config, profile, audience, url)
    request = _request(profile, scope, audience, min_valid, force_new, rejected_token,
                       accept_dpop)
    return _ask(request, protocol.TokenResult, timeout, deadline)


def _proof_request(method: str, url: str, profile: str | None, nonce: str | None,
                   min_valid: float, rejected_token: str | None, scope: list[str] | None,
                   audience: str | None) -> protocol.DpopProof:
    return protocol.DpopProof(id=1, profile=resolve_profile(profile), htm=method, htu=url,
                              nonce=nonce, min_valid=min_valid, rejected_token=rejected_token,
                              scope=scope, audience=audience)


def get_dpop_proof(
    method: str,
    url: str,
    profile: str | None = None,
    *,
    nonce: str | None = None,
    min_valid: float = 0.0,
    rejected_token: str | None = None,
    scope: list[str] | None = None,
    audience: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> protocol.DpopProofResult:
    """A DPoP proof (RFC 9449) for one ``method`` ``url`` request and the access token it
    is bound to, for a profile with ``token_binding: dpop``; the key stays in the agent.

    Send ``Authorization: DPoP <access_token>`` and ``DPoP: <proof>``; a proof is
    good for one request. ``nonce`` is the server's ``DPoP-Nonce`` when it demanded
    one; ``rejected_token`` the token it refused with 401; ``scope``/``audience``
    as in :func:`get_token`; ``url`` picks the profile and audience not given by
    the config file's ``rules:``, as in :func:`get_token`. Raises
    :class:`~compozy_client.errors.TokenBindingMismatch` for a bearer profile (use
    :func:`get_token`), and as :func:`get_token` otherwise. An API key from the
    environment or the config file cannot sign: the agent's session is asked.
    """
    deadline = time.monotonic() + timeout
    profile, audience = _by_rules(load_config(), profile, audience, url)
    request = _proof_request(method, url, profile, nonce, min_valid, rejected_token, scope,
                             audience)
    return _ask(request, protocol.DpopProofResult, timeout, deadline)


async def async_get_token(
    profile: str | None = None,
    *,
    scope: list[str] | None = None,
    audience: str | None = None,
    min_valid: float = 0.0,
    force_new: bool = False,
    rejected_token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
) -> str:
    """The asyncio version of :func:`get_token`; starts no agent (use the CLI or service)."""
    result = await async_get_token_result(profile, scope=scope, audience=audience,
                                          min_valid=min_valid, force_new=force_new,
                                          rejected_token=rejected_token, timeout=timeout,
                                          url=url)
    return result.access_token


async def async_get_token_result(
    profile: str | None = None,
    *,
    scope: list[str] | None = None,
    audience: str | None = None,
    min_valid: float = 0.0,
    force_new: bool = False,
    rejected_token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
    accept_dpop: bool = False,
) -> protocol.TokenResult:
    """The asyncio version of :func:`get_token_result`."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    config = load_config()
    static = static_credential(config)
    if static is not None:
        return protocol.TokenResult(access_token=static.api_key, kind="api_key")
    profile, audience = _by_rules(config, profile, audience, url)
    request = _request(profile, scope, audience, min_valid, force_new, rejected_token,
                       accept_dpop)
    return await _async_ask(request, protocol.TokenResult, timeout, deadline)


async def async_get_dpop_proof(
    method: str,
    url: str,
    profile: str | None = None,
    *,
    nonce: str | None = None,
    min_valid: float = 0.0,
    rejected_token: str | None = None,
    scope: list[str] | None = None,
    audience: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> protocol.DpopProofResult:
    """The asyncio version of :func:`get_dpop_proof`; starts no agent."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    profile, audience = _by_rules(load_config(), profile, audience, url)
    request = _proof_request(method, url, profile, nonce, min_valid, rejected_token, scope,
                             audience)
    return await _async_ask(request, protocol.DpopProofResult, timeout, deadline)


async def _async_ask(request: protocol.Token | protocol.DpopProof, result_type: type[_Result],
                     timeout: float, deadline: float) -> _Result:
    """One request to a running agent over asyncio streams, within ``deadline`` (loop time)."""
    import asyncio

    loop = asyncio.get_running_loop()
    path = socket_path()
    problem = socket_path_problem(path)
    if problem is not None:
        raise UnsafeAgentSocket(problem)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=protocol.MAX_RESPONSE_BYTES),
            max(0.0, deadline - loop.time()))
    except (OSError, TimeoutError) as exc:
        raise AgentUnavailable(f"no agent answers on {path} ({exc.__class__.__name__})") from None
    problem = peer_problem(writer.get_extra_info("socket"), path)
    if problem is not None:
        writer.close()
        raise UnsafeAgentSocket(problem)
    try:
        request.timeout = max(0.0, deadline - loop.time())
        writer.write(protocol.encode(request))
        await asyncio.wait_for(writer.drain(), max(0.0, deadline - loop.time()))
        line = await asyncio.wait_for(reader.readline(), max(0.0, deadline - loop.time()))
    except TimeoutError:
        raise AgentTimedOut(f"the agent on {path} took the request but did not answer within "
                            f"{timeout:.0f} s; it was not asked again") from None
    except OSError as exc:
        raise AgentUnavailable(f"the agent on {path} did not answer ({exc.__class__.__name__})") \
            from None
    except ValueError:  # asyncio's LimitOverrunError: no newline within the limit
        raise AgentUnavailable("the agent sent a line longer than the protocol allows") from None
    finally:
        writer.close()
    if not line:
        raise AgentUnavailable(f"the agent on {path} closed the connection")
    response = protocol.decode_response(line.rstrip(b"\n"))
    if not response.ok:
        error = response.error or protocol.ErrorBody(code="internal", message="empty error")
        raise error_from_wire(error.code, error.message, error.details)
    return protocol.decode_result(response.result, result_type)


__all__ = ["async_get_dpop_proof", "async_get_token", "async_get_token_result",
           "get_dpop_proof", "get_token", "get_token_result"]
