"""DPoP (RFC 9449) end to end: the real agent and CLI, the real provider requiring DPoP for
its client compozy-cli-dpop, and a resource server that checks proofs with joserfc and the
token's cnf.jkt by introspection (tests/support/resource_server.py), not with our code."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from compozy_agent.dpop import DpopKey
from compozy_client.dpop import call_with_dpop
from support import canary
from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.keyring_fixture import SecretService
from support.login import configure, login_browser, login_device
from support.provider import DPOP_CLIENT_ID, OidcTestProvider
from support.resource_server import ResourceServer, serving

pytestmark = pytest.mark.real_provider

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


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
        assert "Tokens: DPoP (Ed25519, key thumbprint " in result.stderr
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


def proof_for(agent_env: AgentEnv, resource: ResourceServer) -> dict[str, Any]:
    return cli_json(agent_env, "auth", "dpop-proof", "--method", "GET", "--url",
                    resource.url + "/me")


def test_static_token_tools_are_refused_naming_the_way_out(dpop_agent: AgentProcess) -> None:
    env = dpop_agent.agent_env
    # `compozy auth token` (its fast path and the full CLI), as `Bearer $(...)` would use it.
    for extra in ((), ("--min-valid", "1")):
        result = run_cli(env, "auth", "token", *extra)
        assert result.returncode == 1 and result.stdout == ""
        assert "DPoP-bound" in result.stderr and "token_binding: bearer" in result.stderr
    plain = run_cli(env, "auth", "token", "--force-new")  # not a fast-path flag: the full CLI
    assert plain.returncode == 1 and "token_binding: bearer" in plain.stderr
    assert plain.stdout == ""


def test_the_resource_server_refuses_replays_other_keys_and_reused_proofs(
    dpop_agent: AgentProcess, resource: ResourceServer
) -> None:
    env = dpop_agent.agent_env
    answer = proof_for(env, resource)
    token = answer["access_token"]
    assert get_me(resource, {"Authorization": f"DPoP {token}", "DPoP": answer["proof"]}) \
        .status_code == 200
    # The same proof again (its jti seen), the token alone, the token as a bearer token.
    assert get_me(resource, {"Authorization": f"DPoP {token}", "DPoP": answer["proof"]}) \
        .status_code == 401
    assert get_me(resource, {"Authorization": f"DPoP {token}"}).status_code == 401
    assert get_me(resource, {"Authorization": f"Bearer {token}"}).status_code == 401
    # A thief's own key signing a proof for the stolen token: not the key in cnf.jkt.
    thief = DpopKey.generate("ES256")
    forged = thief.proof("GET", resource.url + "/me", time.time(), access_token=token)
    assert get_me(resource, {"Authorization": f"DPoP {token}", "DPoP": forged}) \
        .status_code == 401
    reasons = [outcome.reason for outcome in resource.outcomes]
    assert reasons == ["ok", "jti reused (replay)", "no DPoP token and proof",
                       "no DPoP token and proof", "cnf.jkt does not match the proof's key"]
    # And the agent's next proof is accepted: one proof, one request.
    again = proof_for(env, resource)
    assert get_me(resource, {"Authorization": f"DPoP {again['access_token']}",
                             "DPoP": again["proof"]}).status_code == 200


def test_browser_login_binds_the_code_and_the_tokens(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, resource: ResourceServer
) -> None:
    configure(agent_env, oidc_provider, client_id=DPOP_CLIENT_ID, token_binding="dpop")
    agent = start_agent(agent_env)
    try:
        result = login_browser(agent_env)
        assert result.returncode == 0, result.stderr + agent.log()
        url = next(line for line in result.stderr.splitlines() if line.startswith("  http"))
        thumbprint = cli_json(agent_env, "auth", "status")["session"]["dpop_thumbprint"]
        assert f"dpop_jkt={thumbprint}" in url  # RFC 9449 section 10
        code = oidc_provider.events("token", grant_type="authorization_code", status=200)[-1]
        assert code["dpop"] and code["token_type"] == "DPoP"
        answer = proof_for(agent_env, resource)
        assert get_me(resource, {"Authorization": f"DPoP {answer['access_token']}",
                                 "DPoP": answer["proof"]}).status_code == 200
    finally:
        agent.stop()


def test_refresh_rotates_with_proofs_and_the_new_token_is_bound_too(
    dpop_agent: AgentProcess, oidc_provider: OidcTestProvider, resource: ResourceServer
) -> None:
    env = dpop_agent.agent_env
    before = oidc_provider.count("token", grant_type="refresh_token", status=200)
    first = proof_for(env, resource)["access_token"]
    assert run_cli(env, "auth", "refresh").returncode == 0
    second = proof_for(env, resource)
    assert second["access_token"] != first
    refreshes = oidc_provider.events("token", grant_type="refresh_token")
    assert oidc_provider.count("token", grant_type="refresh_token", status=200) == before + 1
    assert refreshes[-1]["dpop"] and refreshes[-1]["token_type"] == "DPoP"
    assert "refresh token rotated" in dpop_agent.log()
    assert get_me(resource, {"Authorization": f"DPoP {second['access_token']}",
                             "DPoP": second["proof"]}).status_code == 200


def test_a_refresh_token_without_its_key_is_refused_by_the_provider(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider, storage="file", client_id=DPOP_CLIENT_ID,
              token_binding="dpop")
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0, agent.log()
        secrets_file = agent_env.state_dir / "secrets.json"
        canary.remember_dpop_keys(secrets_file)
        stolen = next(value for name, value in json.loads(secrets_file.read_text()).items()
                      if name.endswith(":refresh_token"))
        form = {"grant_type": "refresh_token", "refresh_token": stolen,
                "client_id": DPOP_CLIENT_ID}
        bare = httpx.post(oidc_provider.token_endpoint, data=form, timeout=10)
        assert bare.status_code == 400, bare.text
        thief = DpopKey.generate("ES256")
        forged = httpx.post(oidc_provider.token_endpoint, data=form, timeout=10, headers={
            "DPoP": thief.proof("POST", oidc_provider.token_endpoint, time.time())})
        assert forged.status_code == 400 and forged.json()["error"] == "invalid_grant", \
            forged.text
        # The agent, holding the key, still refreshes with it.
        assert run_cli(agent_env, "auth", "refresh").returncode == 0, agent.log()
    finally:
        agent.stop()


def test_the_providers_nonce_is_honoured_with_one_retry(
    agent_env: AgentEnv, oidc_provider_factory: Any
) -> None:
    provider = oidc_provider_factory(dpop_require_nonce=True, dpop_algs=("ES256",))
    configure(agent_env, provider, client_id=DPOP_CLIENT_ID, token_binding="dpop")
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0, agent.log()
        assert cli_json(agent_env, "auth", "status")["session"]["dpop_algorithm"] == "ES256"
        demanded = provider.count("token", error="use_dpop_nonce")
        assert demanded == 1  # the first poll; every later request carries the nonce
        assert run_cli(agent_env, "auth", "refresh").returncode == 0, agent.log()
        assert provider.count("token", grant_type="refresh_token", status=200) == 1
        assert provider.count("token", error="use_dpop_nonce") == 1
    finally:
        agent.stop()


def test_the_resource_servers_nonce_is_honoured_with_one_retry(
    dpop_agent: AgentProcess, oidc_provider: OidcTestProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client library's call_with_dpop (what the HTTP adapters use), in this process."""
    for name in ("HOME", "XDG_RUNTIME_DIR", "COMPOZY_AGENT_SOCK", "COMPOZY_STATE_DIR"):
        monkeypatch.setenv(name, dpop_agent.agent_env.env()[name])
    monkeypatch.setenv("COMPOZY_AGENT_AUTOSTART", "0")
    server = ResourceServer(oidc_provider.introspection_endpoint, DPOP_CLIENT_ID,
                            require_nonce=True)
    with serving(server):
        def send(headers: dict[str, str]) -> tuple[int, Any, httpx.Response]:
            response = get_me(server, headers)
            return response.status_code, response.headers, response

        response = call_with_dpop("GET", server.url + "/me", send)
    assert response.status_code == 200
    assert [outcome.reason for outcome in server.outcomes] == ["nonce required", "ok"]


