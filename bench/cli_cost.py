"""Benchmark 1: the cost of `compozy auth token` as a whole process.

A running agent holds a fresh session (the real test provider, a real login),
so the command takes the common path: agent running, token cached. Each round
runs `python3 -c pass` and `compozy auth token` back to back (interleaved, so
machine noise hits both alike) and the figure is the ratio of their medians.
Target (issue: benchmarks): at most 1.5, with and without cached bytecode.

Two variants: the package's modules compiled (``.pyc``, as an installed package
has them), and not compiled, as in an editable install run with
``PYTHONDONTWRITEBYTECODE=1`` (the package's ``__pycache__`` directories are
removed first and none is written; the standard library keeps its cache, for
both commands alike). The last line is the compiled variant's verdict.

    .venv/bin/python bench/cli_cost.py [--runs 40] [--variant both|compiled|source]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import BINDIR, ROOT, bench_home, login, verdict

TARGET = 1.5


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def compare(name: str, env: dict[str, str], runs: int) -> float:
    """Median of `compozy auth token` over median of `python3 -c pass`; prints both."""
    token = [str(BINDIR / "compozy"), "auth", "token"]
    bare = [sys.executable, "-c", "pass"]
    for _ in range(3):  # warm the page cache for both
        timed(bare, env)
        timed(token, env)
    bare_times, token_times = [], []
    for _ in range(runs):
        bare_times.append(timed(bare, env))
        token_times.append(timed(token, env))
    bare_median = statistics.median(bare_times)
    token_median = statistics.median(token_times)
    print(f"[{name}] python3 -c pass      median {bare_median * 1000:6.1f} ms over {runs} runs")
    print(f"[{name}] compozy auth token   median {token_median * 1000:6.1f} ms over {runs} runs")
    return token_median / bare_median


def remove_package_bytecode() -> None:
    """The client package's compiled modules, so the next runs compile from source."""
    for cache in (ROOT / "client" / "compozy_client").rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--variant", choices=("both", "compiled", "source"), default="both")
    options = parser.parse_args()
    with bench_home() as bench:
        login(bench)
        results: list[tuple[str, float]] = []
        if options.variant in ("both", "source"):
            remove_package_bytecode()
            source_env = {**bench.env, "PYTHONDONTWRITEBYTECODE": "1"}
            results.append(("source (PYTHONDONTWRITEBYTECODE=1, no .pyc) ",
                            compare("source", source_env, options.runs)))
        if options.variant in ("both", "compiled"):
            # Compile the package as an install would (a run without the variable).
            subprocess.run([sys.executable, "-m", "compileall", "-q",
                            str(Path(ROOT / "client" / "compozy_client"))], check=True)
            results.append(("", compare("compiled", bench.env, options.runs)))
        for label, ratio in results:
            print(verdict(label, ratio, TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
