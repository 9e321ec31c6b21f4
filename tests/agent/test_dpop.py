"""DPoP (RFC 9449) in the agent: keys, proofs checked by joserfc, the token endpoint's nonce,
token binding at login, and the ``token`` / ``dpop_proof`` ops for bound sessions."""

from __future__ import annotations

import base64
import json
import pickle
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from compozy_agent import oidc
from compozy_agent.backend import OpError
from compozy_agent.dpop import DpopKey, DpopKeyError, choose_algorithm, normalize_htu
from compozy_agent.dpop_binding import check_token_type, new_login_key
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import AccessToken, Secret, SessionLifecycle
from compozy_agent.logins import Login
from compozy_agent.manager import SessionManager
from compozy_agent.peer import Peer
from compozy_agent.sessions import Session
from compozy_agent.store import MemorySecrets, SessionStore, StoredSession
from compozy_client import protocol as p
from compozy_client.errors import ErrorCode
from support.clock import FakeClock
from support.dpop_verifier import DpopVerifier, ProofRejected, access_token_hash

PEER = Peer(uid=0, gid=0, pid=None)
TOKEN_URL = "https://auth.example.test/token"
META = oidc.ProviderMetadata(issuer="https://auth.example.test", token_endpoint=TOKEN_URL)


def claims_of(proof: str) -> dict[str, object]:
    part = proof.split(".")[1]
    value: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return value


# ------------------------------------------------------------------ keys and proofs


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "Ed25519"])
def test_proofs_verify_with_an_independent_jose_library(algorithm: str) -> None:
    key = DpopKey.generate(algorithm)  # type: ignore[arg-type]
    verifier = DpopVerifier()
    proof = key.proof("POST", "https://api.example.test/v1/deploy?x=1#frag", time.time(),
                      nonce="n-1", access_token="at-123")
    verified = verifier.verify(proof, "POST", "https://api.example.test/v1/deploy",
                               access_token="at-123")
    assert verified.thumbprint == key.thumbprint  # RFC 7638, computed by joserfc
    claims = verified.claims
    assert claims["htu"] == "https://api.example.test/v1/deploy"  # no query, no fragment
    assert claims["nonce"] == "n-1" and claims["ath"] == access_token_hash("at-123")
    header = json.loads(base64.urlsafe_b64decode(proof.split(".")[0] + "=="))
    assert header["typ"] == "dpop+jwt" and header["alg"] == algorithm
    assert "d" not in header["jwk"]  # the public half only
    with pytest.raises(ProofRejected, match="replay"):
        verifier.verify(proof, "POST", "https://api.example.test/v1/deploy",
                        access_token="at-123")


def test_each_proof_has_its_own_jti_and_binds_only_its_token() -> None:
    key = DpopKey.generate("ES256")
    proofs = [key.proof("GET", "https://a.test/", 1000.0, access_token="t") for _ in range(50)]
    assert len({claims_of(proof)["jti"] for proof in proofs}) == 50
    verifier = DpopVerifier(now=lambda: 1000.0)
    with pytest.raises(ProofRejected, match="ath"):
        verifier.verify(proofs[0], "GET", "https://a.test/", access_token="another")
    # Another key's signature under this proof's header (its jwk): does not verify.
    forged = DpopKey.generate("ES256").proof("GET", "https://a.test/", 1000.0, access_token="t")
    parts = proofs[1].split(".")
    spliced = f"{parts[0]}.{parts[1]}.{forged.split('.')[2]}"
    with pytest.raises(ProofRejected, match="signature"):
        verifier.verify(spliced, "GET", "https://a.test/", access_token="t")


