"""Benchmark 4: what an idle agent costs. It should sleep until its next refresh is due.

An agent restores N sessions (100, then 1,000) from its state file and
refreshes each once against the fake provider (1 h access tokens); then,
with nothing due for about 45 minutes, it is watched for --seconds: its
context switches over all its threads (every wakeup is one) and its memory
(VmRSS, VmHWM). Beside it, in the same run, a `python3 -c "time.sleep()"`
process is watched the same way, as the floor of any Python process.
Targets (issue: benchmarks): no wakeups between scheduled refreshes (the
scheduler's sleeps are capped at 60 s, so at most one per minute), RSS under
40 MiB with 100 sessions and under 60 MiB with 1,000.

The fake provider (tests/support/fake_provider.py) is used because it
accepts the seeded refresh tokens; this measures the agent, not a provider.

    .venv/bin/python bench/idle_cost.py [--seconds 30] [--sessions 100 1000] [--settle 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import (
    bench_home,
    context_switches,
    rss_kib,
    seed_sessions,
    switches_between,
    verdict,
)
from support.fake_provider import run_fake_provider_in_thread

RSS_TARGET_MIB = {100: 40, 1000: 60}


def wait_all_fresh(bench: object, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = bench.cli("auth", "list", "--json", check=False)  # type: ignore[attr-defined]
        if listing.returncode != 0:
            print(f"(auth list failed, retrying: {listing.stderr.strip()})", file=sys.stderr)
            time.sleep(0.5)
            continue
        states = [s["state"] for s in json.loads(listing.stdout)["sessions"]]
        if len(states) == count and all(state == "fresh" for state in states):
            return
        time.sleep(0.5)
    raise SystemExit(f"the {count} sessions did not all become fresh in {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sessions", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds to wait after the refreshes before watching")
    options = parser.parse_args()
    with run_fake_provider_in_thread() as (issuer, fake):
        for count in options.sessions:
            with bench_home(provider=False, storage="file") as bench:
                seed_sessions(bench, issuer, count)
                started = time.perf_counter()
                bench.cli("auth", "status")  # starts the agent, which restores and refreshes
                wait_all_fresh(bench, count)
                warm = time.perf_counter() - started
                pid = bench.agent_pid()
                floor = subprocess.Popen([sys.executable, "-c",
                                          "import time; time.sleep(100000)"])
                try:
                    # Settled: anyio's worker threads and the store's thread exit after
                    # 10 idle seconds; a thread exiting mid-window would hide its switches.
                    time.sleep(options.settle)
                    switches = (context_switches(pid), context_switches(floor.pid))
                    time.sleep(options.seconds)
                    after = (context_switches(pid), context_switches(floor.pid))
                    memory, floor_memory = rss_kib(pid), rss_kib(floor.pid)
                finally:
                    floor.kill()
                    floor.wait()
            agent_switches = switches_between(switches[0], after[0])
            floor_switches = switches_between(switches[1], after[1])
            allowed = int(options.seconds // 60) + 1  # one capped sleep slice may end
            rss_mib = memory["VmRSS"] / 1024
            target = RSS_TARGET_MIB.get(count, 60)
            print(f"{count} sessions (restored and refreshed in {warm:.1f} s): "
                  f"{agent_switches} context switches in {options.seconds:g} s idle "
                  f"(python sleeping: {floor_switches}); RSS {rss_mib:.1f} MiB, "
                  f"peak {memory['VmHWM'] / 1024:.1f} MiB "
                  f"(python sleeping: {floor_memory['VmRSS'] / 1024:.1f} MiB)")
            print(f"{count} sessions: wakeups {agent_switches} (target <= {allowed}): "
                  f"{'meets' if agent_switches <= allowed else 'misses'} the target")
            line = verdict(f"{count} sessions: RSS ", rss_mib / target, 1.0)
            print(line.replace("ratio", "/ target ratio"))
    print(f"refresh requests served by the fake provider: {len(fake.refresh_requests())}")
    return 0  # misses are reported, not failures: the figures are the result


if __name__ == "__main__":
    sys.exit(main())
