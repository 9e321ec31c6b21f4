"""Property-based fuzzing of a real agent's sockets (hypothesis).

Thousands of malformed requests: JSON that is not a request, known ops with
fields of the wrong type, huge numbers, unknown ops, binary garbage, lines
over the limit, half-written lines and disconnects, many idle connections;
and, on the main and the forwarding socket alike, nesting 100 to 100,000
levels deep in any field, numbers no type holds (10**5000, 1e999, NaN),
invalid UTF-8, NULs and lone surrogates. Each line gets exactly one typed
error (or, for a line over the limit, a typed error and a closed connection),
the agent keeps serving every other client, and its memory stays bounded.

Ops that would change the agent's state when given well-typed values (login,
lock, storing a key) are fuzzed only with ill-typed ones, so one example
cannot change what the next one sees.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compozy_client import protocol as p
from compozy_client.errors import ERROR_CLASSES
from support.agent import AgentEnv, AgentProcess, prepare_dirs, start_agent

pytestmark = pytest.mark.slow

KNOWN_CODES = frozenset(ERROR_CLASSES)
SYNC = b'{"id": "sync", "op": "hello"}\n'
#: Ops whose well-typed requests change nothing an example could see.
HARMLESS_OPS = ("hello", "status", "list", "token", "refresh", "revoke", "revoke_all",
                "logout", "login_wait", "login_cancel", "audit_log")
#: Ops with effects (or network calls): fuzzed with ill-typed fields only.
STATEFUL_FIELDS = {"login_start": "flow", "lock": "passphrase", "unlock": "passphrase",
                   "store_api_key": "api_key", "exec_socket": "profile"}
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
CAP = 48  # the agent's connection cap in this module
RSS_AT_START: dict[int, int] = {}


@pytest.fixture(scope="module")
def fuzzed_agent() -> Iterator[AgentProcess]:
    # AF_UNIX paths are short; a unique name, as other runs may share /tmp.
    short = Path(tempfile.mkdtemp(prefix="czf-", dir="/tmp"))
    env = AgentEnv(short)
    prepare_dirs(env)
    env.config.parent.mkdir(parents=True)
    env.config.write_text("storage: memory\n")
    agent = start_agent(env, "--max-connections", str(CAP),
                        "--forward-socket", str(short / "fwd" / "forward.sock"))
    RSS_AT_START[agent.pid] = rss_kib(agent.pid)
    try:
        yield agent
    finally:
        agent.stop()
        import shutil

        shutil.rmtree(short, ignore_errors=True)


class Conversation:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.buffer = b""

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def responses_until_sync(self) -> tuple[list[dict[str, Any]], bool]:
        """Every response before the sync hello's, and whether the agent then closed."""
        responses: list[dict[str, Any]] = []
        while True:
            while b"\n" not in self.buffer:
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return responses, True
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\n")
            response = json.loads(line)
            if response.get("id") == "sync":
                return responses, False
            responses.append(response)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def check_error(response: dict[str, Any], request: object) -> None:
    assert response["ok"] is False, (request, response)
    assert response["error"]["code"] in KNOWN_CODES, response
    assert set(response) == {"id", "ok", "error"}
    wanted_id = request.get("id") if isinstance(request, dict) else None
    if isinstance(wanted_id, str) or type(wanted_id) is int:
        assert response["id"] == wanted_id
    else:
        assert response["id"] is None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity (Python's json accepts them)."""
    return json.loads(data, parse_constant=_no_constants)


def forward_socket(agent: AgentProcess) -> str:
    return str(agent.agent_env.root / "fwd" / "forward.sock")


def exchange(agent: AgentProcess, payload: bytes,
             path: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Send the payload and a sync hello; every response before the sync's.

    Writing happens in a thread while this one reads, as a pipelining client
    must: the agent stops reading while its answers are not being read.
    """
    with Conversation(path or agent.socket) as talk:
        writer = threading.Thread(target=_send_all, args=(talk.sock, payload + b"\n" + SYNC))
        writer.start()
        try:
            return talk.responses_until_sync()
        finally:
            writer.join(30)


def _send_all(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the agent may close first (busy, line too long)
        sock.sendall(data)


# --------------------------------------------------------------------------
# Strategies.

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
ids = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(max_size=20),
                st.integers(min_value=2**63, max_value=10**40), st.none(),
                st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                st.lists(st.integers()))


@st.composite
def harmless_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A known op whose fields may hold anything at all (wrong types, huge numbers)."""
    op = draw(st.sampled_from(HARMLESS_OPS))
    fields = draw(st.dictionaries(
        st.sampled_from(["profile", "token_id", "scope", "audience", "min_valid",
                         "rejected_token", "force_new", "force", "all", "login_id", "timeout",
                         "limit", "v"]),
        json_values, max_size=4))
    if fields.get("timeout") is not None:
        fields["timeout"] = 0  # login_wait would wait for a login that never comes
    return {"id": draw(ids), "op": op, **fields}


@st.composite
def ill_typed_stateful_requests(draw: st.DrawFn) -> dict[str, Any]:
    op, field = draw(st.sampled_from(sorted(STATEFUL_FIELDS.items())))
    value = draw(json_values.filter(lambda v: not isinstance(v, str) or op == "login_start"))
    if op == "login_start" and value in ("browser", "device"):
        value = None if draw(st.booleans()) else 5
    return {"id": draw(st.integers(min_value=0, max_value=10**6)), "op": op, field: value}


# --------------------------------------------------------------------------
# Properties.


@FUZZ
@given(request=harmless_requests())
def test_known_ops_with_any_field_values(fuzzed_agent: AgentProcess,
                                         request: dict[str, Any]) -> None:
    [response], closed = exchange(fuzzed_agent, json.dumps(request).encode())
    assert not closed
    if response["ok"]:  # a request that happened to be valid: a real answer, never a token
        assert response["id"] == request["id"]
        assert "access_token" not in json.dumps(response)
    else:
        check_error(response, request)


@FUZZ
@given(request=ill_typed_stateful_requests())
def test_ops_with_effects_refuse_ill_typed_fields(fuzzed_agent: AgentProcess,
                                                  request: dict[str, Any]) -> None:
    [response], closed = exchange(fuzzed_agent, json.dumps(request).encode())
    assert not closed
    check_error(response, request)
    assert response["error"]["code"] in ("bad_request", "unsupported_version")


@FUZZ
@given(value=json_values, op=st.text(max_size=30))
def test_any_json_that_is_not_a_request(fuzzed_agent: AgentProcess, value: Any, op: str) -> None:
    request = {"id": 1, "op": op} if op not in p.OPS else value
    [response], closed = exchange(fuzzed_agent, json.dumps(request).encode())
    assert not closed
    if isinstance(request, dict) and request.get("op") == "hello":  # drawn by chance
        return
    check_error(response, request)


@FUZZ
@given(garbage=st.binary(max_size=512))
def test_binary_garbage(fuzzed_agent: AgentProcess, garbage: bytes) -> None:
    lines = [line.rstrip(b"\r") for line in garbage.split(b"\n")]
    responses, closed = exchange(fuzzed_agent, garbage)
    assert not closed
    answered = [line for line in lines if line.strip()]
    assert len(responses) == len(answered)
    for line, response in zip(answered, responses, strict=True):
        try:
            request = strict_json(line)
        except ValueError:
            request = None
        if response["ok"]:
            assert isinstance(request, dict)  # only a valid request, by chance
        else:
            check_error(response, request)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(extra=st.integers(min_value=1, max_value=4096), newline=st.booleans())
def test_lines_over_the_limit_are_refused_and_closed(fuzzed_agent: AgentProcess, extra: int,
                                                     newline: bool) -> None:
    line = b'{"id": 1, "op": "hello", "pad": "' + b"x" * (p.MAX_LINE_BYTES + extra) + b'"}'
    with Conversation(fuzzed_agent.socket) as talk:
        # The agent may close while we are still writing: also a refusal.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            talk.sock.sendall(line + (b"\n" if newline else b""))
        responses, closed = talk.responses_until_sync()
    assert closed
    assert [r["error"]["code"] for r in responses] in (["line_too_long"], [])
    [answer], _ = exchange(fuzzed_agent, b'{"id": 2, "op": "hello"}')
    assert answer["ok"] is True


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(prefix=st.binary(min_size=1, max_size=300).filter(lambda b: b"\n" not in b))
def test_half_written_lines_then_disconnect(fuzzed_agent: AgentProcess, prefix: bytes) -> None:
    with Conversation(fuzzed_agent.socket) as talk:
        talk.sock.sendall(prefix)
    [answer], _ = exchange(fuzzed_agent, b'{"id": 3, "op": "hello"}')
    assert answer["ok"] is True


def test_pipelined_garbage_and_requests_keep_their_order(fuzzed_agent: AgentProcess) -> None:
    payload = b"\n".join(
        json.dumps({"id": n, "op": "hello"}).encode() if n % 3 else b"\xff\x00garbage %d" % n
        for n in range(1, 301))
    responses, closed = exchange(fuzzed_agent, payload)
    assert not closed and len(responses) == 300
    for n, response in enumerate(responses, start=1):
        assert response["ok"] is bool(n % 3)
        assert response["id"] == (n if n % 3 else None)


def test_many_idle_connections_then_the_cap_then_recovery(fuzzed_agent: AgentProcess) -> None:
    idle = [Conversation(fuzzed_agent.socket) for _ in range(CAP - 1)]
    try:
        for talk in idle[:5]:  # half-open ones too
            talk.sock.sendall(b'{"id": 1, "op": "hel')
        [answer], _ = exchange(fuzzed_agent, b'{"id": 4, "op": "hello"}')  # the last free slot
        assert answer["ok"] is True
        idle.append(Conversation(fuzzed_agent.socket))  # fills the cap
        # One more: the longest-idle connection (half-open) is closed to make room.
        [answer], closed = exchange(fuzzed_agent, b'{"id": 5, "op": "hello"}')
        assert answer["ok"] is True and not closed
        _, oldest_closed = idle[0].responses_until_sync()
        assert oldest_closed
        # A full forwarding socket takes no place on the main one, nor the reverse.
        [answer], _ = exchange(fuzzed_agent, b'{"id": 6, "op": "hello"}',
                               forward_socket(fuzzed_agent))
        assert answer["ok"] is True and answer["result"]["socket_kind"] == "forward"
    finally:
        for talk in idle:
            talk.sock.close()
    [answer], _ = exchange(fuzzed_agent, b'{"id": 7, "op": "hello"}')
    assert answer["ok"] is True


# --------------------------------------------------------------------------
# Input built to break decoders: depth, numbers, text that is not UTF-8.
# Each runs on the main or the forwarding socket.

SOCKETS = st.sampled_from(["main", "forward"])
DEEP = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: Fields whose deep or odd value is tried: the envelope, typed fields, an unknown one.
FIELDS = ("id", "op", "v", "profile", "scope", "min_valid", "limit", "x")
FORWARD_CODES = ("forbidden",)


def nested(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"0" + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"0" + b"}" * depth
    half = max(depth // 2, 1)
    return b'[{"a":' * half + b"0" + b"}]" * half


def request_line(members: dict[str, bytes], id_first: bool) -> bytes:
    items = list(members.items())
    if not id_first:
        items.reverse()
    return b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in items) + b"}"


def path_of(agent: AgentProcess, which: str) -> str:
    return agent.socket if which == "main" else forward_socket(agent)


class Huge:
    """An integer too long for Python's int() (and msgspec): no type holds it."""


def _parse_int(text: str) -> object:
    return Huge() if len(text.lstrip("-")) >= 4300 else int(text)


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def json_text(line: bytes) -> object | None:
    """The line as RFC 8259 JSON text (UTF-8, no NaN, no lone surrogates), else None."""
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_no_constants,
                           parse_int=_parse_int)
    except (ValueError, RecursionError):
        return None
    return None if _has_lone_surrogate(value) else value


def check_one_line(agent: AgentProcess, which: str, line: bytes,
                   request: object | None, id_readable: bool = True) -> dict[str, Any] | None:
    """Send ``line`` on socket ``which``: one typed answer (or line_too_long and a close),
    and the agent still serves the sync hello after it."""
    responses, closed = exchange(agent, line, path_of(agent, which))
    event("over the line limit" if len(line) + 1 > p.MAX_LINE_BYTES else
          "answered ok" if responses and responses[0]["ok"] else
          f"error: {responses[0]['error']['message'][:40]}" if responses else "no answer")
    if len(line) + 1 > p.MAX_LINE_BYTES:
        assert closed and [r["error"]["code"] for r in responses] in (["line_too_long"], [])
        [answer], _ = exchange(agent, b'{"id": "up", "op": "hello"}', path_of(agent, which))
        assert answer["ok"] is True
        return None
    assert not closed
    [response] = responses
    if response["ok"]:
        assert isinstance(request, dict) and response["id"] == request["id"]
        assert "access_token" not in json.dumps(response)
    elif id_readable:
        check_error(response, request)
    else:  # an id after a value too deep to decode is looked for within a budget only
        assert response["id"] in (None, request.get("id") if isinstance(request, dict) else None)
        assert response["error"]["code"] in KNOWN_CODES
    return response


@DEEP
@given(depth=st.integers(100, 30_000) | st.integers(30_000, 100_000),
       shape=st.sampled_from(["array", "object", "mixed"]), field=st.sampled_from(FIELDS),
       op=st.sampled_from(["hello", "status", "token", "list"]), id_first=st.booleans(),
       which=SOCKETS)
def test_nesting_of_any_depth_in_any_field(fuzzed_agent: AgentProcess, depth: int, shape: str,
                                           field: str, op: str, id_first: bool,
                                           which: str) -> None:
    """Found by the issue: 1,000 levels of `[` raised RecursionError and ended the agent."""
    members = {"id": b"7", "op": json.dumps(op).encode()}
    members[field] = nested(depth, shape)
    line = request_line(members, id_first or field == "id")
    request = {"id": None if field == "id" else 7, "op": op}
    response = check_one_line(fuzzed_agent, which, line, request,
                              id_readable=id_first or shape == "array" or field == "id")
    if response is not None and not response["ok"]:
        allowed = ("bad_request", *FORWARD_CODES, "not_logged_in")
        assert response["error"]["code"] in allowed, response


NUMBERS = (b"1" + b"0" * 5000, b"-" + b"9" * 5000, b"9" * 4299, b"1e999", b"-1e999", b"1e-999",
           b"-0", b"-0.0", b"0e0", b"NaN", b"-NaN", b"Infinity", b"-Infinity",
           b"123456789012345678901234567890", b"1.7976931348623157e309", b"[1e999]")


@DEEP
@given(number=st.sampled_from(NUMBERS), field=st.sampled_from(FIELDS),
       op=st.sampled_from(HARMLESS_OPS), id_first=st.booleans(), which=SOCKETS)
def test_numbers_no_type_holds_in_any_field(fuzzed_agent: AgentProcess, number: bytes,
                                            field: str, op: str, id_first: bool,
                                            which: str) -> None:
    members = {"id": b"7", "op": json.dumps(op).encode()}
    if op == "login_wait":
        members["timeout"] = b"0"
    members[field] = number
    line = request_line(members, id_first)
    check_one_line(fuzzed_agent, which, line, json_text(line))


BAD_TEXT = (b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
            b"\xf0\x9f\x98", b"\x00", b"\x01", b"\\ud800", b"\\udfff", b"\\udc00\\ud800",
            b"\\ud800\\u0041", b"\\u0000")


@DEEP
@given(bad=st.sampled_from(BAD_TEXT), around=st.text(max_size=8).map(
           lambda t: json.dumps(t)[1:-1].encode()),
       field=st.sampled_from(("op", "profile", "audience", "x", "id")),
       op=st.sampled_from(["hello", "status", "token"]), in_key=st.booleans(),
       which=SOCKETS)
def test_text_that_is_not_utf8_nuls_and_lone_surrogates(fuzzed_agent: AgentProcess, bad: bytes,
                                                        around: bytes, field: str, op: str,
                                                        in_key: bool, which: str) -> None:
    text = b'"' + around + bad + around + b'"'
    members = {"id": b"7", "op": json.dumps(op).encode()}
    line = request_line(members, True)
    if in_key:
        line = line[:-1] + b"," + text + b":1}"
    else:
        members[field] = text
        line = request_line(members, True)
    check_one_line(fuzzed_agent, which, line, json_text(line))


def test_memory_stays_bounded(fuzzed_agent: AgentProcess) -> None:
    """Runs after the properties above (file order): thousands of requests later, the agent
    has not grown by more than a few MiB, and one more round does not grow it further."""
    before = rss_kib(fuzzed_agent.pid)
    payload = b"\n".join([b"\xfe" * 200, b'{"id": 1, "op": "token", "scope": [1]}',
                          b'{"id": 2, "op": "nope"}', b"[" * 1000] * 500)
    for _ in range(10):
        responses, closed = exchange(fuzzed_agent, payload)
        assert not closed and len(responses) == 2000
    after = rss_kib(fuzzed_agent.pid)
    assert after - before < 16 * 1024, f"RSS grew from {before} KiB to {after} KiB"
    start = RSS_AT_START[fuzzed_agent.pid]
    assert after - start < 32 * 1024, f"RSS grew from {start} KiB at start to {after} KiB"
    assert "Traceback" not in fuzzed_agent.log()