def test_a_stored_key_round_trips_and_a_bad_one_says_nothing_of_its_contents() -> None:
    key = DpopKey.generate("ES256")
    secret = key.to_secret()
    again = DpopKey.from_secret(secret)
    assert again.thumbprint == key.thumbprint and again.algorithm == "ES256"
    pkcs8 = json.loads(secret)["pkcs8"]
    assert pkcs8 not in repr(key) and pkcs8 not in key.description
    for broken in ("", "not json", secret.replace(pkcs8, pkcs8[:40]),
                   json.dumps({"v": 1, "alg": "RS256", "pkcs8": pkcs8}),
                   json.dumps({"v": 2, "alg": "ES256", "pkcs8": pkcs8})):
        with pytest.raises(DpopKeyError) as caught:
            DpopKey.from_secret(broken)
        assert pkcs8[:20] not in str(caught.value) and caught.value.__cause__ is None
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_algorithm_choice_and_bad_targets() -> None:
    assert choose_algorithm(["ES256", "Ed25519", "EdDSA"]) == "Ed25519"
    assert choose_algorithm(["ES256", "EdDSA"]) == "EdDSA"
    assert choose_algorithm(["RS256", "ES256"]) == "ES256"
    assert choose_algorithm(None) == "ES256"
    assert choose_algorithm(["RS256", "PS256"]) is None
    assert normalize_htu("HTTPS://h.test:8443/p?q#f") == "https://h.test:8443/p"
    key = DpopKey.generate("ES256")
    for method, url in (("GET", "ftp://h.test/"), ("GET", "/relative"), ("G T", "https://h/"),
                        ("GET", "https://h.test/a b"), ("", "https://h.test/")):
        with pytest.raises(DpopKeyError):
            key.proof(method, url, 0.0)
    with pytest.raises(DpopKeyError, match="nonce"):
        key.proof("GET", "https://h.test/", 0.0, nonce='bad "nonce"')


# ------------------------------------------------------------------ the token endpoint's nonce


async def send_refresh(handler: Callable[[httpx.Request], httpx.Response],
                       key: DpopKey) -> tuple[list[httpx.Request], object]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    async with ProviderClient(now=time.time, transport=httpx.MockTransport(record)) as client:
        signer = lambda method, url, nonce: key.proof(method, url, time.time(),  # noqa: E731
                                                      nonce=nonce)
        try:
            outcome: object = await client.refresh(META, client_id="cli", refresh_token="rt",
                                                   dpop=signer)
        except oidc.OAuthFailure as exc:
            outcome = exc
        if isinstance(outcome, oidc.TokenResponse):
            # The nonce is kept for the next request to this endpoint.
            await client.refresh(META, client_id="cli", refresh_token="rt", dpop=signer)
    return seen, outcome


def nonce_demand(nonce: str) -> httpx.Response:
    return httpx.Response(400, json={"error": "use_dpop_nonce", "error_description": "nonce"},
                          headers={"DPoP-Nonce": nonce})


def dpop_tokens() -> httpx.Response:
    return httpx.Response(200, json={"access_token": "at", "token_type": "DPoP",
                                     "expires_in": 60, "refresh_token": "rt2"},
                          headers={"DPoP-Nonce": "n-2"})


@pytest.mark.anyio
async def test_a_nonce_demand_is_answered_once_with_the_nonce() -> None:
    answers = iter([nonce_demand("n-1"), dpop_tokens(), dpop_tokens()])
    seen, outcome = await send_refresh(lambda request: next(answers), DpopKey.generate("ES256"))
    assert isinstance(outcome, oidc.TokenResponse) and outcome.token_type == "DPoP"
    nonces = [claims_of(request.headers["DPoP"]).get("nonce") for request in seen]
    assert nonces == [None, "n-1", "n-2"]  # retried with it; the newest one kept
    assert len({claims_of(request.headers["DPoP"])["jti"] for request in seen}) == 3


@pytest.mark.anyio
async def test_a_second_nonce_demand_is_the_answer_not_a_loop() -> None:
    seen, outcome = await send_refresh(lambda request: nonce_demand("n-x"),
                                       DpopKey.generate("ES256"))
    assert len(seen) == 2
    assert isinstance(outcome, oidc.OAuthError) and outcome.error == "use_dpop_nonce"


