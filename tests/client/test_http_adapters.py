"""The httpx and requests adapters against a stand-in agent and a local API (127.0.0.1).

Each behaviour runs with the three ways a program sends: httpx's sync client,
httpx's async client, requests. The agent stand-in answers token requests the
way the real one does (a new token for a ``rejected_token`` naming the current
one); the real agent and provider are in tests/integration/test_http_clients.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from compozy_client.errors import AgentUnavailable, NotLoggedIn, UsageError
from compozy_client.httpauth import check_transport
from compozy_client.httpx import CompozyAuth as HttpxAuth
from compozy_client.requests import CompozyAuth as RequestsAuth
from support.bearer_server import BearerServer, chunks
from support.fake_agent import answering_socket
from support.other_user import port_held_by_another_user

CLIENTS = ["httpx-sync", "httpx-async", "requests"]


class StandInAgent:
    """Hands out tok-1, tok-2, ...: a rejected_token naming the current one moves on.

    ``replace`` says how a rejection is answered: "new" (a new token), "refuse"
    (refresh_failed, as the agent answers a second rejection within 5 s), "same"
    (the same credential, as for an API key); ``logged_in=False`` answers every
    request not_logged_in.
    """

    def __init__(self, replace: str = "new", logged_in: bool = True) -> None:
        self.replace = replace
        self.logged_in = logged_in
        self.requests: list[dict[str, Any]] = []
        self.current = 1
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> bytes:
        with self._lock:
            self.requests.append(request)
            if not self.logged_in:
                return self._error("not_logged_in", "no session for profile default; "
                                                    "run: compozy login")
            if request.get("rejected_token") == f"tok-{self.current}":
                if self.replace == "refuse":
                    return self._error("refresh_failed", "that token is already a replacement")
                if self.replace == "new":
                    self.current += 1
            token = f"tok-{self.current}"
        return json.dumps({"id": request["id"], "ok": True,
                           "result": {"access_token": token, "expires_at": 4e9}}).encode() + b"\n"

    @staticmethod
    def _error(code: str, message: str) -> bytes:
        return json.dumps({"id": 1, "ok": False,
                           "error": {"code": code, "message": message}}).encode() + b"\n"

    def rejections(self) -> list[str | None]:
        return [request.get("rejected_token") for request in self.requests]


@pytest.fixture
def agent_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the stand-in agent listens; the library's environment points there."""
    path = str(tmp_path / "agent.sock")
    monkeypatch.setenv("COMPOZY_AGENT_SOCK", path)
    monkeypatch.setenv("COMPOZY_AGENT_AUTOSTART", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("FLYZT_API_KEY", "COMPOZY_CONFIG", "COMPOZY_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return path


def send(client: str, url: str, body: object = None, **auth: Any) -> tuple[int, int]:
    """POST ``body`` (None: a GET) to ``url`` through ``client`` with the adapter; the final
    status, and how many answers came before it (the 401 that was retried)."""
    if client == "requests":
        with requests.Session() as session:
            answer = session.request("GET" if body is None else "POST", url, data=body,
                                     auth=RequestsAuth(**auth), timeout=10)
            return answer.status_code, len(answer.history)
    method = "GET" if body is None else "POST"
    if client == "httpx-sync":
        with httpx.Client(auth=HttpxAuth(**auth), timeout=10, follow_redirects=True) as sync_client:
            response = sync_client.request(method, url, content=body)
            return response.status_code, len(response.history)

    async def run() -> tuple[int, int]:
        async with httpx.AsyncClient(auth=HttpxAuth(**auth), timeout=10,
                                     follow_redirects=True) as async_client:
            content = _async_chunks(body) if isinstance(body, Iterator) else body
            response = await async_client.request(method, url,
                                                   content=content)
            return response.status_code, len(response.history)

    return asyncio.run(run())


async def _async_chunks(parts: Iterator[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def refuse_first(accepted: Callable[[str], bool] = lambda token: True) -> Callable[[str], bool]:
    """A policy refusing tok-1 and accepting what ``accepted`` accepts."""
    return lambda token: token != "tok-1" and accepted(token)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_401_gets_one_new_token_and_one_retry(agent_path: str, client: str) -> None:
    agent = StandInAgent()
    with answering_socket(agent_path, agent), BearerServer(refuse_first()) as api:
        assert send(client, f"{api.url}/things") == (200, 1)
    assert api.tokens() == ["tok-1", "tok-2"] and api.statuses() == [401, 200]
    assert agent.rejections() == [None, "tok-1"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_server_refusing_every_token_gets_exactly_one_retry_and_its_401_back(
    agent_path: str, client: str
) -> None:
    agent = StandInAgent()
    with answering_socket(agent_path, agent), BearerServer(lambda token: False) as api:
        assert send(client, f"{api.url}/things") == (401, 1)
        assert send(client, f"{api.url}/things") == (401, 1)
    assert api.tokens() == ["tok-1", "tok-2", "tok-2", "tok-3"]
    assert agent.rejections() == [None, "tok-1", None, "tok-2"]


@pytest.mark.parametrize("replace", ["refuse", "same"])
@pytest.mark.parametrize("client", CLIENTS)
def test_no_retry_when_the_agent_has_no_other_token(
    agent_path: str, client: str, replace: str
) -> None:
    """The agent refuses a second replacement within 5 s (refresh_failed), or the credential
    is an API key the agent hands back as it is: the 401 is the answer, not an exception."""
    agent = StandInAgent(replace=replace)
    with answering_socket(agent_path, agent), BearerServer(refuse_first()) as api:
        assert send(client, f"{api.url}/things") == (401, 0)
    assert api.tokens() == ["tok-1"]
    assert agent.rejections() == [None, "tok-1"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_body_in_memory_is_sent_again_unchanged(agent_path: str, client: str) -> None:
    agent = StandInAgent()
    with answering_socket(agent_path, agent), BearerServer(refuse_first()) as api:
        assert send(client, f"{api.url}/upload", b"payload") == (200, 1)
    assert [seen.body for seen in api.seen] == [b"payload", b"payload"]


def test_requests_rewinds_a_file_body_to_send_it_again(agent_path: str) -> None:
    agent = StandInAgent()
    upload = io.BytesIO(b"header|payload")
    upload.seek(len(b"header|"))  # the body starts where the file stood when it was sent
    with answering_socket(agent_path, agent), BearerServer(refuse_first()) as api:
        assert send("requests", f"{api.url}/upload", upload) == (200, 1)
    assert [seen.body for seen in api.seen] == [b"payload", b"payload"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_streamed_body_is_not_sent_again_but_the_rejection_is_reported(
    agent_path: str, client: str
) -> None:
    """A generator cannot be replayed: its 401 is the answer; the agent still hears of the
    rejection, so the next request gets the new token at once."""
    agent = StandInAgent()
    with answering_socket(agent_path, agent), BearerServer(refuse_first()) as api:
        assert send(client, f"{api.url}/upload", chunks(b"pay", b"load")) == (401, 0)
        assert send(client, f"{api.url}/things") == (200, 0)
    assert [seen.body for seen in api.seen] == [b"payload", b""]
    assert api.tokens() == ["tok-1", "tok-2"]
    assert agent.rejections() == [None, "tok-1", None]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_401_from_another_host_after_a_redirect_costs_no_refresh(
    agent_path: str, client: str
) -> None:
    """The redirect target never saw our token (the client drops it across hosts), so its 401
    says nothing about the token: no rejection reported, no retry to the first host."""
    agent = StandInAgent()
    with answering_socket(agent_path, agent), BearerServer(lambda token: True) as api, \
            BearerServer(lambda token: False, host="127.0.0.2") as elsewhere:
        status = send(client, f"{api.url}/redirect?to={elsewhere.url}/there")[0]
    assert status == 401
    assert api.tokens() == ["tok-1"] and elsewhere.tokens() == [None]
    assert agent.rejections() == [None]


@pytest.mark.parametrize("client", CLIENTS)
def test_not_logged_in_raises_the_typed_error_and_sends_nothing(
    agent_path: str, client: str
) -> None:
    agent = StandInAgent(logged_in=False)
    with answering_socket(agent_path, agent), BearerServer(lambda token: True) as api, \
            pytest.raises(NotLoggedIn, match="compozy login"):
        send(client, f"{api.url}/things")
    assert api.seen == []


@pytest.mark.parametrize("client", CLIENTS)
def test_no_agent_raises_agent_unavailable_and_sends_nothing(
    agent_path: str, client: str
) -> None:
    with BearerServer(lambda token: True) as api, pytest.raises(AgentUnavailable):
        send(client, f"{api.url}/things", timeout=5)
    assert api.seen == []


def test_scope_may_be_a_space_separated_string() -> None:
    assert HttpxAuth(scope="a b").source.scope == ("a", "b")
    assert RequestsAuth(scope=["a", "b"]).source.scope == ("a", "b")
    assert RequestsAuth().source.scope is None


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("url", ["http://api.example.test/things", "http://10.0.0.1/things",
                                 "http://127.0.0.1.example.test/things"])
def test_no_token_goes_over_plain_http_beyond_this_machine(
    agent_path: str, client: str, url: str
) -> None:
    """RFC 6750 section 5.3: refused before the agent is asked, so nothing is sent anywhere
    (the hosts are never resolved: the refusal comes first)."""
    agent = StandInAgent()
    with answering_socket(agent_path, agent), \
            pytest.raises(UsageError, match="refusing to send a Compozy token over http"):
        send(client, url)
    assert agent.requests == []


@pytest.mark.parametrize(
    ("url", "https_only", "allowed"),
    [("https://api.example.test/", True, True), ("http://127.0.0.1:8080/", True, True),
     ("http://127.3.4.5/", True, True), ("http://[::1]:8080/", True, True),
     ("http://localhost/", True, True), ("http://api.localhost/", True, True),
     ("http://api.example.test/", True, False), ("http://[::2]/", True, False),
     ("ftp://api.example.test/", True, False), ("http://api.example.test/", False, True)],
)
def test_which_urls_a_token_may_be_sent_to(url: str, https_only: bool, allowed: bool) -> None:
    if allowed:
        check_transport(url, https_only)
    else:
        with pytest.raises(UsageError):
            check_transport(url, https_only)


@pytest.mark.parametrize("client", CLIENTS)
def test_plain_http_to_a_port_another_user_holds_gets_no_token(
    agent_path: str, client: str
) -> None:
    """The developer's http://127.0.0.1:PORT API is down and uid 65534 took its port:
    refused before the agent is asked, so the token never reaches them."""
    agent = StandInAgent()
    with port_held_by_another_user("0.0.0.0") as port, answering_socket(agent_path, agent), \
            pytest.raises(UsageError, match="served by uid 65534"):
        send(client, f"http://127.0.0.1:{port}/things")
    assert agent.requests == []


@pytest.mark.parametrize("client", CLIENTS)
def test_the_config_rules_pick_the_profile_and_audience_by_the_request_url(
    agent_path: str, tmp_path: Path, client: str
) -> None:
    """`rules:` with a url_prefix: one adapter, two APIs, two sessions; the retry after a 401
    asks the same session. An explicit profile wins over the rule."""
    config = tmp_path / ".compozy" / "config.yaml"
    config.parent.mkdir()
    agent = StandInAgent()
    with answering_socket(agent_path, agent), BearerServer(refuse_first()) as api:
        config.write_text("rules:\n"
                          f"  - match: {{url_prefix: '{api.url}/work/'}}\n"
                          "    profile: work\n"
                          "    audience: https://api.work.test\n")
        config.chmod(0o600)
        assert send(client, f"{api.url}/work/things") == (200, 1)
        assert send(client, f"{api.url}/other") == (200, 0)
        assert send(client, f"{api.url}/work/things", profile="mine") == (200, 0)
    asked = [(request["profile"], request.get("audience"), request.get("rejected_token"))
             for request in agent.requests]
    assert asked == [("work", "https://api.work.test", None),
                     ("work", "https://api.work.test", "tok-1"),
                     ("default", None, None), ("mine", None, None)]
