"""The wire protocol between the agent and its clients, defined once.

Transport: a SOCK_STREAM Unix socket carrying JSON Lines (one UTF-8 JSON
object per ``\\n``-terminated line; a request line is at most
:data:`MAX_LINE_BYTES` bytes, a response line at most :data:`MAX_RESPONSE_BYTES`).

Rules (``docs/protocol.md`` is the prose version of this module):

* A request is an object with ``id`` (integer or string, chosen by the client),
  ``op`` (the operation, which selects the request struct below) and an
  optional ``v`` (the protocol version the client speaks, default 1).
* Every request gets exactly one response line carrying the same ``id``:
  ``{"id": .., "ok": true, "result": {..}}`` or
  ``{"id": .., "ok": false, "error": {"code": .., "message": ..}}``.
  A request whose ``id`` cannot be read is answered with ``"id": null``.
* A line that is not UTF-8, not JSON, or nested deeper than the decoder goes
  (about a thousand levels; requests need three) gets ``bad_request``: no
  input raises anything but :class:`ProtocolError` from :func:`decode_request`,
  and no answer raises anything but ``AgentUnavailable`` from
  :func:`decode_response` and :func:`decode_result`.
* Requests on one connection are answered in order; a client may pipeline.
* Unknown fields are ignored on both sides, so newer clients and agents can
  talk to older ones; unknown ops get the ``unknown_op`` error.

Messages are tagged :class:`msgspec.Struct` classes in one union, decoded by
one decoder built once (see :func:`decode_request`).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from compozy_client.errors import AgentUnavailable, ErrorCode

_T = TypeVar("_T")

PROTOCOL_VERSION: Final = 1
#: The longest request line, newline included.
MAX_LINE_BYTES: Final = 64 * 1024
#: The longest response line: a list of a thousand sessions is larger than any request.
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024


# Bounds on what a request may name. Audit entries keep the profile, scope and
# audience a caller asked for, and the forwarding socket is open to a remote
# host: unbounded names let it fill the agent's memory (30 KB names, 1,000
# entries: +63 MiB). Real values are far shorter.
ProfileName = Annotated[str, msgspec.Meta(max_length=128)]
TokenId = Annotated[str, msgspec.Meta(max_length=256)]
ScopeList = Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]],
                      msgspec.Meta(max_length=64)]
Url = Annotated[str, msgspec.Meta(max_length=2048)]


# --------------------------------------------------------------------------
# Requests. Each is tagged by ``op``; ``id`` and ``v`` are common to all.


class _Request(msgspec.Struct, tag_field="op", kw_only=True):
    id: int | str
    v: int = PROTOCOL_VERSION


class Hello(_Request, tag="hello"):
    """Ask the agent who it is and which protocol it speaks."""


class Status(_Request, tag="status"):
    """Describe the agent and the session of ``profile`` (all profiles if None)."""

    profile: ProfileName | None = None


class List(_Request, tag="list"):
    """List every session the agent holds."""


class Token(_Request, tag="token"):
    """Hand out an access token that stays valid for ``min_valid`` seconds.

    The session is chosen by ``token_id`` when given, else by ``profile``.
    ``scope`` and ``audience`` ask for a narrower token (RFC 6749 section 6,
    RFC 8707), within what the login was granted. ``rejected_token`` is a token
    a resource server refused with 401: the agent drops it and fetches a new
    one. ``force_new`` does that without naming the token. Forced refreshes of
    one (scope, audience) are 5 s apart (docs/protocol.md). ``timeout`` is how long
    the caller waits for the answer: the agent answers (with what it knows)
    before then.
    """

    profile: ProfileName = "default"
    token_id: TokenId | None = None
    scope: ScopeList | None = None
    audience: Url | None = None
    min_valid: float = 0.0
    rejected_token: str | None = None
    force_new: bool = False
    timeout: float | None = None
    #: The caller reads ``token_type`` and can use a DPoP-bound token (RFC 9449) with
    #: proofs from ``dpop_proof``. Without it, a DPoP-bound session's token is refused
    #: (``dpop_bound``): a tool that can only send ``Bearer <token>`` would fail later
    #: with a less clear error.
    accept_dpop: bool = False

    def __repr__(self) -> str:  # rejected_token is a secret
        return (
            f"Token(id={self.id!r}, profile={self.profile!r}, token_id={self.token_id!r}, "
            f"scope={self.scope!r}, audience={self.audience!r}, min_valid={self.min_valid!r}, "
            f"force_new={self.force_new!r}, timeout={self.timeout!r}, rejected_token="
            f"{'<redacted>' if self.rejected_token else None})"
        )


HttpMethod = Annotated[str, msgspec.Meta(max_length=32)]
DpopNonce = Annotated[str, msgspec.Meta(max_length=1024)]


class DpopProof(_Request, tag="dpop_proof"):
    """A DPoP proof (RFC 9449 section 4) for one request, with the access token it binds.

    For a session whose tokens are DPoP-bound (``token_binding: dpop``): the
    agent signs a proof for ``htm`` and ``htu`` (query and fragment dropped),
    with ``ath`` for the session's current access token and the server's
    ``nonce`` when it demanded one, and returns both; the key never leaves the
    agent. ``scope``, ``audience``, ``min_valid``, ``rejected_token``,
    ``force_new`` and ``timeout`` as in :class:`Token`.
    """

    profile: ProfileName = "default"
    token_id: TokenId | None = None
    #: Both required (empty ones are refused); defaults only for the struct's field order.
    htm: HttpMethod = ""
    htu: Url = ""
    nonce: DpopNonce | None = None
    scope: ScopeList | None = None
    audience: Url | None = None
    min_valid: float = 0.0
    rejected_token: str | None = None
    force_new: bool = False
    timeout: float | None = None

    def __repr__(self) -> str:  # rejected_token is a secret
        return (
            f"DpopProof(id={self.id!r}, profile={self.profile!r}, token_id={self.token_id!r}, "
            f"htm={self.htm!r}, min_valid={self.min_valid!r}, force_new={self.force_new!r}, "
            f"rejected_token={'<redacted>' if self.rejected_token else None})"
        )


class Refresh(_Request, tag="refresh"):
    """Refresh a session now, by ``token_id`` or else ``profile``; ``timeout`` as in Token."""

    profile: ProfileName = "default"
    token_id: TokenId | None = None
    timeout: float | None = None


class Revoke(_Request, tag="revoke"):
    """Revoke one session at the provider (RFC 7009), then forget it.

    When the provider cannot be reached the session is kept unless ``force``.
    """

    token_id: TokenId
    force: bool = False


class RevokeAll(_Request, tag="revoke_all"):
    """Revoke every session; ``force`` as in :class:`Revoke`."""

    force: bool = False


class Logout(_Request, tag="logout"):
    """Revoke and forget ``profile``'s session, or every profile's with ``all``."""

    profile: ProfileName = "default"
    all: bool = False
    force: bool = False


class LoginStart(_Request, tag="login_start"):
    """Begin a login for ``profile``.

    ``flow`` is ``browser`` (authorization code + PKCE on a loopback redirect,
    RFC 8252) or ``device`` (RFC 8628). Issuer, client id and scopes default
    to the profile's configuration. The result tells the client what to show;
    it then calls :class:`LoginWait`.
    """

    profile: ProfileName = "default"
    flow: Literal["browser", "device"] = "browser"
    issuer: Url | None = None
    client_id: TokenId | None = None
    scope: ScopeList | None = None


class LoginWait(_Request, tag="login_wait"):
    """Wait up to ``timeout`` seconds for login ``login_id`` to finish."""

    login_id: str
    timeout: float = 30.0


class LoginCancel(_Request, tag="login_cancel"):
    """Abandon login ``login_id``."""

    login_id: str


class StoreApiKey(_Request, tag="store_api_key"):
    """Keep an API key for ``profile`` in the agent's secret store."""

    api_key: str
    profile: ProfileName = "default"

    def __repr__(self) -> str:  # the key must never reach a log or traceback
        return f"StoreApiKey(id={self.id!r}, profile={self.profile!r}, api_key=<redacted>)"


