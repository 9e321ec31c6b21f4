"""The wire schema: decoding, typed errors, versioning, tolerance, redaction."""

from __future__ import annotations

import msgspec
import pytest

from compozy_client import protocol as p
from compozy_client.errors import ERROR_CLASSES, ErrorCode, NotLoggedIn, error_from_wire


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
