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

kubectl's exec plugin (`compozy auth kube-token`, with the
``KUBERNETES_EXEC_INFO`` kubectl passes) and `docker-credential-compozy get` (a
registry's host on stdin) are measured in the same rounds too.

Two variants: the package's modules compiled (``.pyc``, as an installed package
has them), and not compiled, as in an editable install run with
``PYTHONDONTWRITEBYTECODE=1`` (the package's ``__pycache__`` directories are
removed first and none is written; the standard library keeps its cache, for
both commands alike). The last line is the compiled variant's verdict.

With ``--baseline DIR``, a checkout of other code (``main``, say) with its own
``.venv``, that checkout's ``compozy auth token`` and ``auth kube-token`` run in
the same rounds too, its package compiled or not as this one's: a change is
measured side by side with the code before it, against the same bare
interpreter and agent.

    .venv/bin/python bench/cli_cost.py [--runs 40] [--variant both|compiled|source]
                                       [--baseline ../main]
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
#: What kubectl (client-go) passes its exec plugin.
EXEC_INFO = ('{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1",'
             '"spec":{"interactive":false}}')


def timed(command: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, input=stdin, stdout=subprocess.PIPE, check=True)
    elapsed = time.perf_counter() - start
    if stdin == GIT_GET and b"password=" not in done.stdout:
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


def compare(name: str, env: dict[str, str], runs: int, home: Path,
            baseline: Path | None = None) -> list[tuple[str, float]]:
    """Medians of `compozy auth token` and the git helper's `get` (without and with rules)
    over the median of `python3 -c pass`, measured in the same interleaved rounds."""
    helper = [str(BINDIR / "git-credential-compozy"), "get"]
    kube_env = {**env, "KUBERNETES_EXEC_INFO": EXEC_INFO}
    commands: list[tuple[str, list[str], dict[str, str], bytes | None]] = [
        ("python3 -c pass", [sys.executable, "-c", "pass"], env, None),
        ("compozy auth token", [str(BINDIR / "compozy"), "auth", "token"], env, None),
        ("git helper get", helper, env, GIT_GET),
        ("git helper get, rules", helper, with_rules(env, home), GIT_GET),
        ("kube-token", [str(BINDIR / "compozy"), "auth", "kube-token"], kube_env, None),
        ("docker helper get", [str(BINDIR / "docker-credential-compozy"), "get"], env,
         b"registry.compozy.dev\n"),
    ]
    if baseline is not None:
        launcher = str(baseline / ".venv" / "bin" / "compozy")
        commands += [("baseline auth token", [launcher, "auth", "token"], env, None),
                     ("baseline kube-token", [launcher, "auth", "kube-token"], kube_env, None)]
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
    bare, token, helper_light, helper_rules, kube_token, docker_get = medians[:6]
    if baseline is not None:
        base_token, base_kube = medians[6:]
        print(f"[{name}] compozy auth token / python3 -c pass: {token / bare:.2f}, "
              f"baseline {base_token / bare:.2f}; kube-token: {kube_token / bare:.2f}, "
              f"baseline {base_kube / bare:.2f}")
    print(f"[{name}] git helper get / compozy auth token: {helper_light / token:.2f}; "
          f"with rules: {helper_rules / token:.2f}")
    print(f"[{name}] kube-token / compozy auth token: {kube_token / token:.2f}; "
          f"docker helper get / compozy auth token: {docker_get / token:.2f}")
    return [("git helper get, with rules: ", helper_rules / bare),
            ("git helper get: ", helper_light / bare),
            ("kube-token: ", kube_token / bare),
            ("docker helper get: ", docker_get / bare),
            ("", token / bare)]


def remove_package_bytecode(root: Path) -> None:
    """The client package's compiled modules, so the next runs compile from source."""
    for cache in (root / "client" / "compozy_client").rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--variant", choices=("both", "compiled", "source"), default="both")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout with its own .venv, measured in the same rounds")
    options = parser.parse_args()
    baseline = options.baseline.resolve() if options.baseline is not None else None
    roots = [ROOT] if baseline is None else [ROOT, baseline]
    with bench_home() as bench:
        login(bench)
        results: list[tuple[str, float]] = []
        if options.variant in ("both", "source"):
            for root in roots:
                remove_package_bytecode(root)
            source_env = {**bench.env, "PYTHONDONTWRITEBYTECODE": "1"}
            results += [(f"source (PYTHONDONTWRITEBYTECODE=1, no .pyc) {label}", ratio)
                        for label, ratio in compare("source", source_env, options.runs,
                                                    bench.home, baseline)]
        if options.variant in ("both", "compiled"):
            # Compile the package as an install would (a run without the variable).
            for root in roots:
                subprocess.run([sys.executable, "-m", "compileall", "-q",
                                str(root / "client" / "compozy_client")], check=True)
            results += compare("compiled", bench.env, options.runs, bench.home, baseline)
        for label, ratio in results:
            print(verdict(label, ratio, TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
