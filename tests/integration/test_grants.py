"""A narrower token never widens the login's grant; forced refreshes are spaced.

Against the real OpenID provider (node oidc-provider), which rotates refresh
tokens and, asked for an unknown audience, spends the refresh token before it
answers ``invalid_target``: a typo used to end the session. And a caller
forcing new tokens in a loop used to rotate the refresh token (and write it to
the secret store) on every call. The timing of the spacing (RECENT seconds) is
proven on the fake clock in tests/agent; here the real agent, on both sockets.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from compozy_agent.oidc import decode_jwt_claims
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.login import configure, login_browser
from support.provider import OidcTestProvider
from support.wire import ask

pytestmark = pytest.mark.real_provider

#: The scopes configure() asks for at login, as the refusal lists them.
GRANTED = "compozy:read compozy:write email offline_access openid profile"


@pytest.fixture
def logged_in(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[AgentProcess]:
    """A real agent with a forwarding socket, and a browser login granted the test API."""
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env, "--forward-socket", forward_socket(agent_env))
    try:
        result = login_browser(agent_env)
        assert result.returncode == 0, result.stderr + agent.log()
        yield agent
    finally:
        agent.stop()


def forward_socket(agent_env: AgentEnv) -> str:
    return str(agent_env.root / "fwd" / "forward.sock")


def refresh_calls(provider: OidcTestProvider, **match: Any) -> int:
    return provider.count_token_calls("refresh_token", **match)


@pytest.mark.parametrize(
    ("scope", "audience", "refusal"),
    [
        (None, "https://api.compozy.dev/",
         "audience https://api.compozy.dev/ was not granted to this session; "
         "granted: https://api.compozy.dev"),
        ("compozy:deploy", "https://api.compozy.dev",
         f"scope compozy:deploy was not granted to this session; granted: {GRANTED}"),
        ("compozy:deploy", None,
         f"scope compozy:deploy was not granted to this session; granted: {GRANTED}"),
    ],
    ids=["audience-with-a-trailing-slash", "scope-for-the-api", "scope"],
)
def test_a_narrower_token_beyond_the_grant_is_refused_before_the_provider_is_asked(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider,
    scope: str | None, audience: str | None, refusal: str,
) -> None:
    env = logged_in.agent_env
    assert oidc_provider.api == "https://api.compozy.dev"
    args = [*(["--scope", scope] if scope else []), *(["--audience", audience] if audience else [])]
    before = refresh_calls(oidc_provider)
    succeeded_before = refresh_calls(oidc_provider, status=200)
    for extra in ([], ["--force-new"]):
        result = run_cli(env, "auth", "token", *args, *extra)
        assert result.returncode != 0 and result.stdout == ""
        assert refusal in result.stderr, result.stderr
    answer = ask(forward_socket(env), {"id": 1, "op": "token", "audience": audience,
                                       "scope": [scope] if scope else None})
    assert answer["ok"] is False and answer["error"]["code"] == "bad_request"
    assert answer["error"]["message"] == refusal
    assert refresh_calls(oidc_provider) == before  # not one call: nothing spent

    # The session lives on: narrower tokens it was granted spend the refresh token twice
    # (rotating it each time), and the default token is still served.
    for scope in ("compozy:read", "compozy:write"):
        token = run_cli(env, "auth", "token", "--audience", oidc_provider.api, "--scope", scope)
        assert token.returncode == 0, token.stderr + logged_in.log()
        claims = decode_jwt_claims(token.stdout.strip())
        assert claims["aud"] == oidc_provider.api and claims["scope"] == scope
    assert refresh_calls(oidc_provider) == before + 2
    assert refresh_calls(oidc_provider, status=200) == succeeded_before + 2
    assert run_cli(env, "auth", "token").returncode == 0
    status = json.loads(run_cli(env, "auth", "status", "--json").stdout)
    assert status["session"]["state"] in ("fresh", "expiring")


def test_a_burst_of_200_force_new_requests_makes_one_refresh(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    """200 force_new requests (`compozy auth token --force-new`), from 20 callers at once
    on the main and the forwarding socket, 10 each one after another: one refresh at the
    provider, and every caller gets the one new token. (Before: one refresh, one rotation
    and one secret-store write per request.)"""
    env = logged_in.agent_env
    login_token = run_cli(env, "auth", "token").stdout.strip()
    request = {"op": "token", "force_new": True}
    before = refresh_calls(oidc_provider)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def caller(path: str) -> None:
        start.wait()
        for number in range(10):
            answer = ask(path, {"id": number, **request})
            with lock:
                answers.append(answer)

    callers = [threading.Thread(target=caller, args=(path,))
               for path in [env.socket, forward_socket(env)] * 10]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(60)
    assert not any(thread.is_alive() for thread in callers)
    assert len(answers) == 200
    assert all(answer["ok"] for answer in answers), [a for a in answers if not a["ok"]][:3]
    tokens = {answer["result"]["access_token"] for answer in answers}
    # (Messages count tokens rather than show them.)
    assert len(tokens) == 1, f"{len(tokens)} different tokens"
    assert login_token not in tokens, "the first force did not make a new token"
    assert refresh_calls(oidc_provider) == before + 1
    assert run_cli(env, "auth", "token").stdout.strip() in tokens, "the CLI got another token"


def test_a_forwarded_caller_rejecting_every_token_it_gets_makes_one_refresh(
    logged_in: AgentProcess, oidc_provider: OidcTestProvider
) -> None:
    """The forwarding socket's other way to force a refresh: report each token rejected
    (as after a 401). The first report replaces the token; reports of the replacement
    within RECENT seconds are refused with a time to ask again, and the token is kept."""
    forward = forward_socket(logged_in.agent_env)
    before = refresh_calls(oidc_provider)
    token = ask(forward, {"id": 1, "op": "token"})["result"]["access_token"]
    replaced = ask(forward, {"id": 2, "op": "token", "rejected_token": token})
    assert replaced["ok"] is True
    token = replaced["result"]["access_token"]
    for number in range(50):
        answer = ask(forward, {"id": number, "op": "token", "rejected_token": token})
        assert answer["ok"] is False and answer["error"]["code"] == "refresh_failed"
        assert "ask again in" in answer["error"]["message"]
        assert token not in answer["error"]["message"], "the message shows the token"
        again = ask(forward, {"id": number, "op": "token"})["result"]["access_token"]
        assert again == token, "the rejected replacement was not kept"
    assert refresh_calls(oidc_provider) == before + 1
