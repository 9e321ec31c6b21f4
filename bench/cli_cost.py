"""Benchmark 1: the cost of `compozy auth token` and git's credential helper as whole processes.

A running agent holds a fresh session (the real test provider, a real login),
so the command takes the common path: agent running, token cached. Each round
runs `python3 -c pass` and `compozy auth token` back to back (interleaved, so
machine noise hits both alike) and the figure is the ratio of their medians.
Target (issue: benchmarks): at most 1.5, with and without cached bytecode.

git runs ``git-credential-compozy get`` before its authenticated requests; it is
measured in the same rounds (issue 13: each helper's hot path as light as
`compozy auth token`), against the same bare interpreter and against the token
command, twice: with a config file of no ``rules:`` (the light path) and with a
``rules:`` section mapping the host to the profile (read with YAML).

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


#: What git writes to the helper for `git fetch https://git.example.com/team/app.git`.
GIT_GET = b"protocol=https\nhost=git.example.com\n\n"


def timed(command: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, input=stdin, stdout=subprocess.PIPE, check=True)
    elapsed = time.perf_counter() - start
    if stdin is not None and b"password=" not in done.stdout:
        raise SystemExit(f"{command[0]} gave git no password: {done.stdout[:40]!r}")
    return elapsed


def with_rules(bench_env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment with a config file whose rules map git.example.com to the profile."""
    config = home / ".compozy" / "rules.yaml"
    base = (home / ".compozy" / "config.yaml").read_text()
    config.write_text(base + "rules:\n  - match: {host: git.example.com}\n"
                      "    profile: default\n")
    config.chmod(0o600)
    return {**bench_env, "COMPOZY_CONFIG": str(config)}


def compare(name: str, env: dict[str, str], runs: int, home: Path) -> list[tuple[str, float]]:
    """Medians of `compozy auth token` and the git helper's `get` (without and with rules)
    over the median of `python3 -c pass`, measured in the same interleaved rounds."""
    helper = [str(BINDIR / "git-credential-compozy"), "get"]
    commands: list[tuple[str, list[str], dict[str, str], bytes | None]] = [
        ("python3 -c pass", [sys.executable, "-c", "pass"], env, None),
        ("compozy auth token", [str(BINDIR / "compozy"), "auth", "token"], env, None),
        ("git helper get", helper, env, GIT_GET),
        ("git helper get, rules", helper, with_rules(env, home), GIT_GET),
    ]
    for _ in range(3):  # warm the page cache for all
        for _label, command, command_env, stdin in commands:
            timed(command, command_env, stdin)
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for index, (_label, command, command_env, stdin) in enumerate(commands):
            times[index].append(timed(command, command_env, stdin))
    medians = [statistics.median(each) for each in times]
    for (label, *_), median in zip(commands, medians, strict=True):
        print(f"[{name}] {label:<22} median {median * 1000:6.1f} ms over {runs} runs")
    bare, token, helper_light, helper_rules = medians
    print(f"[{name}] git helper get / compozy auth token: {helper_light / token:.2f}; "
          f"with rules: {helper_rules / token:.2f}")
    return [("git helper get, with rules: ", helper_rules / bare),
            ("git helper get: ", helper_light / bare),
            ("", token / bare)]


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
            results += [(f"source (PYTHONDONTWRITEBYTECODE=1, no .pyc) {label}", ratio)
                        for label, ratio in compare("source", source_env, options.runs,
                                                    bench.home)]
        if options.variant in ("both", "compiled"):
            # Compile the package as an install would (a run without the variable).
            subprocess.run([sys.executable, "-m", "compileall", "-q",
                            str(Path(ROOT / "client" / "compozy_client"))], check=True)
            results += compare("compiled", bench.env, options.runs, bench.home)
        for label, ratio in results:
            print(verdict(label, ratio, TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