class Lock(_Request, tag="lock"):
    """Lock the agent with ``passphrase`` (like ``ssh-add -x``): no token is handed out
    until ``unlock`` with the same passphrase."""

    passphrase: str

    def __repr__(self) -> str:
        return f"Lock(id={self.id!r}, passphrase=<redacted>)"


class Unlock(_Request, tag="unlock"):
    """Unlock the agent (like ``ssh-add -X``); wrong passphrases are answered ever slower."""

    passphrase: str

    def __repr__(self) -> str:
        return f"Unlock(id={self.id!r}, passphrase=<redacted>)"


class AuditLog(_Request, tag="audit_log"):
    """The most recent tokens handed out (and refused), newest last."""

    limit: int = 50
    profile: ProfileName | None = None
    #: Only issued tokens, or only failed requests (kept apart: a flood of one
    #: cannot push the other out); None: both, merged by time.
    outcome: Literal["issued", "failed"] | None = None


class ExecSocket(_Request, tag="exec_socket"):
    """Open a socket of its own for a child of ``compozy exec``, for as long as this
    connection stays open.

    The socket serves only ``hello``, ``status`` and ``token`` for ``profile``; a
    token request on it may ask for no more than ``scope`` (when given) and for no
    other audience than ``audience`` (when given), and gets them when it names none.
    The agent removes it when the connection that asked for it closes.
    """

    profile: ProfileName = "default"
    scope: ScopeList | None = None
    audience: Url | None = None


