"""The wire schema: decoding, typed errors, versioning, tolerance, redaction."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest

from compozy_client import protocol as p
from compozy_client.errors import (
    ERROR_CLASSES,
    AgentUnavailable,
    ErrorCode,
    NotLoggedIn,
    error_from_wire,
)


def test_every_op_decodes_to_its_struct() -> None:
    samples = {
        "hello": {},
        "status": {"profile": "dev"},
        "list": {},
        "token": {"profile": "dev", "scope": ["a"], "audience": "x", "min_valid": 30},
        "refresh": {"token_id": "abc"},
        "revoke": {"token_id": "abc"},
        "revoke_all": {"force": True},
        "logout": {"all": True},
        "login_start": {"flow": "device"},
        "login_wait": {"login_id": "l1"},
        "login_cancel": {"login_id": "l1"},
        "store_api_key": {"api_key": "k"},
        "lock": {"passphrase": "pw"},
        "unlock": {"passphrase": "pw"},
        "audit_log": {"limit": 5, "profile": "dev"},
        "exec_socket": {"profile": "dev", "scope": ["a"], "audience": "x"},
        "dpop_proof": {"profile": "dev", "htm": "GET", "htu": "https://api.example/x",
                       "nonce": "n-1"},
    }
    assert set(samples) == set(p.OPS)
    for op, fields in samples.items():
        request = p.decode_request(msgspec.json.encode({"id": 7, "op": op, **fields}))
        assert request.__struct_config__.tag == op
        assert request.id == 7


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    request = p.decode_request(b'{"id": 1, "op": "token", "from_the_future": [1, 2]}')
    assert isinstance(request, p.Token)
    assert request.profile == "default"


@pytest.mark.parametrize(
    ("line", "code", "request_id"),
    [
        (b"not json", ErrorCode.BAD_REQUEST, None),
        (b"[1, 2]", ErrorCode.BAD_REQUEST, None),
        (b'{"op": "hello"}', ErrorCode.BAD_REQUEST, None),
        (b'{"id": 3}', ErrorCode.BAD_REQUEST, 3),
        (b'{"id": 3, "op": "fly"}', ErrorCode.UNKNOWN_OP, 3),
        (b'{"id": "s", "op": "token", "min_valid": "soon"}', ErrorCode.BAD_REQUEST, "s"),
        (b'{"id": 4, "op": "hello", "v": 2}', ErrorCode.UNSUPPORTED_VERSION, 4),
        (b'{"id": 5, "op": "revoke"}', ErrorCode.BAD_REQUEST, 5),
        (b'{"id": 1e999, "op": "hello"}', ErrorCode.BAD_REQUEST, None),
        (b"\xff\xfe\x00garbage", ErrorCode.BAD_REQUEST, None),
    ],
)
def test_malformed_requests_get_typed_errors(
    line: bytes, code: str, request_id: int | str | None
) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.code == code
    assert caught.value.request_id == request_id


def test_error_messages_do_not_echo_request_values() -> None:
    secret = "sk-live-DO-NOT-ECHO"
    prefix = b'{"id": 1, "op": "store_api_key", "api_key": 12, "x": "'
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(prefix + secret.encode())
    assert secret not in str(caught.value)
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(
            b'{"id": 1, "op": "store_api_key", "profile": 5, "api_key": "' + secret.encode() + b'"}'
        )
    assert secret not in str(caught.value)


def test_reprs_redact_secrets() -> None:
    assert "sekrit" not in repr(p.StoreApiKey(id=1, api_key="sekrit"))
    assert "sekrit" not in repr(p.TokenResult(access_token="sekrit"))
    assert "sekrit" not in repr(p.Token(id=1, rejected_token="sekrit"))
    assert "sekrit" not in repr(p.Lock(id=1, passphrase="sekrit"))
    assert "sekrit" not in repr(p.Unlock(id=1, passphrase="sekrit"))


def test_response_round_trip_through_raw_result() -> None:
    line = p.encode(p.Response(id=9, ok=True, result=p.TokenResult(access_token="t", token_id="x")))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    raw = p.decode_response(line.rstrip(b"\n"))
    assert raw.id == 9 and raw.ok
    assert p.decode_result(raw.result, p.TokenResult).token_id == "x"


def test_error_response_shape() -> None:
    error = p.ErrorBody(code="not_logged_in", message="m")
    line = p.encode(p.Response(id=1, ok=False, error=error))
    assert msgspec.json.decode(line) == {
        "id": 1, "ok": False, "error": {"code": "not_logged_in", "message": "m"}
    }


def test_every_error_code_maps_to_an_exception_class() -> None:
    codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert codes == set(ERROR_CLASSES)
    error = error_from_wire("login_required", "run compozy login", {"command": "compozy login"})
    assert isinstance(error, NotLoggedIn)
    assert error.details["command"] == "compozy login"
    assert type(error_from_wire("from_the_future", "x")).__name__ == "AgentError"


def test_result_types_cover_every_op() -> None:
    assert set(p.RESULT_TYPES) == set(p.OPS)


@pytest.mark.parametrize("line", [
    b'{"id": 0, "op": "hello", "v": null}',
    b'{"id": 0, "op": 5}',
    b'{"id": 0, "op": "hello", "v": "1"}',
    b'{"id": 0, "op": "token", "min_valid": [1]}',
])
def test_the_id_is_echoed_whatever_else_is_wrong(line: bytes) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.request_id == 0 and caught.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("line", [b'{"id": 1e3, "op": "hello"}', b'{"id": true, "op": "hello"}',
                                  b'{"id": [1], "op": "hello"}'])
def test_an_id_the_protocol_does_not_allow_is_not_echoed(line: bytes) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.request_id is None and caught.value.code == ErrorCode.BAD_REQUEST


def _nested(depth: int, kind: str) -> bytes:
    """A JSON value ``depth`` levels deep: arrays, objects, or both in turn."""
    if kind == "array":
        return b"[" * depth + b"1" + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    pairs = depth // 2
    return b'[{"a":' * pairs + b"1" + b"}]" * pairs


@pytest.mark.parametrize("kind", ["array", "object", "mixed"])
@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("field", ["x", "profile", "op", "v", "scope"])
def test_nesting_past_the_decoders_depth_is_a_bad_request_with_its_id(
    kind: str, depth: int, field: str
) -> None:
    """Found by the issue: one 2 KB line raised RecursionError and ended the agent."""
    members = [b'"id":7', b'"' + field.encode() + b'":' + _nested(depth, kind)]
    if field != "op":
        members.insert(1, b'"op":"token"')
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(b"{" + b",".join(members) + b"}")
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.request_id == 7
    assert "nested deeper" in str(caught.value)


@pytest.mark.parametrize(("deep", "request_id"), [
    (b"[" * 100_000 + b"]" * 100_000, 7),  # a run of brackets is one step of the scan
    (b'[{"a":' * 600 + b"1" + b"}]" * 600, 7),
    # Past the scan's budget (a millisecond), the id that follows is not looked for.
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, None),
])
def test_an_id_after_the_deep_value_is_read_within_a_budget(
    deep: bytes, request_id: int | None
) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(b'{"x":' + deep + b',"op":"hello","id":7}')
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.request_id == request_id


@pytest.mark.parametrize("tail", [b'"' + b'\\"' * 30_000, b'"' + b"\\" * 60_000,
                                  b'{"a":' * 10_000, b"," * 60_000])
def test_reading_the_id_of_a_deep_line_takes_linear_time(tail: bytes) -> None:
    """Unclosed strings once made the scan quadratic: seconds for one 60 KB line."""
    started = time.perf_counter()
    for _ in range(10):
        with pytest.raises(p.ProtocolError) as caught:
            p.decode_request(b'{"x":' + b"[" * 2000 + tail)
        assert caught.value.code == ErrorCode.BAD_REQUEST
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("line", [
    b'{"id":' + b"[" * 5000 + b"]" * 5000 + b',"op":"hello"}',
    b'{"op":"hello","id":' + b'{"id":' * 5000 + b"1" + b"}" * 5000 + b"}",
    b"[" * 5000 + b'{"id":1,"op":"hello"}' + b"]" * 5000,
    b'{"x":' + b"[" * 5000 + b'"\\"]"' + b"]" * 4999 + b',"id":"s]"}',  # an unclosed run
])
def test_a_deep_line_without_a_readable_id_is_answered_with_null(line: bytes) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.request_id is None


def test_the_id_of_a_deep_line_is_read_past_strings_holding_brackets() -> None:
    line = (b'{"x":"[[{,:\\"", "y":' + b"[" * 3000 + b'"]}", {"id": 2}' + b"]" * 3000
            + b', "id" : "the-id" , "z":[]}')
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.request_id == "the-id"


BIG = b"1" + b"0" * 5000


@pytest.mark.parametrize(("field", "value", "code", "request_id"), [
    ("v", BIG, ErrorCode.BAD_REQUEST, 3),
    ("v", b"1e999", ErrorCode.BAD_REQUEST, 3),
    ("v", b"-0", ErrorCode.UNSUPPORTED_VERSION, 3),
    ("op", BIG, ErrorCode.BAD_REQUEST, 3),
    ("op", b"-1e999", ErrorCode.BAD_REQUEST, 3),
    ("min_valid", BIG, ErrorCode.BAD_REQUEST, 3),
    ("min_valid", b"1e999", ErrorCode.BAD_REQUEST, 3),
    ("scope", b"[" + BIG + b"]", ErrorCode.BAD_REQUEST, 3),
    ("id", BIG, ErrorCode.BAD_REQUEST, None),
    ("min_valid", b"NaN", ErrorCode.BAD_REQUEST, None),  # not JSON: nothing is readable
    ("x", b"-Infinity", ErrorCode.BAD_REQUEST, None),
])
def test_numbers_no_type_holds_are_bad_requests(
    field: str, value: bytes, code: str, request_id: int | None
) -> None:
    line = b'{"id":3,"op":"token","' + field.encode() + b'":' + value + b"}"
    if field == "id":
        line = b'{"op":"token","id":' + value + b"}"
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert (caught.value.code, caught.value.request_id) == (code, request_id)


@pytest.mark.parametrize("line", [
    b'{"id":1,"op":"hello","x":"\xff"}',  # msgspec alone accepts it: the field is skipped
    b'{"id":1,"op":"hello","x":"\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
    b'{"id":1,"op":"status","profile":"\xc3"}',
    b'{"id":1,"op":"hello\x00"}',
    b'{"id":1,"op":"status","profile":"a\x00b"}',
    b'{"id":1,"op":"status","profile":"\\ud800"}',  # a lone surrogate, escaped
    b'{"id":1,"op":"hello","x":"\\udc00\\ud800"}',
])
def test_invalid_utf8_nuls_and_lone_surrogates_are_bad_requests(line: bytes) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.request_id is None  # the line is not JSON text (RFC 8259 section 8)


@pytest.mark.parametrize("line", [
    b'{"id":1,"ok":true,"result":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"id":1,"ok":false,"error":{"code":"x","message":"y","details":'
    + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}}",
    b'{"id":1,"ok":true,"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"id":1,"ok":true,"result":{"access_token":"\xff"}}',
    b'{"id":1,"ok":' + BIG + b"}",
    b"\x00\x00",
])
def test_a_garbled_or_deep_answer_raises_the_clients_typed_error(line: bytes) -> None:
    def read_token() -> p.TokenResult:
        return p.decode_result(p.decode_response(line).result, p.TokenResult)

    with pytest.raises(AgentUnavailable):
        read_token()


def test_a_result_of_another_shape_raises_the_clients_typed_error() -> None:
    raw = p.decode_response(b'{"id":1,"ok":true,"result":{"access_token":' + b"[" * 500
                            + b"]" * 500 + b"}}")
    with pytest.raises(AgentUnavailable):
        p.decode_result(raw.result, p.TokenResult)
    with pytest.raises(AgentUnavailable, match="not a HelloResult"):
        p.decode_result(msgspec.Raw(b'{"protocol": "one"}'), p.HelloResult)


def test_the_token_fast_path_hands_a_deep_answer_to_the_full_cli() -> None:
    from compozy_client import fasttoken_rare

    deep = b"[" * 100_000 + b"]" * 100_000
    assert fasttoken_rare.token_from_json(b'{"id":1,"ok":true,"result":' + deep + b"}") is None
    assert fasttoken_rare.token_from_json(b'{"id":1,"ok":false,"error":' + deep + b"}") is None


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"op": "token", "profile": "p" * 30_000}, "$.profile"),
        ({"op": "token", "audience": "https://" + "a" * 30_000}, "$.audience"),
        ({"op": "token", "scope": ["s" * 30_000]}, "$.scope[0]"),
        ({"op": "token", "scope": ["s"] * 5_000}, "$.scope"),
        ({"op": "token", "token_id": "t" * 30_000}, "$.token_id"),
        ({"op": "status", "profile": "p" * 30_000}, "$.profile"),
        ({"op": "login_start", "issuer": "https://" + "i" * 30_000}, "$.issuer"),
    ],
)
def test_names_too_long_for_any_real_value_are_bad_requests(
    request_fields: dict[str, object], field: str
) -> None:
    # Audit entries keep what a caller asked for, and a forwarded host may ask: 1,000
    # requests naming 30 KB profiles grew the agent by 63 MiB before these bounds.
    line = msgspec.json.encode({"id": 7, **request_fields})
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request(line)
    assert caught.value.code == "bad_request" and caught.value.request_id == 7
    assert field in str(caught.value) and len(str(caught.value)) < 300  # the value not echoed


def test_real_names_are_well_within_the_bounds() -> None:
    request = p.decode_request(msgspec.json.encode({
        "id": 1, "op": "token", "profile": "staging-eu-west-1",
        "scope": ["openid", "offline_access", "compozy:read", "compozy:write"],
        "audience": "https://api.compozy.dev/v1"}))
    assert isinstance(request, p.Token) and request.profile == "staging-eu-west-1"


def test_the_token_fast_path_reads_a_bounded_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A broken agent that answers with an endless line: the fast path used to read all of
    # it (and rescan its whole buffer for a newline after every chunk).
    from compozy_client import fasttoken

    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = str(directory / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    sent = 0

    def endless_answer() -> None:
        nonlocal sent
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            chunk = b"a" * 65536
            with contextlib.suppress(OSError):
                while sent < 64 * 1024 * 1024:
                    connection.sendall(chunk)
                    sent += len(chunk)

    server = threading.Thread(target=endless_answer, daemon=True)
    server.start()
    monkeypatch.setenv("COMPOZY_AGENT_SOCK", path)
    try:
        answer = fasttoken.exchange({"profile": "default"}, time.monotonic() + 20)
    finally:
        server.join(20)
        listener.close()
    assert answer is None  # the full CLI takes over and says what is wrong
    assert sent <= 8 * 1024 * 1024, sent