@pytest.mark.anyio
async def test_an_invalid_nonce_header_is_not_retried() -> None:
    seen, outcome = await send_refresh(lambda request: nonce_demand('bad "nonce"'),
                                       DpopKey.generate("ES256"))
    assert len(seen) == 1 and isinstance(outcome, oidc.OAuthError)


# ------------------------------------------------------------------ binding at login


def login(binding: str, key: DpopKey | None) -> Login:
    return Login("l1", "dev", "https://auth.example.test", "cli", [], [], 0.0,
                 token_binding=binding, dpop_key=key)


def test_token_binding_at_login() -> None:
    listing = oidc.ProviderMetadata(issuer="https://i.test", token_endpoint=TOKEN_URL,
                                    dpop_signing_alg_values_supported=["ES256"])
    rsa_only = oidc.ProviderMetadata(issuer="https://i.test", token_endpoint=TOKEN_URL,
                                     dpop_signing_alg_values_supported=["RS256"])
    assert new_login_key("auto", META, "dev") is None  # nothing listed: bearer
    auto = new_login_key("auto", listing, "dev")
    assert auto is not None and auto.algorithm == "ES256"
    assert new_login_key("auto", rsa_only, "dev") is None
    assert new_login_key("dpop", META, "dev") is not None  # dpop asked: ES256
    with pytest.raises(OpError) as refused:
        new_login_key("dpop", rsa_only, "dev")
    assert "token_binding: bearer" in refused.value.message


@pytest.mark.anyio
async def test_a_login_that_asked_for_dpop_refuses_bearer_tokens_unless_auto() -> None:
    key = DpopKey.generate("ES256")
    refusal = check_token_type(login("dpop", key), "Bearer")
    assert refusal is not None and "token_binding: bearer" in refusal
    auto = login("auto", key)
    assert check_token_type(auto, "Bearer") is None and auto.dpop_key is None
    assert check_token_type(login("dpop", key), "DPoP") is None
    unasked = check_token_type(login("bearer", None), "DPoP")
    assert unasked is not None and "token_binding: dpop" in unasked


# ------------------------------------------------------------------ the ops


@asynccontextmanager
async def manager_with(binding: str) -> AsyncIterator[tuple[SessionManager, Session]]:
    clock = FakeClock()
    store = SessionStore("/nonexistent-state-dir", MemorySecrets())
    provider = ProviderClient(now=clock.now)
    manager = SessionManager(store, provider, clock=clock)
    now = clock.now()
    key = DpopKey.generate("ES256") if binding == "dpop" else None
    meta = StoredSession(token_id="s1", profile="dev", kind="oidc", issuer="https://i.test",
                         client_id="cli", token_binding="dpop" if key else "bearer",
                         dpop_algorithm=key.algorithm if key else None,
                         dpop_thumbprint=key.thumbprint if key else None)
    lifecycle = SessionLifecycle(now, refresh_token="rt", access_token=AccessToken(
        Secret("at-bound"), issued_at=now, expires_at=now + 3600))
    session = Session(meta, lifecycle, dpop_key=key)
    manager.driver.by_id["s1"] = session
    manager.driver._by_profile["dev"] = session
    try:
        async with anyio.create_task_group() as group:
            manager.driver._group = group
            yield manager, session
            group.cancel_scope.cancel()
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_a_bound_session_gives_tokens_only_to_callers_that_accept_dpop() -> None:
    async with manager_with("dpop") as (manager, session):
        with pytest.raises(OpError) as refused:
            await manager.token(p.Token(id=1, profile="dev"), PEER)
        assert refused.value.code == ErrorCode.DPOP_BOUND
        assert "token_binding: bearer" in refused.value.message
        result = await manager.token(p.Token(id=1, profile="dev", accept_dpop=True), PEER)
        assert result.token_type == "DPoP" and result.access_token == "at-bound"
        info = (await manager.sessions(None))[0]
        assert info.token_type == "DPoP" and info.dpop_thumbprint == session.meta.dpop_thumbprint