Request = (
    Hello
    | Status
    | List
    | Token
    | Refresh
    | Revoke
    | RevokeAll
    | Logout
    | LoginStart
    | LoginWait
    | LoginCancel
    | StoreApiKey
    | Lock
    | Unlock
    | AuditLog
    | ExecSocket
    | DpopProof
)

#: Every op name the protocol defines, in the order of the union.
OPS: Final[tuple[str, ...]] = tuple(
    cls.__struct_config__.tag  # type: ignore[misc]
    for cls in (
        Hello, Status, List, Token, Refresh, Revoke, RevokeAll, Logout,
        LoginStart, LoginWait, LoginCancel, StoreApiKey, Lock, Unlock, AuditLog, ExecSocket,
        DpopProof,
    )
)


class Envelope(msgspec.Struct):
    """What every request line must at least have; read when the full decode fails.

    Raw on purpose: a request whose ``v`` or ``op`` has the wrong type (or is a
    number no type can hold) still has its ``id`` echoed in the error.
    """

    id: msgspec.Raw = msgspec.Raw(b"null")
    op: msgspec.Raw = msgspec.Raw(b"null")
    v: msgspec.Raw = msgspec.Raw(b"1")


# --------------------------------------------------------------------------
# Results.


class HelloResult(msgspec.Struct, kw_only=True):
    protocol: int
    agent_version: str
    pid: int
    ops: list[str]
    #: "full" on the main socket, "forward" on the restricted forwarding socket.
    socket_kind: str = "full"


class SessionInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One session as ``status`` and ``list`` show it. Never carries a token."""

    token_id: str
    profile: str
    kind: Literal["oidc", "api_key"]
    #: fresh | refreshing | expiring | expired | login_required | revoked
    state: str
    issuer: str | None = None
    account: str | None = None
    subject: str | None = None
    scopes: list[str] = []
    expires_at: float | None = None
    created_at: float | None = None
    last_used_at: float | None = None
    last_refresh_at: float | None = None
    last_refresh_outcome: str | None = None
    persisted: bool = True
    #: Granted scopes the provider no longer holds for this session: it was narrowed
    #: (a warning says so); `compozy login` gets them back.
    missing_scopes: list[str] = []
    #: ``Bearer`` or ``DPoP``: how the session's access tokens are used (RFC 9449).
    token_type: str = "Bearer"
    #: A DPoP session's signing algorithm and public key thumbprint (RFC 7638).
    dpop_algorithm: str | None = None
    dpop_thumbprint: str | None = None


class StorageInfo(msgspec.Struct, kw_only=True):
    #: keyring | file | memory
    backend: str
    detail: str = ""
    persistent: bool = True


class StatusResult(msgspec.Struct, kw_only=True):
    agent_version: str
    pid: int
    socket: str
    storage: StorageInfo
    sessions: list[SessionInfo]
    #: Provider Date header minus local time, from the last exchange, if known.
    clock_skew_seconds: float | None = None
    warnings: list[str] = []
    #: Locked with ``compozy auth lock``: no token is handed out until unlocked.
    locked: bool = False


class ListResult(msgspec.Struct, kw_only=True):
    sessions: list[SessionInfo]


class TokenResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    access_token: str
    token_type: str = "Bearer"
    expires_at: float | None = None
    token_id: str | None = None
    profile: str | None = None
    kind: str = "oidc"
    scope: list[str] | None = None
    audience: str | None = None

    def __repr__(self) -> str:
        return (
            f"TokenResult(token_id={self.token_id!r}, profile={self.profile!r}, "
            f"expires_at={self.expires_at!r}, access_token=<redacted>)"
        )


class DpopProofResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A proof and the access token it is for: send ``Authorization: DPoP <access_token>``
    and ``DPoP: <proof>`` (RFC 9449 section 7.1)."""

    access_token: str
    proof: str
    token_type: str = "DPoP"
    expires_at: float | None = None
    token_id: str | None = None
    profile: str | None = None
    #: The public key's RFC 7638 thumbprint: the token's ``cnf.jkt``.
    dpop_thumbprint: str | None = None

    def __repr__(self) -> str:
        return (f"DpopProofResult(token_id={self.token_id!r}, profile={self.profile!r}, "
                f"expires_at={self.expires_at!r}, access_token=<redacted>, proof=<redacted>)")


