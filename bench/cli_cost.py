"""Benchmark 1: the cost of `compozy auth token` as a whole process.

A running agent holds a fresh session (the real test provider, a real login),
so the command takes the common path: agent running, token cached. Each round
runs `python3 -c pass` and `compozy auth token` back to back (interleaved, so
machine noise hits both alike) and the figure is the ratio of their medians.
Target (issue: benchmarks): at most 1.5.

    .venv/bin/python bench/cli_cost.py [--runs 40]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _common import BINDIR, bench_home, login, verdict

TARGET = 1.5


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    options = parser.parse_args()
    with bench_home() as bench:
        login(bench)
        env = bench.env
        token = [str(BINDIR / "compozy"), "auth", "token"]
        bare = [sys.executable, "-c", "pass"]
        for _ in range(3):  # warm the page cache for both
            timed(bare, env)
            timed(token, env)
        bare_times, token_times = [], []
        for _ in range(options.runs):
            bare_times.append(timed(bare, env))
            token_times.append(timed(token, env))
        bare_median = statistics.median(bare_times)
        token_median = statistics.median(token_times)
        print(f"python3 -c pass      median {bare_median * 1000:6.1f} ms over {options.runs} runs")
        print(f"compozy auth token   median {token_median * 1000:6.1f} ms over {options.runs} runs")
        print(verdict("", token_median / bare_median, TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
