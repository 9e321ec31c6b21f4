"""DPoP (RFC 9449) end to end: the real agent and CLI, the real provider requiring DPoP for
its client compozy-cli-dpop, and a resource server that checks proofs with joserfc and the
token's cnf.jkt by introspection (tests/support/resource_server.py), not with our code."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from compozy_agent.dpop import DpopKey
from compozy_client.dpop import call_with_dpop
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.login import configure, login_browser, login_device
from support.provider import DPOP_CLIENT_ID, OidcTestProvider
from support.resource_server import ResourceServer, serving

pytestmark = pytest.mark.real_provider


def cli_json(agent_env: AgentEnv, *args: str) -> dict[str, Any]:
    result = run_cli(agent_env, *args, "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def get_me(resource: ResourceServer, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(resource.url + "/me", headers=headers, timeout=10)


@pytest.fixture
def dpop_agent(agent_env: AgentEnv, oidc_provider: OidcTestProvider) -> Iterator[AgentProcess]:
    configure(agent_env, oidc_provider, client_id=DPOP_CLIENT_ID, token_binding="dpop")
    agent = start_agent(agent_env)
    try:
        result = login_device(agent_env)
        assert result.returncode == 0, result.stderr + agent.log()
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def resource(oidc_provider: OidcTestProvider) -> Iterator[ResourceServer]:
    with serving(ResourceServer(oidc_provider.introspection_endpoint, DPOP_CLIENT_ID)) as server:
        yield server


def test_device_login_gets_dpop_bound_tokens_a_resource_server_accepts(
    dpop_agent: AgentProcess, oidc_provider: OidcTestProvider, resource: ResourceServer
) -> None:
    env = dpop_agent.agent_env
    token = cli_json(env, "auth", "token")
    assert token["token_type"] == "DPoP"
    session = cli_json(env, "auth", "status")["session"]
    assert session["token_type"] == "DPoP" and session["dpop_algorithm"] == "Ed25519"
    assert "key thumbprint " + session["dpop_thumbprint"] in \
        run_cli(env, "auth", "status").stdout
    assert oidc_provider.events("token", grant_type=DEVICE_GRANT, status=200)[-1]["dpop"]

    answer = cli_json(env, "auth", "dpop-proof", "--method", "GET", "--url",
                      resource.url + "/me?x=1")
    assert answer["access_token"] == token["access_token"]
    response = get_me(resource, {"Authorization": f"DPoP {answer['access_token']}",
                                 "DPoP": answer["proof"]})
    assert response.status_code == 200, resource.outcomes
    assert response.json()["jkt"] == session["dpop_thumbprint"]


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