class RefreshResult(msgspec.Struct, kw_only=True):
    token_id: str
    profile: str
    expires_at: float | None


class RevokeResult(msgspec.Struct, kw_only=True):
    #: Token ids forgotten by the agent.
    forgotten: list[str]
    #: Token ids the provider confirmed revoked (RFC 7009 200 OK).
    revoked_at_provider: list[str]
    #: Token ids that could not be revoked at the provider, with the reason.
    not_revoked: dict[str, str] = {}


class LoginStartResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    login_id: str
    flow: Literal["browser", "device"]
    issuer: str
    #: browser flow: the URL to open.
    authorization_url: str | None = None
    #: device flow (RFC 8628 section 3.2).
    verification_uri: str | None = None
    verification_uri_complete: str | None = None
    user_code: str | None = None
    interval: float | None = None
    expires_in: float | None = None


class LoginWaitResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    #: pending (call again) | done
    state: Literal["pending", "done"]
    session: SessionInfo | None = None


class AuditEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One token request (or ``count`` identical ones), as the agent saw it. Never the token.

    Who asked, bound when the caller connected. What the kernel vouches for:
    ``uid`` and ``pid`` (peer credentials), ``exe`` and ``start_time`` (from
    ``/proc`` on Linux; ``exe`` from ``proc_pidpath`` on macOS), read at connect.
    What the program says about itself: ``self_reported_argv`` (a process can
    rewrite its own argv). ``process_at_request``: ``same`` (the connecting
    process asked), ``exec`` (it had exec'd ``exe_at_request``) or ``gone`` (it
    had exited: a process that inherited the connection asked); absent when it
    cannot be told. ``outcome`` is ``issued`` or the error code. An entry with
    ``count`` > 1 stands for that many identical requests from ``time`` to
    ``last_time``.
    """

    time: float
    profile: str
    outcome: str
    token_id: str | None = None
    kind: str | None = None
    scope: list[str] | None = None
    audience: str | None = None
    socket_kind: str = "full"
    uid: int | None = None
    pid: int | None = None
    exe: str | None = None
    #: Clock ticks since boot (``/proc/<pid>/stat`` field 22): with ``pid``, names one process.
    start_time: int | None = None
    process_at_request: str | None = None
    exe_at_request: str | None = None
    self_reported_argv: list[str] | None = None
    count: int = 1
    last_time: float | None = None
    #: The command line as older agents sent it (now ``self_reported_argv``); never sent.
    cmdline: list[str] | None = None


class AuditLogResult(msgspec.Struct, kw_only=True):
    entries: list[AuditEntry]
    #: Where the agent keeps issued tokens' entries (JSON Lines), if it keeps them.
    path: str | None = None
    #: Where it keeps the entries of failed requests.
    failed_path: str | None = None


class ExecSocketResult(msgspec.Struct, kw_only=True):
    #: The child's socket: a path in the agent's private runtime directory.
    path: str


class Empty(msgspec.Struct):
    pass


# --------------------------------------------------------------------------
# Responses.


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    code: str
    message: str
    #: Machine-readable hints, e.g. {"command": "compozy login --profile dev"}.
    details: dict[str, str] = {}


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A response as the agent writes it (``result`` already a Struct)."""

    id: int | str | None
    ok: bool
    result: Any = None
    error: ErrorBody | None = None