@pytest.mark.real_keyring
def test_a_restarted_agent_signs_with_the_key_from_the_keyring(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, secret_service: SecretService,
    resource: ResourceServer
) -> None:
    agent_env.extra.update(secret_service.env)
    configure(agent_env, oidc_provider, storage="keyring", client_id=DPOP_CLIENT_ID,
              token_binding="dpop")
    agent = start_agent(agent_env)
    assert login_device(agent_env).returncode == 0, agent.log()
    session = cli_json(agent_env, "auth", "status")["session"]
    token_id, thumbprint = session["token_id"], session["dpop_thumbprint"]
    agent.stop(signal.SIGKILL)

    items = {item[0]["username"]: item[2].decode() for item in secret_service.items()
             if item[0].get("service") == "compozy-agent"}
    assert set(items) == {f"{token_id}:refresh_token", f"{token_id}:dpop_key"}
    key = json.loads(items[f"{token_id}:dpop_key"])["pkcs8"]
    state = (agent_env.state_dir / "sessions.json").read_text()
    assert key not in state and thumbprint in state  # the public thumbprint only

    second = start_agent(agent_env)
    try:
        answer = proof_for(agent_env, resource)  # a new access token, refreshed with the key
        response = get_me(resource, {"Authorization": f"DPoP {answer['access_token']}",
                                     "DPoP": answer["proof"]})
        assert response.status_code == 200 and response.json()["jkt"] == thumbprint
        assert key not in second.log()
        assert run_cli(agent_env, "logout").returncode == 0
        left = [item[0]["username"] for item in secret_service.items()
                if item[0].get("service") == "compozy-agent"]
        assert left == []  # the key went with the refresh token
    finally:
        second.stop()


