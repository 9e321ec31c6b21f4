"""SIGKILL at random points: the next CLI call starts a new agent and loses nothing.

The agent is killed while it logs in, refreshes (rotating refresh tokens at
the real provider), hands out narrower tokens, and revokes. After each kill
the next CLI call must start a new agent, and every session in the state file
must hand out a token, with one exception that no client can avoid: when the
kill lands after the provider rotated the refresh token but before the agent
learnt the new one (the request was in flight), the provider treats the old
token's reuse as theft (RFC 9700 section 4.14.2) and the session needs a new
login. The agent saves a rotated refresh token before it answers anyone, so
the window is the refresh's round trip. The test tells the cases apart by
the provider's own record of successful refreshes, never by loosening the
check, and says how often the window was hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from support.agent import AgentEnv, agent_pids, run_cli, settled_agent_pids
from support.login import CLI, configure, login_browser
from support.provider import OidcTestProvider

pytestmark = [pytest.mark.slow, pytest.mark.real_provider]

KILLS = 54
SEED = int(os.environ.get("COMPOZY_KILL_SEED", "20261122"))
OPERATIONS = ("refresh", "force_new", "narrower", "login", "logout")


def kill_agents(agent_env: AgentEnv) -> int:
    """SIGKILL every agent serving this environment and wait until each has exited
    (its pidfd becomes readable; no polling); how many there were."""
    pids = agent_pids(agent_env)
    exits = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it exited by itself meanwhile
                exits.append(os.pidfd_open(pid))
                os.kill(pid, signal.SIGKILL)
        for exited in exits:
            ready, _, _ = select.select([exited], [], [], 10)
            assert ready, "a killed agent did not go away"
    finally:
        for exited in exits:
            os.close(exited)
    return len(pids)


def stored_profiles(agent_env: AgentEnv) -> list[str]:
    path = agent_env.state_dir / "sessions.json"
    if not path.exists():
        return []
    return sorted(s["profile"] for s in json.loads(path.read_text())["sessions"])


def start_operation(agent_env: AgentEnv, operation: str, api: str) -> subprocess.Popen[str]:
    args = {
        "refresh": ["auth", "refresh"],
        "force_new": ["auth", "token", "--force-new"],
        "narrower": ["auth", "token", "--scope", "compozy:read", "--audience", api,
                     "--force-new"],
        "logout": ["logout", "--profile", "extra", "--force"],
    }[operation]
    return subprocess.Popen([*CLI, *args], env=agent_env.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def successes(provider: OidcTestProvider, grant: str) -> int:
    return provider.count("token", grant_type=grant, status=200)


def test_sigkill_at_random_points_loses_no_persisted_session(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    rng = random.Random(SEED)
    configure(agent_env, oidc_provider, "default", "extra", storage="file")
    assert login_browser(agent_env).returncode == 0
    kills = 0
    rounds = dict.fromkeys(OPERATIONS, 0)
    window_hits = 0
    relogins = 0
    while kills < KILLS:
        operation = rng.choice(OPERATIONS)
        delay = rng.uniform(0.0, 0.3)
        rounds[operation] += 1
        context = (f"seed {SEED}, round {sum(rounds.values())}: {operation}, "
                   f"kill after {delay:.3f} s")
        answered = False  # whether the interrupted CLI call got its answer before the kill
        refreshes_before = successes(oidc_provider, "refresh_token")
        revocations_before = oidc_provider.count("revocation", status=200)
        if operation == "login":
            timer = threading.Timer(delay, kill_agents, args=(agent_env,))
            timer.start()
            try:
                output = login_browser(agent_env, "--profile", "extra").stderr
            except httpx.HTTPError as exc:  # the loopback listener died with the agent
                output = f"(the browser could not reach the agent: {type(exc).__name__})"
            timer.join()
            kills += kill_agents(agent_env) or 1  # the timer's kill, or this one
        else:
            if operation == "logout" and "extra" not in stored_profiles(agent_env):
                assert login_browser(agent_env, "--profile", "extra").returncode == 0
            proc = start_operation(agent_env, operation, oidc_provider.api)
            # The random point to kill at; an operation that ends sooner finds the agent idle.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=delay)
            kills += kill_agents(agent_env)
            _, output = proc.communicate(timeout=60)
            assert proc.returncode in (0, 1), (context, output)
            answered = proc.returncode == 0
        assert "Traceback" not in output, (context, output)

        # The next CLI call starts a new agent, which restores every persisted session.
        refreshed_in_round = successes(oidc_provider, "refresh_token") > refreshes_before
        revoked_in_round = oidc_provider.count("revocation", status=200) > revocations_before
        for profile in stored_profiles(agent_env):
            token = run_cli(agent_env, "auth", "token", "--profile", profile)
            assert "Traceback" not in token.stderr, (context, token.stderr)
            if token.returncode == 0:
                assert token.stdout.strip(), context
                continue
            # Unusable: allowed only where the provider itself ended the session in this
            # round (a rotation the agent never heard of, or a revocation it asked for).
            assert "login" in token.stderr, (context, profile, token.stderr)
            # A rotation is lost only in flight: once a caller has its token, the
            # agent has saved the refresh token that came with it.
            lost_rotation = refreshed_in_round and operation != "logout" and not answered
            asked_revocation = profile == "extra" and operation == "logout" and revoked_in_round
            assert lost_rotation or asked_revocation, (
                f"{context}: profile {profile} lost without cause: {token.stderr}")
            window_hits += lost_rotation
            relogins += 1
            again = login_browser(agent_env, "--profile", profile)
            assert again.returncode == 0, (context, again.stderr)
        assert len(agent_pids(agent_env)) == 1, context
    print(f"\nkill loop (seed {SEED}): {kills} kills, rounds {rounds}, "
          f"{window_hits} rotation(s) lost in flight, {relogins} new login(s)")
    assert kills >= 50


def test_many_clis_during_a_restart_start_one_agent_and_all_get_answers(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    configure(agent_env, oidc_provider, storage="file")
    assert login_browser(agent_env).returncode == 0
    for _ in range(3):
        assert kill_agents(agent_env) == 1
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(lambda _: subprocess.run(
                [*CLI, "auth", "token"], env=agent_env.env(), capture_output=True, text=True,
                timeout=120), range(20)))
        assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results]
        assert len({r.stdout.strip() for r in results}) == 1  # one restore, one token
        assert len(settled_agent_pids(agent_env)) == 1