class RawResponse(msgspec.Struct, kw_only=True):
    """A response as a client reads it: ``result`` is decoded later by type."""

    id: int | str | None
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: ErrorBody | None = None


_request_decoder: msgspec.json.Decoder[Request] = msgspec.json.Decoder(Request)
_envelope_decoder = msgspec.json.Decoder(Envelope)
_id_decoder: msgspec.json.Decoder[int | str] = msgspec.json.Decoder(int | str)
_raw_response_decoder = msgspec.json.Decoder(RawResponse)
_encoder = msgspec.json.Encoder()
#: What a decoder may raise besides DecodeError: nesting deeper than the interpreter's
#: recursion limit, or a line whose values do not fit in memory.
_DECODER_LIMITS = (RecursionError, MemoryError)


class ProtocolError(Exception):
    """A request line that cannot be decoded; carries the wire error to send."""

    def __init__(self, code: str, message: str, request_id: int | str | None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def decode_request(line: bytes) -> Request:
    """Decode one request line, or raise :class:`ProtocolError` saying why.

    Nothing else is raised, whatever the line holds. The message never quotes
    the request's values: a malformed ``token`` or ``store_api_key`` line may
    carry a secret.
    """
    if not line.isascii():
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            # RFC 8259 section 8.1; msgspec checks only the strings it keeps.
            raise ProtocolError(ErrorCode.BAD_REQUEST, "request is not UTF-8 text", None) \
                from None
    try:
        request = _request_decoder.decode(line)
    except msgspec.DecodeError as exc:
        full_error = exc
    except _DECODER_LIMITS as exc:
        raise _too_big(line, exc) from None
    else:
        if request.v != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {_shown(request.v)} is not supported; "
                f"this agent speaks {PROTOCOL_VERSION}",
                request.id,
            )
        return request
    try:
        envelope = _envelope_decoder.decode(line)
    except msgspec.DecodeError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "request is not a JSON object with an id and an op", None
        ) from None
    except _DECODER_LIMITS as exc:
        raise _too_big(line, exc) from None
    request_id = _read_id(envelope.id)
    if request_id is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "request is not a JSON object with an id and an op", None)
    version = _read_id(envelope.v)
    if type(version) is int and version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {_shown(version)} is not supported; "
            f"this agent speaks {PROTOCOL_VERSION}",
            request_id,
        )
    op = _read_id(envelope.op)
    if isinstance(op, str) and op not in OPS:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}", request_id)
    # msgspec names the offending field path ("$.min_valid") but not its value.
    raise ProtocolError(
        ErrorCode.BAD_REQUEST, f"invalid request: {_describe(full_error)}", request_id
    )


def _read_id(raw: msgspec.Raw) -> int | str | None:
    """An integer or a string as sent (the id, op and v the protocol allows), else None.

    A bool, a float or an integer no int64 holds is None.
    """
    try:
        return _id_decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def _shown(version: int) -> str:
    """A version number for a message, cut short: it may have thousands of digits."""
    text = str(version)
    return text if len(text) <= 20 else text[:20] + "..."


def _too_big(line: bytes, error: BaseException) -> ProtocolError:
    """The error for a line the decoder gave up on (too deep, or out of memory)."""
    if isinstance(error, RecursionError):
        return ProtocolError(
            ErrorCode.BAD_REQUEST,
            "request is nested deeper than the agent reads (requests need three levels)",
            _id_without_recursion(line),
        )
    return ProtocolError(ErrorCode.BAD_REQUEST, "request is too large to decode", None)


