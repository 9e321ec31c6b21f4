"""Benchmark 5: cold start, from no agent to the first token.

A person logged in earlier; their refresh token is in the keyring (a real
Secret Service: gnome-keyring-daemon on a private D-Bus, as in the tests) and
no agent runs. `compozy auth token` then starts the agent, which restores the
session from the keyring, refreshes it at the real test provider (access
tokens are never stored) and answers. Each round stops the agent first and
runs `python3 -c pass` beside it; the figure is the ratio of the medians.
There is no target (issue: benchmarks): it is reported. Also printed: the
warm path (agent running, token cached) and one refresh round trip
(`compozy auth refresh`, agent running), the parts of the cold start.

Without gnome-keyring-daemon it falls back to the opt-in file store and says so.

    .venv/bin/python bench/cold_start.py [--runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from _common import BINDIR, Bench, bench_home, login
from support.keyring_fixture import SecretService, running_secret_service


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def keyring_if_possible() -> Iterator[SecretService | None]:
    try:
        with running_secret_service() as service:
            yield service
    except BaseException as exc:  # pytest.skip and pytest.fail raise BaseExceptions
        if type(exc).__name__ not in ("Skipped", "Failed"):
            raise
        print(f"(no real keyring: {exc}; using the opt-in file store)", file=sys.stderr)
        yield None


def storage_backend(bench: Bench) -> str:
    status = json.loads(bench.cli("auth", "status", "--json").stdout)
    return str(status["storage"]["backend"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()
    with keyring_if_possible() as service, \
            bench_home(storage="keyring" if service else "file") as bench:
        if service is not None:
            bench.env.update(service.env)
        login(bench)
        backend = storage_backend(bench)
        env = bench.env
        token = [str(BINDIR / "compozy"), "auth", "token"]
        refresh = [str(BINDIR / "compozy"), "auth", "refresh"]
        bare = [sys.executable, "-c", "pass"]
        cold, floor, warm, round_trip = [], [], [], []
        for _ in range(options.runs):
            bench.stop_agent()
            floor.append(timed(bare, env))
            cold.append(timed(token, env))  # starts the agent, restores, refreshes
            warm.append(timed(token, env))
            round_trip.append(timed(refresh, env))
        if storage_backend(bench) != backend:
            raise SystemExit("the restarted agent used another secret store")
    medians = {name: statistics.median(values) * 1000 for name, values in
               (("floor", floor), ("cold", cold), ("warm", warm), ("refresh", round_trip))}
    print(f"secret store: {backend}")
    print(f"python3 -c pass                     median {medians['floor']:7.1f} ms")
    print(f"cold start (agent started, session restored from the {backend}, refreshed, "
          f"token served) median {medians['cold']:7.1f} ms over {options.runs} runs")
    print(f"  for comparison: warm `auth token` {medians['warm']:7.1f} ms, "
          f"`auth refresh` (one round trip to the provider) {medians['refresh']:7.1f} ms")
    print(f"cold start ratio {medians['cold'] / medians['floor']:.2f} of python3 -c pass "
          "(no target: reported)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