def test_a_key_missing_from_the_store_means_login_required_never_bearer(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider, storage="file", client_id=DPOP_CLIENT_ID,
              token_binding="dpop")
    agent = start_agent(agent_env)
    assert login_device(agent_env).returncode == 0, agent.log()
    agent.stop()
    secrets_file = agent_env.state_dir / "secrets.json"
    canary.remember_dpop_keys(secrets_file)
    entries = json.loads(secrets_file.read_text())
    secrets_file.write_text(json.dumps({name: value for name, value in entries.items()
                                        if not name.endswith(":dpop_key")}))
    before = oidc_provider.count("token", grant_type="refresh_token")
    second = start_agent(agent_env)
    try:
        shown = run_cli(agent_env, "auth", "status", "--json")
        assert shown.returncode == 1  # status exits 1 for a session that needs a login
        session = json.loads(shown.stdout)["session"]
        assert session["state"] == "login_required"
        assert session["token_type"] == "DPoP"
        for args in (("auth", "token", "--json"), ("auth", "dpop-proof", "--method", "GET",
                                                   "--url", "https://api.example/x")):
            result = run_cli(agent_env, *args)
            assert result.returncode == 1 and result.stdout == ""
            assert "DPoP key is missing from the secret store" in result.stderr
            assert "compozy login" in result.stderr
        assert oidc_provider.count("token", grant_type="refresh_token") == before
    finally:
        second.stop()


def test_revoke_all_deletes_the_keys_with_the_refresh_tokens(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider, "default", "work", storage="file",
              client_id=DPOP_CLIENT_ID, token_binding="dpop")
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0, agent.log()
        assert login_device(agent_env, "--profile", "work").returncode == 0, agent.log()
        secrets_file = agent_env.state_dir / "secrets.json"
        assert len(canary.remember_dpop_keys(secrets_file)) == 2
        token_id = cli_json(agent_env, "auth", "status", "--profile", "work")["session"][
            "token_id"]
        assert run_cli(agent_env, "auth", "revoke", token_id).returncode == 0
        names = set(json.loads(secrets_file.read_text()))
        assert not any(name.startswith(token_id) for name in names) and len(names) == 2
        assert run_cli(agent_env, "auth", "revoke-all", "--yes").returncode == 0, agent.log()
        assert json.loads(secrets_file.read_text()) == {}
    finally:
        agent.stop()


def test_the_dpop_key_appears_nowhere_but_the_secret_store(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, resource: ResourceServer
) -> None:
    """The canary check (tests/support/canary.py) runs after this test with this session's
    key in every form: files, logs, every CLI output (dpop-proof's and token's stdout too),
    every process's argv and environment. Here, the places it cannot see."""
    configure(agent_env, oidc_provider, storage="file", client_id=DPOP_CLIENT_ID,
              token_binding="dpop")
    agent = start_agent(agent_env)
    try:
        assert login_browser(agent_env).returncode == 0, agent.log()
        keys = canary.remember_dpop_keys(agent_env.state_dir / "secrets.json")
        assert len(keys) == 1
        outputs = [run_cli(agent_env, *args) for args in (
            ("auth", "dpop-proof", "--method", "GET", "--url", resource.url + "/me", "--json"),
            ("auth", "token", "--json"), ("auth", "refresh"), ("auth", "status", "--json"),
            ("auth", "list"), ("auth", "log", "--json"), ("auth", "token"),
            ("auth", "dpop-proof", "--method", "BAD METHOD", "--url", "x"))]
        assert [o.returncode for o in outputs] == [0, 0, 0, 0, 0, 0, 1, 1]
        assert "key thumbprint" in outputs[4].stdout
        seen = "".join(o.stdout + o.stderr for o in outputs) + agent.log()
        assert not any(key in seen for key in keys)
        assert not any(marker in seen for marker in canary.KEY_MARKERS)
    finally:
        agent.stop()
    leaks = canary.find_leaks(agent_env.root, [("agent log", agent.log())])
    assert not [leak for leak in leaks if "DPoP private key" in leak], leaks