#: JSON strings, runs of brackets and the separators of members: all the structure
#: needed to find a top-level key. Numbers, literals and whitespace are skipped.
#: A string's closing quote is optional so that no match ever fails after a long
#: try: an unclosed string would otherwise be rescanned from each of its quotes
#: (quadratic in the line).
_STRUCTURE: Final = rb'"(?:[^"\\]|\\.)*"?|[\[{]+|[\]}]+|[:,]'
#: How many of those tokens :func:`_id_without_recursion` reads before giving up:
#: about a millisecond, so that hostile lines cannot hold the agent's event loop.
_MAX_SCANNED_TOKENS: Final = 2048


def _id_without_recursion(line: bytes) -> int | str | None:
    """The top-level ``id`` of a line too deeply nested to decode, read with a counter.

    Only the members of the top-level object are looked at; a value nested
    inside one is skipped by counting brackets (a run of them is one token).
    The first ``id`` member ends the scan, so an id sent before the deep value,
    as every client does, is always found; one after it is found only within
    :data:`_MAX_SCANNED_TOKENS` tokens.
    """
    import re  # only here: the CLI's common paths do not need it

    depth = 0
    key: bytes | None = None
    value_start = -1
    value_nested = False
    for count, match in enumerate(re.finditer(_STRUCTURE, line, re.DOTALL)):
        if count >= _MAX_SCANNED_TOKENS:
            return None
        token = match.group()
        first = token[:1]
        if first in b"[{":
            if depth == 0 and first != b"{":
                return None  # not an object: no id
            depth += len(token)
            value_nested = value_nested or depth > 1
            continue
        if depth == 1 and first in b",]}":  # the end of a member
            if key == b'"id"' and value_start >= 0 and not value_nested:
                return _read_id(msgspec.Raw(line[value_start:match.start()]))
            key, value_start, value_nested = None, -1, False
        if first in b"]}":
            depth -= len(token)
            if depth <= 0:
                return None  # the top-level object ended without an id
        elif depth == 1 and first == b":":
            value_start = match.end()
        elif depth == 1 and first == b'"' and value_start < 0:
            key = token
    return None


def _describe(error: msgspec.DecodeError) -> str:
    text = str(error)
    # ValidationError texts look like "Expected `float`, got `str` - at `$.min_valid`";
    # JSON syntax errors may quote input bytes, so only their position is kept.
    if isinstance(error, msgspec.ValidationError):
        return text
    return "malformed JSON"


def encode(message: msgspec.Struct) -> bytes:
    """Encode a request or response as one line, newline included."""
    return _encoder.encode(message) + b"\n"


def decode_response(line: bytes) -> RawResponse:
    """Decode a response line; ``result`` stays raw until :func:`decode_result`.

    An answer that cannot be read (garbled, or nested past the decoder's depth)
    raises :class:`AgentUnavailable`: nothing an agent sends can crash a client.
    """
    try:
        return _raw_response_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise AgentUnavailable(f"the agent sent an answer that is not a response: "
                               f"{_describe(exc)}") from None
    except _DECODER_LIMITS:
        raise AgentUnavailable("the agent sent an answer nested too deep to read") from None


def decode_result(raw: msgspec.Raw, result_type: type[_T]) -> _T:
    """Decode a response's raw ``result`` into ``result_type``, else :class:`AgentUnavailable`."""
    try:
        return msgspec.json.decode(raw, type=result_type)
    except msgspec.DecodeError as exc:
        raise AgentUnavailable(f"the agent's answer is not a {result_type.__name__}: "
                               f"{_describe(exc)}") from None
    except _DECODER_LIMITS:
        raise AgentUnavailable("the agent sent an answer nested too deep to read") from None


#: The result type of each op, for clients.
RESULT_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    "hello": HelloResult,
    "status": StatusResult,
    "list": ListResult,
    "token": TokenResult,
    "refresh": RefreshResult,
    "revoke": RevokeResult,
    "revoke_all": RevokeResult,
    "logout": RevokeResult,
    "login_start": LoginStartResult,
    "login_wait": LoginWaitResult,
    "login_cancel": Empty,
    "store_api_key": SessionInfo,
    "lock": Empty,
    "unlock": Empty,
    "audit_log": AuditLogResult,
    "exec_socket": ExecSocketResult,
    "dpop_proof": DpopProofResult,
}
