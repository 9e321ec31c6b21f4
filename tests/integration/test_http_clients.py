"""httpx and requests through the adapters, with the real agent and the real test provider.

The API stand-in (tests/support/bearer_server.py) listens on 127.0.0.1 and
accepts a token when the provider's introspection says it is active, except
the first token it ever sees, which it refuses for good: an API that has just
learnt that token was revoked. (Revoking an access token at the node provider
revokes its whole grant, so the refusal is the API's alone.) Tokens are opaque
(no API resource asked for), which the provider can introspect.

50 concurrent requests that all carry that first token (the server holds them
until all 50 have arrived) all get a 401: each is retried exactly once and
succeeds, and the provider sees exactly one refresh.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import requests

from compozy_client.errors import NotLoggedIn
from compozy_client.httpx import CompozyAuth as HttpxAuth
from compozy_client.requests import CompozyAuth as RequestsAuth
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.bearer_server import BearerServer, RejectFirstToken, introspector
from support.login import login_device
from support.provider import OidcTestProvider

pytestmark = pytest.mark.real_provider

CONCURRENT = 50


def configure_opaque(agent_env: AgentEnv, issuer: str) -> None:
    """The default profile at ``issuer`` without an API resource: opaque tokens."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    agent_env.config.write_text(
        "storage: auto\nprofiles:\n  default:\n"
        f"    issuer: {issuer}\n"
        "    scopes: [openid, profile, email, offline_access]\n")


def use_agent_env(agent_env: AgentEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's library calls at the test agent."""
    for key, value in agent_env.env(COMPOZY_AGENT_AUTOSTART="0").items():
        monkeypatch.setenv(key, value)
    for name in ("FLYZT_API_KEY", "COMPOZY_CONFIG", "COMPOZY_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def agent(agent_env: AgentEnv, oidc_provider: OidcTestProvider,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentProcess]:
    """A real agent with a device login at the test provider; the library points at it."""
    configure_opaque(agent_env, oidc_provider.issuer)
    started = start_agent(agent_env)
    try:
        use_agent_env(agent_env, monkeypatch)
        yield started
    finally:
        started.stop()


@pytest.fixture
def logged_in(agent: AgentProcess) -> AgentProcess:
    login = login_device(agent.agent_env)
    assert login.returncode == 0, login.stderr + agent.log()
    return agent


@pytest.fixture
def api(oidc_provider: OidcTestProvider) -> Iterator[BearerServer]:
    active = introspector(oidc_provider.introspection_endpoint, oidc_provider.client_id)
    with BearerServer(RejectFirstToken(active), together=CONCURRENT) as server:
        yield server


def refreshes(provider: OidcTestProvider) -> int:
    return provider.count_token_calls("refresh_token")


def check_one_retry_each(api: BearerServer, answers: list[tuple[int, int]],
                         provider: OidcTestProvider, refreshes_before: int,
                         login_token: str) -> None:
    """Every request got 200 after exactly one 401; one refresh in all."""
    assert len(answers) == CONCURRENT
    assert all(answer == (200, 1) for answer in answers), sorted(set(answers))
    tokens = api.tokens()
    assert len(tokens) == 2 * CONCURRENT  # each sent twice, never three times
    assert tokens.count(login_token) == CONCURRENT, "every request first carried the login's token"
    assert len(set(tokens)) == 2, f"{len(set(tokens))} different tokens"  # (counted, not shown)
    assert api.statuses().count(401) == CONCURRENT
    assert refreshes(provider) == refreshes_before + 1


def test_50_concurrent_httpx_async_requests_refused_once_cost_one_refresh(
    logged_in: AgentProcess, api: BearerServer, oidc_provider: OidcTestProvider
) -> None:
    login_token = run_cli(logged_in.agent_env, "auth", "token").stdout.strip()
    before = refreshes(oidc_provider)

    async def run() -> list[tuple[int, int]]:
        limits = httpx.Limits(max_connections=CONCURRENT)
        async with httpx.AsyncClient(auth=HttpxAuth(), timeout=60, limits=limits) as client:
            start = asyncio.Event()

            async def one(number: int) -> tuple[int, int]:
                await start.wait()
                response = await client.get(f"{api.url}/things/{number}")
                return response.status_code, len(response.history)

            tasks = [asyncio.create_task(one(number)) for number in range(CONCURRENT)]
            start.set()
            return list(await asyncio.gather(*tasks))

    answers = asyncio.run(run())
    check_one_retry_each(api, answers, oidc_provider, before, login_token)


def test_50_threads_through_requests_refused_once_cost_one_refresh(
    logged_in: AgentProcess, api: BearerServer, oidc_provider: OidcTestProvider
) -> None:
    login_token = run_cli(logged_in.agent_env, "auth", "token").stdout.strip()
    before = refreshes(oidc_provider)
    auth = RequestsAuth()  # one auth object shared by every thread
    answers: list[tuple[int, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(CONCURRENT)

    def one(number: int) -> None:
        start.wait()
        with requests.Session() as session:
            response = session.get(f"{api.url}/things/{number}", auth=auth, timeout=60)
        with lock:
            answers.append((response.status_code, len(response.history)))

    threads = [threading.Thread(target=one, args=(number,)) for number in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads)
    check_one_retry_each(api, answers, oidc_provider, before, login_token)


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_a_server_refusing_every_token_gets_one_retry_then_its_401(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider, client: str
) -> None:
    """The login's token, then one replacement (one refresh), then the 401 is the answer.
    (A second request within 5 s is not retried: the agent does not replace its own fresh
    replacement; tests/client/test_http_adapters.py proves the adapters' side of that.)"""
    before = refreshes(oidc_provider)
    with BearerServer(lambda token: False) as refusing:
        if client == "httpx":
            with httpx.Client(auth=HttpxAuth(), timeout=30) as http:
                response = http.get(f"{refusing.url}/things")
                answer = (response.status_code, len(response.history))
        else:
            got = requests.get(f"{refusing.url}/things", auth=RequestsAuth(), timeout=30)
            answer = (got.status_code, len(got.history))
        tokens = refusing.tokens()
    assert answer == (401, 1)
    assert len(tokens) == 2 and len(set(tokens)) == 2
    assert refreshes(oidc_provider) == before + 1


@pytest.mark.parametrize("client", ["httpx-sync", "httpx-async", "requests"])
def test_not_logged_in_raises_not_logged_in_at_once(agent: AgentProcess, client: str) -> None:
    """A running agent with no session: the library's typed error, fast, nothing sent."""
    def call(api: BearerServer) -> None:
        if client == "requests":
            requests.get(f"{api.url}/things", auth=RequestsAuth(), timeout=30)
        elif client == "httpx-sync":
            httpx.get(f"{api.url}/things", auth=HttpxAuth(), timeout=30)
        else:
            async def run() -> None:
                async with httpx.AsyncClient(auth=HttpxAuth(), timeout=30) as http:
                    await http.get(f"{api.url}/things")

            asyncio.run(run())

    started = time.monotonic()
    with BearerServer(lambda token: True) as api, \
            pytest.raises(NotLoggedIn, match=r"not logged in \(profile 'default'\)"):
        call(api)
    assert time.monotonic() - started < 10
    assert api.seen == []
