"""The client side of DPoP (RFC 9449): nonce challenges and call_with_dpop's two retries."""

from __future__ import annotations

from typing import Any

from compozy_client.dpop import call_with_dpop, nonce_challenge, request_headers
from compozy_client.protocol import DpopProofResult

NONCE_401 = (401, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n-1"})
TOKEN_401 = (401, {"WWW-Authenticate": 'DPoP error="invalid_token"'})
OK = (200, {})


def test_a_nonce_challenge_is_read_only_from_a_dpop_401_with_a_valid_nonce() -> None:
    assert nonce_challenge(*NONCE_401) == "n-1"
    assert nonce_challenge(401, {"www-authenticate": 'Bearer, DPoP algs="ES256", '
                                 'error="use_dpop_nonce"', "dpop-nonce": "n-2"}) == "n-2"
    assert nonce_challenge(400, NONCE_401[1]) is None
    assert nonce_challenge(*TOKEN_401) is None
    assert nonce_challenge(401, {"WWW-Authenticate": 'Bearer error="use_dpop_nonce"',
                                 "DPoP-Nonce": "n"}) is None
    assert nonce_challenge(401, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"',
                                 "DPoP-Nonce": 'bad "nonce"'}) is None


class Proofs:
    """A stand-in for get_dpop_proof: token t-N, and what each call asked for."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.current = 1

    def __call__(self, method: str, url: str, profile: str | None, *, nonce: str | None,
                 rejected_token: str | None) -> DpopProofResult:
        self.calls.append({"nonce": nonce, "rejected_token": rejected_token})
        if rejected_token == f"t-{self.current}":
            self.current += 1
        return DpopProofResult(access_token=f"t-{self.current}",
                               proof=f"proof-{len(self.calls)}")


def run(answers: list[tuple[int, dict[str, str]]]) -> tuple[Proofs, list[dict[str, str]], int]:
    proofs = Proofs()
    sent: list[dict[str, str]] = []
    queue = iter(answers)

    def send(headers: dict[str, str]) -> tuple[int, dict[str, str], int]:
        sent.append(headers)
        status, response_headers = next(queue)
        return status, response_headers, status

    status = call_with_dpop("GET", "https://api.test/x", send, get_proof=proofs)
    return proofs, sent, status


def test_one_retry_for_a_nonce_then_one_for_a_rejected_token_then_the_answer() -> None:
    proofs, sent, status = run([NONCE_401, TOKEN_401, NONCE_401])
    assert status == 401 and len(sent) == 3
    assert proofs.calls == [{"nonce": None, "rejected_token": None},
                            {"nonce": "n-1", "rejected_token": None},
                            {"nonce": "n-1", "rejected_token": "t-1"}]
    assert sent[0] == {"Authorization": "DPoP t-1", "DPoP": "proof-1"}
    assert sent[2]["Authorization"] == "DPoP t-2"


def test_a_server_demanding_nonces_forever_gets_one_retry() -> None:
    _, sent, status = run([NONCE_401, NONCE_401])
    assert status == 401 and len(sent) == 2


def test_success_needs_no_retry_and_headers_are_the_pair() -> None:
    _, sent, status = run([OK])
    assert status == 200 and len(sent) == 1
    assert request_headers(DpopProofResult(access_token="a", proof="p")) == {
        "Authorization": "DPoP a", "DPoP": "p"}
