"""A slow or flaky provider never hangs a caller or gets it an expired token (issue 16).

The real agent and the real CLI, with the real test provider behind a
fault-injecting TCP proxy (tests/support/fault_proxy.py): the provider
advertises the proxy's address as its issuer, so discovery, refreshes and the
login all go through the proxy, and the faults hit exactly what a broken
network would. Tokens are opaque (no API resource), so the provider's
introspection endpoint, called directly (not through the proxy), says whether
each token the CLI printed is active there.

These tests take real time (the provider's tokens live whole seconds); each
is bounded, and paces itself on conditions and deadlines, never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.budget import CALL_DEADLINE, EARLY_RETRY_WINDOW, WAIT_LIMIT
from support.budget import CLI_BUDGET as DEFAULT_TIMEOUT
from support.fault_proxy import FaultProxy
from support.login import login_device
from support.provider import OidcTestProvider, ProviderFactory

pytestmark = [pytest.mark.real_provider, pytest.mark.slow]

#: The access token lifetime the provider grants here (seconds), as the issue's scenario.
TOKEN_TTL = 12


class Rig:
    """A provider behind a fault proxy, an agent logged in through the proxy."""

    def __init__(self, provider: OidcTestProvider, proxy: FaultProxy, agent: AgentProcess,
                 agent_env: AgentEnv, logged_in_at: float) -> None:
        self.provider = provider
        self.proxy = proxy
        self.agent = agent
        self.env = agent_env
        #: time.monotonic() when the login's token had just been issued.
        self.logged_in_at = logged_in_at

    @property
    def provider_address(self) -> str:
        """What the agent calls the provider in its messages: the proxy it talks to."""
        return f"127.0.0.1:{self.proxy.port}"

    def token(self, *args: str, timeout: float = 90.0, **env: str) -> tuple[Any, float]:
        """`compozy auth token` (the fast path, as a person runs it); result and seconds."""
        started = time.monotonic()
        result = run_cli(self.env, "auth", "token", *args, timeout=timeout, **env)
        return result, time.monotonic() - started

    def active(self, token: str) -> bool:
        """Whether the provider itself holds ``token`` active (RFC 7662), asked directly."""
        answer = httpx.post(f"{self.provider.direct}/token/introspection",
                            data={"client_id": self.provider.client_id, "token": token},
                            timeout=10)
        answer.raise_for_status()
        return bool(answer.json()["active"])

    def token_requests(self) -> int:
        """How many token requests the agent has received, issued or failed: its audit
        log, repeats within a window counted (they are collapsed into one entry)."""
        shown = run_cli(self.env, "auth", "log", "--json", "--limit", "1000")
        assert shown.returncode == 0, shown.stderr
        return sum(entry.get("count") or 1 for entry in json.loads(shown.stdout)["entries"])


def configure_opaque(agent_env: AgentEnv, issuer: str) -> None:
    """The default profile at ``issuer``, asking for no API resource: opaque tokens, which
    the provider can introspect."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    agent_env.config.write_text(
        "storage: auto\nprofiles:\n  default:\n"
        f"    issuer: {issuer}\n"
        "    scopes: [openid, profile, email, offline_access]\n")


def start_rig(agent_env: AgentEnv, factory: ProviderFactory, proxy: FaultProxy,
              ttl: int = TOKEN_TTL) -> Rig:
    provider = factory(access_token_ttl=ttl, issuer=proxy.url)
    proxy.forward_to(provider.port)
    configure_opaque(agent_env, proxy.url)
    agent = start_agent(agent_env)
    login = login_device(agent_env)
    assert login.returncode == 0, login.stderr + agent.log()
    return Rig(provider, proxy, agent, agent_env, time.monotonic())


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(seed=16) as started:
        yield started


@pytest.fixture
def rig(agent_env: AgentEnv, oidc_provider_factory: ProviderFactory,
        proxy: FaultProxy) -> Iterator[Rig]:
    started = start_rig(agent_env, oidc_provider_factory, proxy)
    yield started
    started.agent.stop()


def wait_until(moment: float, proxy: FaultProxy) -> None:
    """Block until time.monotonic() reaches ``moment``, on a condition with a deadline
    (no sleep): the proxy's condition variable, waiting for something that never comes."""
    while (left := moment - time.monotonic()) > 0:
        proxy.wait_for("never", 1, timeout=left)


# --------------------------------------------------------------------------
# Item 1: every provider call has a deadline over the whole exchange.