@pytest.mark.anyio
async def test_dpop_proof_binds_the_current_token_and_checks_its_input() -> None:
    async with manager_with("dpop") as (manager, session):
        answer = await manager.dpop_proof(p.DpopProof(
            id=1, profile="dev", htm="GET", htu="https://api.test/me?q=1", nonce="rs-1"), PEER)
        assert answer.access_token == "at-bound" and answer.token_type == "DPoP"
        assert session.dpop_key is not None
        verified = DpopVerifier(now=lambda: manager.driver.now(), nonce="rs-1").verify(
            answer.proof, "GET", "https://api.test/me", access_token="at-bound")
        assert verified.thumbprint == answer.dpop_thumbprint == session.dpop_key.thumbprint
        for bad in ({"htm": "", "htu": "https://api.test/"}, {"htm": "GET", "htu": ""},
                    {"htm": "GET", "htu": "file:///etc/passwd"},
                    {"htm": "GET\r\nX: y", "htu": "https://api.test/"},
                    {"htm": "GET", "htu": "https://api.test/", "nonce": "a b"}):
            with pytest.raises(OpError) as refused:
                await manager.dpop_proof(p.DpopProof(id=1, profile="dev", **bad), PEER)
            assert refused.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.anyio
async def test_dpop_proof_for_a_bearer_session_is_refused() -> None:
    async with manager_with("bearer") as (manager, _):
        with pytest.raises(OpError) as refused:
            await manager.dpop_proof(p.DpopProof(id=1, profile="dev", htm="GET",
                                                 htu="https://api.test/"), PEER)
        assert refused.value.code == ErrorCode.NOT_DPOP_BOUND
        result = await manager.token(p.Token(id=1, profile="dev"), PEER)
        assert result.token_type == "Bearer"


@pytest.mark.anyio
async def test_a_device_login_keeps_polling_after_a_repeated_nonce_demand(
    tmp_path: object,
) -> None:
    from compozy_client.config import Config, ProfileConfig
    from support.driver import while_advancing
    from support.fake_provider import TOKEN, Behaviour, FakeProvider

    clock = FakeClock()
    async with FakeProvider(now=clock.now) as fake:
        fake.on(TOKEN, Behaviour.oauth_error("use_dpop_nonce"),
                Behaviour.ok(token_type="DPoP"))
        config = Config(profiles={"default": ProfileConfig(token_binding="dpop")})
        provider = ProviderClient(now=clock.now, timeout=5.0)
        manager = SessionManager(SessionStore(str(tmp_path), MemorySecrets()), provider,
                                 clock=clock, config_loader=lambda: config)
        try:
            async with anyio.create_task_group() as group:
                await group.start(manager.run)
                started = await manager.login_start(p.LoginStart(
                    id=1, flow="device", issuer=fake.issuer, client_id="cli",
                    scope=["openid", "offline_access"]))
                done = await while_advancing(clock, manager.login_wait(p.LoginWait(
                    id=2, login_id=started.login_id, timeout=20)))
                group.cancel_scope.cancel()
        finally:
            await provider.aclose()
    assert done.state == "done" and done.session is not None
    assert done.session.token_type == "DPoP"
    polls = fake.requests_to(TOKEN)
    assert len(polls) == 2 and all("dpop" in poll.headers for poll in polls)


def test_discovery_keeps_the_dpop_algorithms_the_provider_lists() -> None:
    document = json.dumps({"issuer": "https://i.test", "token_endpoint": TOKEN_URL,
                           "dpop_signing_alg_values_supported": ["ES256", "EdDSA"]}).encode()
    metadata = oidc.parse_discovery("https://i.test", document)
    assert metadata.dpop_signing_alg_values_supported == ["ES256", "EdDSA"]
