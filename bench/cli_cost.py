"""Benchmark 1: the cost of `compozy auth token` as a whole process.

A running agent holds a fresh session (the real test provider, a real login),
so the command takes the common path: agent running, token cached. Each round
runs `python3 -c pass` and `compozy auth token` back to back (interleaved, so
machine noise hits both alike) and the figure is the ratio of their medians.
Target (issue: benchmarks): at most 1.5, with and without cached bytecode.

The credential helpers other tools run are measured in the same rounds, each
against the same bare interpreter: kubectl's exec plugin (`compozy auth
kube-token`, with the ``KUBERNETES_EXEC_INFO`` kubectl passes) and
`docker-credential-compozy get` (the registry's host on stdin). Their ratios are
reported next to `compozy auth token`'s; the verdict is the token's.

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


#: What kubectl (client-go) passes its exec plugin.
EXEC_INFO = ('{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1",'
             '"spec":{"interactive":false}}')
#: (label, command, stdin, extra environment): `compozy auth token` first.
COMMANDS: list[tuple[str, list[str], bytes | None, dict[str, str]]] = [
    ("compozy auth token", [str(BINDIR / "compozy"), "auth", "token"], None, {}),
    ("compozy auth kube-token", [str(BINDIR / "compozy"), "auth", "kube-token"], None,
     {"KUBERNETES_EXEC_INFO": EXEC_INFO}),
    ("docker-credential-compozy get", [str(BINDIR / "docker-credential-compozy"), "get"],
     b"registry.compozy.dev\n", {}),
]


def timed(command: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, input=stdin, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def compare(name: str, env: dict[str, str], runs: int) -> float:
    """Median of each command over median of `python3 -c pass`, printed; returns
    `compozy auth token`'s ratio."""
    bare = [sys.executable, "-c", "pass"]
    for _ in range(3):  # warm the page cache for all
        timed(bare, env)
        for _label, command, stdin, extra in COMMANDS:
            timed(command, {**env, **extra}, stdin)
    bare_times: list[float] = []
    times: list[list[float]] = [[] for _ in COMMANDS]
    for _ in range(runs):
        bare_times.append(timed(bare, env))
        for index, (_label, command, stdin, extra) in enumerate(COMMANDS):
            times[index].append(timed(command, {**env, **extra}, stdin))
    bare_median = statistics.median(bare_times)
    print(f"[{name}] {'python3 -c pass':30} median {bare_median * 1000:6.1f} ms "
          f"over {runs} runs")
    ratios = []
    for (label, *_rest), samples in zip(COMMANDS, times, strict=True):
        median = statistics.median(samples)
        ratios.append(median / bare_median)
        print(f"[{name}] {label:30} median {median * 1000:6.1f} ms over {runs} runs "
              f"= {median / bare_median:.2f}x")
    return ratios[0]


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