def test_a_dripping_provider_cannot_hold_a_refresh_past_its_deadline(rig: Rig) -> None:
    """The provider answers one byte every 50 ms (a token answer would take a minute):
    the refresh ends at the call deadline as a transient failure, and the person hears
    it from the agent in time. The provider did rotate the refresh token (the request
    reached it), so the session is lost: once the network is back the next caller is
    told so at once, rather than waiting behind a refresh still dripping."""
    rig.proxy.set("drip", drip_interval=0.05)
    started = time.monotonic()
    result = run_cli(rig.env, "auth", "refresh", timeout=90)
    elapsed = time.monotonic() - started
    rig.proxy.set("pass")
    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < CALL_DEADLINE + 4, f"the refresh was held {elapsed:.1f} s"
    assert rig.provider_address in result.stderr
    assert f"no complete answer within {CALL_DEADLINE:.0f} s" in result.stderr
    assert "allowed to start" not in result.stderr
    # No refresh is left dripping in flight: the next caller is answered promptly.
    token, took = rig.token(timeout=60)
    assert took < 4, f"the next answer took {took:.1f} s"
    assert token.returncode == 1 and "run: compozy login" in token.stderr, token.stderr


# --------------------------------------------------------------------------
# Item 2: expiry counts from when the request was sent.


def test_a_token_that_arrived_late_is_never_handed_out_after_the_provider_expired_it(
    rig: Rig,
) -> None:
    """The refresh answer is held 8 s of the token's 12 s life. Every token handed out
    afterwards must still be active at the provider."""
    rig.proxy.set("delay", delay=8.0, exchanges=1)
    sent = time.monotonic()
    refreshed = run_cli(rig.env, "auth", "refresh", timeout=60)
    assert refreshed.returncode == 0, refreshed.stderr + rig.agent.log()
    assert time.monotonic() - sent >= 8.0  # the answer really was held
    rig.proxy.set("pass")
    inactive: list[float] = []
    handed_out = 0
    # Until well past the held token's expiry at the provider (sent + 12 s).
    while time.monotonic() < sent + TOKEN_TTL + 4:
        token, _ = rig.token(timeout=60)
        assert token.returncode == 0, token.stderr
        handed_out += 1
        if not rig.active(token.stdout.strip()):
            inactive.append(round(time.monotonic() - sent, 1))
    assert handed_out >= 5
    assert not inactive, f"expired tokens handed out at +{inactive} s after the request"


# --------------------------------------------------------------------------
# Item 3: one budget from the CLI's start to its answer; the agent answers first.


def test_the_agent_answers_within_the_clis_budget_and_says_what_is_slow(rig: Rig) -> None:
    """`compozy auth token` while a refresh drips: the answer comes from the agent, well
    inside the CLI's budget, names the provider, says what the agent will do, and the
    request reached the agent once (no second send by the full CLI)."""
    rig.proxy.set("drip", drip_interval=0.05)
    # The agent's own proactive refresh starts dripping 5 s after the login.
    assert rig.proxy.wait_for("drip", 1, timeout=30)
    before = rig.token_requests()
    result, elapsed = rig.token("--min-valid", "3600", timeout=90)
    rig.proxy.set("pass")
    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < WAIT_LIMIT + 2 < DEFAULT_TIMEOUT, f"answered after {elapsed:.1f} s"
    assert rig.provider_address in result.stderr
    assert "retries" in result.stderr or "keeps trying" in result.stderr
    assert "allowed to start" not in result.stderr
    assert rig.token_requests() == before + 1  # asked once


