"""The exceptions of the client library, and their wire error codes.

::

    CompozyError                    anything this package raises on purpose
    ├── AgentUnavailable            no agent answers on the socket (and none could be started)
    │   └── AgentTimedOut           the agent took the request but did not answer in time
    ├── UnsafeAgentSocket           the socket is not provably our own agent's: nothing was sent
    ├── ConfigError                 the config file is unreadable or malformed
    │   └── UnsafeConfigFile        another uid owns it, or others can write it: not used
    ├── UsageError                  the caller asked for something impossible (CLI exit 2)
    └── AgentError                  the agent answered with an error (has .code)
        ├── ProtocolViolation       bad_request, unknown_op, unsupported_version, line_too_long
        ├── NotImplementedByAgent   not_implemented
        ├── Forbidden               forbidden, locked, wrong_passphrase
        ├── AgentBusy               busy
        ├── NotLoggedIn             not_logged_in, login_required
        ├── UnknownTokenId          unknown_token_id, unknown_login
        ├── LoginFailed             login_failed, login_timeout, access_denied
        ├── RefreshFailed           refresh_failed
        ├── ProviderUnavailable     provider_unreachable, provider_error
        ├── TokenBindingMismatch    dpop_bound, not_dpop_bound
        └── StorageFailure          storage_error, config_error, internal

This module imports only the standard library: the CLI's fast path uses it.
Messages never contain a token or key: the agent never puts one in an error,
and the client never quotes one.
"""

from __future__ import annotations

from typing import Final


class ErrorCode:
    """Every error code the agent sends on the wire (``docs/protocol.md``)."""

    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_OP: Final = "unknown_op"
    UNSUPPORTED_VERSION: Final = "unsupported_version"
    LINE_TOO_LONG: Final = "line_too_long"
    NOT_IMPLEMENTED: Final = "not_implemented"
    FORBIDDEN: Final = "forbidden"
    BUSY: Final = "busy"
    LOCKED: Final = "locked"
    WRONG_PASSPHRASE: Final = "wrong_passphrase"
    NOT_LOGGED_IN: Final = "not_logged_in"
    LOGIN_REQUIRED: Final = "login_required"
    UNKNOWN_TOKEN_ID: Final = "unknown_token_id"
    UNKNOWN_LOGIN: Final = "unknown_login"
    LOGIN_FAILED: Final = "login_failed"
    LOGIN_TIMEOUT: Final = "login_timeout"
    ACCESS_DENIED: Final = "access_denied"
    REFRESH_FAILED: Final = "refresh_failed"
    PROVIDER_UNREACHABLE: Final = "provider_unreachable"
    PROVIDER_ERROR: Final = "provider_error"
    #: The session's tokens are DPoP-bound and the caller asked for a bearer token.
    DPOP_BOUND: Final = "dpop_bound"
    #: A DPoP proof was asked of a session whose tokens are bearer tokens.
    NOT_DPOP_BOUND: Final = "not_dpop_bound"
    STORAGE_ERROR: Final = "storage_error"
    CONFIG_ERROR: Final = "config_error"
    INTERNAL: Final = "internal"


class CompozyError(Exception):
    """Base of every exception this package raises on purpose."""


class AgentUnavailable(CompozyError):
    """No agent answers on the socket, and none could be started."""


class AgentTimedOut(AgentUnavailable):
    """The agent took the request but did not answer within the caller's time.

    The request was sent once and is never sent again: the agent may still be
    working on it (a refresh in flight is finished and its token cached).
    """


class UnsafeAgentSocket(CompozyError):
    """The socket, its directory or the process listening on it is not ours.

    Raised before a byte is sent. Not an :class:`AgentUnavailable`: nobody
    may start an agent at such a path or fall back to one, since the path
    itself is in someone else's hands.
    """


class ConfigError(CompozyError):
    """The config file is unreadable or malformed."""


class UnsafeConfigFile(ConfigError):
    """The config file is owned by another uid or writable by others, so it is not used.

    It could set the issuer (where logins go) or the API key (which every
    tool would send), so it is refused, as ssh refuses an unprotected key.
    """


class UsageError(CompozyError):
    """The request cannot be made as asked."""


class AgentError(CompozyError):
    """The agent answered with an error response."""

    def __init__(self, code: str, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class ProtocolViolation(AgentError):
    pass


class NotImplementedByAgent(AgentError):
    pass


class Forbidden(AgentError):
    pass


class AgentBusy(AgentError):
    pass


class NotLoggedIn(AgentError):
    pass


class UnknownTokenId(AgentError):
    pass


class LoginFailed(AgentError):
    pass


class RefreshFailed(AgentError):
    pass


class ProviderUnavailable(AgentError):
    pass


class TokenBindingMismatch(AgentError):
    """A DPoP-bound session asked for a bearer token (``dpop_bound``: the message names
    ``token_binding: bearer`` as the way out), or a proof asked of a bearer session."""


class StorageFailure(AgentError):
    pass


ERROR_CLASSES: Final[dict[str, type[AgentError]]] = {
    ErrorCode.BAD_REQUEST: ProtocolViolation,
    ErrorCode.UNKNOWN_OP: ProtocolViolation,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolViolation,
    ErrorCode.LINE_TOO_LONG: ProtocolViolation,
    ErrorCode.NOT_IMPLEMENTED: NotImplementedByAgent,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.LOCKED: Forbidden,
    ErrorCode.WRONG_PASSPHRASE: Forbidden,
    ErrorCode.BUSY: AgentBusy,
    ErrorCode.NOT_LOGGED_IN: NotLoggedIn,
    ErrorCode.LOGIN_REQUIRED: NotLoggedIn,
    ErrorCode.UNKNOWN_TOKEN_ID: UnknownTokenId,
    ErrorCode.UNKNOWN_LOGIN: UnknownTokenId,
    ErrorCode.LOGIN_FAILED: LoginFailed,
    ErrorCode.LOGIN_TIMEOUT: LoginFailed,
    ErrorCode.ACCESS_DENIED: LoginFailed,
    ErrorCode.REFRESH_FAILED: RefreshFailed,
    ErrorCode.PROVIDER_UNREACHABLE: ProviderUnavailable,
    ErrorCode.PROVIDER_ERROR: ProviderUnavailable,
    ErrorCode.DPOP_BOUND: TokenBindingMismatch,
    ErrorCode.NOT_DPOP_BOUND: TokenBindingMismatch,
    ErrorCode.STORAGE_ERROR: StorageFailure,
    ErrorCode.CONFIG_ERROR: StorageFailure,
    ErrorCode.INTERNAL: StorageFailure,
}


def error_from_wire(code: str, message: str, details: dict[str, str] | None = None) -> AgentError:
    """The exception for an error response; unknown codes become plain AgentError."""
    return ERROR_CLASSES.get(code, AgentError)(code, message, details)