def test_auto_binding_uses_dpop_when_the_provider_lists_it(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    """token_binding: auto with the ordinary client: the provider lists DPoP, so the
    login asks for bound tokens, and gets them (oidc-provider binds when a proof comes)."""
    configure(agent_env, oidc_provider, token_binding="auto")
    agent = start_agent(agent_env)
    try:
        assert login_device(agent_env).returncode == 0, agent.log()
        session = cli_json(agent_env, "auth", "status")["session"]
        assert session["token_type"] == "DPoP"
        assert run_cli(agent_env, "auth", "token").returncode == 1
    finally:
        agent.stop()


ADAPTERS = ["httpx-sync", "httpx-async", "requests"]


def send_through(adapter: str, url: str, method: str = "GET") -> int:
    """One request through a DPoP-unaware program's usual client and our adapter."""
    from compozy_client.httpx import CompozyAuth as HttpxAuth
    from compozy_client.requests import CompozyAuth as RequestsAuth

    if adapter == "requests":
        return requests_send(RequestsAuth(), method, url)
    if adapter == "httpx-sync":
        with httpx.Client(auth=HttpxAuth(), timeout=30) as client:
            return client.request(method, url, content=b"body").status_code

    async def run() -> int:
        async with httpx.AsyncClient(auth=HttpxAuth(), timeout=30) as client:
            return (await client.request(method, url, content=b"body")).status_code

    import asyncio

    return asyncio.run(run())


def requests_send(auth: Any, method: str, url: str) -> int:
    import requests

    return requests.request(method, url, auth=auth, data=b"body", timeout=30).status_code


@pytest.fixture
def library_env(dpop_agent: AgentProcess, monkeypatch: pytest.MonkeyPatch) -> AgentProcess:
    """This process's library calls go to the DPoP test agent."""
    for key, value in dpop_agent.agent_env.env(COMPOZY_AGENT_AUTOSTART="0").items():
        monkeypatch.setenv(key, value)
    for name in ("FLYZT_API_KEY", "COMPOZY_CONFIG", "COMPOZY_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return dpop_agent


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_adapters_send_dpop_and_answer_a_nonce_challenge_once(
    library_env: AgentProcess, oidc_provider: OidcTestProvider, adapter: str
) -> None:
    server = ResourceServer(oidc_provider.introspection_endpoint, DPOP_CLIENT_ID,
                            require_nonce=True)
    before = oidc_provider.count("token", grant_type="refresh_token")
    with serving(server):
        assert send_through(adapter, server.url + "/me", "POST") == 200
    assert [outcome.reason for outcome in server.outcomes] == ["nonce required", "ok"]
    # A nonce demand is not a rejected token: the agent refreshed nothing.
    assert oidc_provider.count("token", grant_type="refresh_token") == before


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_adapters_report_a_rejected_dpop_token_once_and_retry(
    library_env: AgentProcess, oidc_provider: OidcTestProvider, adapter: str
) -> None:
    server = ResourceServer(oidc_provider.introspection_endpoint, DPOP_CLIENT_ID,
                            reject_first_token=True)
    before = oidc_provider.count("token", grant_type="refresh_token", status=200)
    with serving(server):
        assert send_through(adapter, server.url + "/me") == 200
    assert [outcome.reason for outcome in server.outcomes] == ["token refused as revoked", "ok"]
    refreshes = oidc_provider.events("token", grant_type="refresh_token", status=200)
    assert len(refreshes) == before + 1 and refreshes[-1]["dpop"]


def test_the_librarys_static_token_call_is_refused_naming_the_way_out(
    library_env: AgentProcess
) -> None:
    """get_token is what the git, kubectl and registry helpers and `--env` build on."""
    from compozy_client import get_token
    from compozy_client.errors import TokenBindingMismatch

    with pytest.raises(TokenBindingMismatch) as refused:
        get_token()
    assert refused.value.code == "dpop_bound"
    assert "token_binding: bearer" in str(refused.value)


def test_proofs_are_audited_and_refused_while_locked(
    dpop_agent: AgentProcess, resource: ResourceServer
) -> None:
    env = dpop_agent.agent_env
    proof_for(env, resource)
    entries = cli_json(env, "auth", "log")["entries"]
    assert entries[-1]["kind"] == "dpop_proof" and entries[-1]["outcome"] == "issued"
    assert run_cli(env, "auth", "lock", "--passphrase-stdin", input="pw\npw\n").returncode == 0
    locked = run_cli(env, "auth", "dpop-proof", "--method", "GET", "--url", resource.url + "/me")
    assert locked.returncode == 1 and "locked" in locked.stderr and locked.stdout == ""
    assert run_cli(env, "auth", "unlock", "--passphrase-stdin", input="pw\n").returncode == 0
    assert proof_for(env, resource)["token_type"] == "DPoP"