def test_the_fast_path_never_asks_twice_after_a_timeout(rig: Rig) -> None:
    """An agent that took the request and is stuck (stopped here): the fast path gives up
    at the budget ($COMPOZY_TIMEOUT), says so, exits 1, and never sends it again."""
    before = rig.token_requests()
    os.kill(rig.agent.pid, signal.SIGSTOP)
    try:
        result, elapsed = rig.token(timeout=60, COMPOZY_TIMEOUT="3")
    finally:
        os.kill(rig.agent.pid, signal.SIGCONT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 2.5 < elapsed < 6, f"gave up after {elapsed:.1f} s (budget 3 s)"
    assert "did not answer within 3 s; it was not asked again" in result.stderr
    assert "allowed to start" not in result.stderr
    # Resumed, the agent handles what was queued: exactly one request from that command.
    assert rig.token_requests() == before + 1


# --------------------------------------------------------------------------
# Item 4: the backoff gives way when no valid token is left and a caller waits.


def test_a_caller_without_a_valid_token_gets_an_attempt_ahead_of_the_backoff(rig: Rig) -> None:
    """Resets until the token has expired (the agent backing off further after each);
    the network comes back; the very next `compozy auth token` gets a fresh token."""
    rig.proxy.set("reset")
    assert rig.proxy.wait_for("reset", 4, timeout=40)
    wait_until(rig.logged_in_at + TOKEN_TTL + 0.5, rig.proxy)  # expired at the provider too
    rig.proxy.set("pass")
    result, elapsed = rig.token(timeout=60)
    assert result.returncode == 0, result.stderr + rig.agent.log()
    assert elapsed < 4, f"took {elapsed:.1f} s"
    assert rig.active(result.stdout.strip())


# --------------------------------------------------------------------------
# Also: a refused connection is said plainly; and the worst case under each fault.


FAULTS: dict[str, dict[str, float]] = {
    "refuse": {},
    "reset": {},
    "reset_after": {"exchanges": 1},  # then the retry hears invalid_grant
    "stall": {},
    "drip": {"drip_interval": 0.05},
}
#: Faults where the refresh request reached the provider, which rotated the refresh
#: token, and the answer was lost: the session cannot survive them.
LOSES_ROTATION = ("reset_after", "drip")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_worst_case_answer_time_under_each_fault(
    agent_env: AgentEnv, oidc_provider_factory: ProviderFactory, proxy: FaultProxy, fault: str,
) -> None:
    """A caller whose token has expired, under each fault: an answer (refresh_failed, with
    what is wrong and what the agent does next; or login required, when the rotated
    refresh token was lost) well inside the CLI's budget."""
    rig = start_rig(agent_env, oidc_provider_factory, proxy, ttl=6)
    try:
        rig.proxy.set(fault, **FAULTS[fault])  # type: ignore[arg-type]
        wait_until(rig.logged_in_at + 6.5, rig.proxy)  # expired, here and at the provider
        result, elapsed = rig.token(timeout=90)
        print(f"\nworst case under {fault}: {elapsed:.2f} s: {result.stderr.strip()}")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "allowed to start" not in result.stderr
        if fault == "reset_after":
            assert "run: compozy login" in result.stderr  # a lost rotation, said plainly
        else:
            assert rig.provider_address in result.stderr
        if fault == "refuse":
            assert f"connection refused by {rig.provider_address}" in result.stderr
            assert "cannot connect" not in result.stderr
        bound = EARLY_RETRY_WINDOW + 2 if fault in ("refuse", "reset", "reset_after") \
            else EARLY_RETRY_WINDOW + CALL_DEADLINE + 2
        assert elapsed < bound < DEFAULT_TIMEOUT, f"answered after {elapsed:.1f} s"
        # Once the network is back: a token at once, or (rotation lost) a clear login.
        rig.proxy.set("pass")
        token, took = rig.token(timeout=60)
        assert took < 4, f"the next answer took {took:.1f} s"
        if fault in LOSES_ROTATION:
            assert token.returncode == 1 and "run: compozy login" in token.stderr, token.stderr
        else:
            assert token.returncode == 0, token.stderr + rig.agent.log()
            assert rig.active(token.stdout.strip())
    finally:
        rig.agent.stop()


# --------------------------------------------------------------------------
# The flapping network.


FLAP_SECONDS = 40.0


@pytest.mark.anyio
async def test_a_flapping_network_costs_retries_not_an_outage(rig: Rig) -> None:
    """Half of all exchanges reset, for 40 s, with 12 s tokens: `compozy auth token` once a
    second always prints a token the provider holds active."""
    rig.proxy.set("flap", flap_rate=0.5)
    clock = anyio.current_time
    ends = clock() + FLAP_SECONDS
    failures: list[str] = []
    durations: list[float] = []
    async with httpx.AsyncClient(timeout=10) as http:
        while clock() < ends:
            next_call = clock() + 1.0
            started = clock()
            result = await anyio.to_thread.run_sync(
                lambda: run_cli(rig.env, "auth", "token", timeout=60))
            durations.append(clock() - started)
            at = f"+{started - ends + FLAP_SECONDS:.1f} s"
            if result.returncode != 0:
                failures.append(f"{at}: {result.stderr}")
            else:
                answer = await http.post(
                    f"{rig.provider.direct}/token/introspection",
                    data={"client_id": rig.provider.client_id, "token": result.stdout.strip()})
                if not answer.json()["active"]:
                    failures.append(f"{at}: an inactive token")
            await anyio.sleep_until(next_call)  # pacing: once a second, on anyio's clock
    rig.proxy.set("pass")
    print(f"\nflap: {len(durations)} calls, slowest {max(durations):.2f} s, "
          f"resets {rig.proxy.count('reset')}, passed {rig.proxy.count('pass')}")
    assert not failures, "\n".join(failures)
    assert FLAP_SECONDS * 0.6 <= len(durations) <= FLAP_SECONDS + 1
    assert rig.proxy.count("reset") >= 3  # the network really flapped...
    assert rig.provider.count("token", grant_type="refresh_token", status=200) >= 2  # ...and
    # rotations went on through it.
