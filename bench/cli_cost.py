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
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.provider import OidcTestProvider, complete_browser_login  # noqa: E402

TARGET = 1.5


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def login(env: dict[str, str]) -> None:
    proc = subprocess.Popen(["compozy", "login", "--no-browser"], env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("  http"):
            import httpx

            httpx.get(complete_browser_login(line.strip()), timeout=30)
            break
    _, rest = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"login failed: {rest}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    options = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="compozy-bench-"))
    (home / "run").mkdir(mode=0o700)
    bindir = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOZY_", "FLYZT_")) and k != "PYTHONDONTWRITEBYTECODE"},
        "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
        "COMPOZY_STATE_DIR": str(home / "state"),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # Compiled modules, as an installed package has them.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "client"),
                    str(ROOT / "agent")], check=True, env=env, stdout=subprocess.DEVNULL)
    provider = OidcTestProvider.start()
    try:
        env["COMPOZY_ISSUER"] = provider.issuer
        login(env)
        token = [str(bindir / "compozy"), "auth", "token"]
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
        ratio = token_median / bare_median
        print(f"python3 -c pass      median {bare_median * 1000:6.1f} ms over {options.runs} runs")
        print(f"compozy auth token   median {token_median * 1000:6.1f} ms over {options.runs} runs")
        verdict = "meets" if ratio <= TARGET else "misses"
        print(f"ratio {ratio:.2f} (target <= {TARGET}): {verdict} the target")
    finally:
        subprocess.run(["compozy", "logout", "--force"], env=env, capture_output=True)
        status = subprocess.run(["compozy", "auth", "status", "--json"], env={
            **env, "COMPOZY_AGENT_AUTOSTART": "0"}, capture_output=True, text=True)
        with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError):
            os.kill(int(json.loads(status.stdout)["agent"]["pid"]), 15)
        provider.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
