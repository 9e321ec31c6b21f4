"""Benchmark 3: a refresh storm. Many token requests arrive together, each needing a token
newer than the cached one: exactly one refresh may reach the provider.

Every request asks for `min_valid` longer than any token lives, so none can be
answered from the cache (lifecycle rule 6: a token issued after the request
began is handed out even so). The requests come on many connections at once,
pipelined. The figures: refreshes counted at the provider (must be exactly 1),
requests answered (must be all), and the time until the last answer relative
to one refresh round trip through the agent measured in the same run (the
median of several `refresh` ops). Target (issue: benchmarks): at most 3x.

Two providers: the real test provider (oidc-provider on 127.0.0.1, a round
trip of a few milliseconds), and, with --latency, the fault-injecting fake
provider answering each refresh after that many seconds, as an identity
provider across the internet does (default 0.2 s).

    .venv/bin/python bench/refresh_storm.py [--requests 10000] [--connections 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time

from _common import Bench, bench_home, login, read_line, seed_sessions, verdict
from support.fake_provider import Behaviour, run_fake_provider_in_thread

TARGET = 3.0
FOREVER = 10**9  # min_valid: longer than any token lives


def refresh_round_trip(bench: Bench, rounds: int) -> float:
    times = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(bench.socket)
        buffer = bytearray()
        for n in range(rounds):
            start = time.perf_counter()
            sock.sendall(json.dumps({"id": n, "op": "refresh"}).encode() + b"\n")
            answer = json.loads(read_line(sock, buffer))
            times.append(time.perf_counter() - start)
            assert answer["ok"], answer
    return statistics.median(times)


async def storm(path: str, requests: int, connections: int) -> tuple[float, int, int]:
    """(seconds until the last answer, answers that carried a token, distinct tokens)."""
    streams = []
    for _ in range(connections):  # each accepted (a hello answered) before the storm
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"id": 0, "op": "hello"}\n')
        await reader.readline()
        streams.append((reader, writer))
    per = [requests // connections + (1 if n < requests % connections else 0)
           for n in range(connections)]
    line = json.dumps({"id": 0, "op": "token", "min_valid": FOREVER}).encode() + b"\n"
    tokens: set[str] = set()
    answered = 0

    async def one(reader: asyncio.StreamReader, count: int) -> None:
        nonlocal answered
        for _ in range(count):
            answer = json.loads(await reader.readline())
            if answer.get("ok"):
                answered += 1
                tokens.add(answer["result"]["access_token"])

    start = time.perf_counter()
    for (_, writer), count in zip(streams, per, strict=True):
        writer.write(line * count)
    await asyncio.gather(*(one(reader, count)
                           for (reader, _), count in zip(streams, per, strict=True)))
    elapsed = time.perf_counter() - start
    for _, writer in streams:
        writer.close()
    return elapsed, answered, len(tokens)


def run(bench: Bench, count_refreshes: object, options: argparse.Namespace,
        name: str) -> float:
    rtt = refresh_round_trip(bench, options.rounds)
    time.sleep(5.5)  # the newest token is older than lifecycle.RECENT: it no longer counts as new
    before = count_refreshes()  # type: ignore[operator]
    elapsed, answered, distinct = asyncio.run(
        storm(bench.socket, options.requests, options.connections))
    time.sleep(0.5)  # let the provider's log catch up
    refreshes = count_refreshes() - before  # type: ignore[operator]
    ratio = elapsed / rtt
    print(f"{name}: one refresh round trip {rtt * 1000:.1f} ms; {options.requests} requests on "
          f"{options.connections} connections answered in {elapsed * 1000:.0f} ms; "
          f"{answered} answered with a token ({distinct} distinct); "
          f"{refreshes} refresh(es) at the provider "
          f"({'exactly one' if refreshes == 1 else 'WRONG: must be exactly one'})")
    print(verdict(f"{name}: ", ratio, TARGET))
    if refreshes != 1 or answered != options.requests or distinct != 1:
        raise SystemExit("the storm was not absorbed by one refresh")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7, help="refreshes for the baseline")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="the slow provider's answer delay in seconds (0: skip that run)")
    options = parser.parse_args()
    with bench_home() as bench:
        login(bench)
        provider = bench.provider
        assert provider is not None
        run(bench, lambda: provider.count("token", grant_type="refresh_token", status=200),
            options, "local provider")
    if options.latency > 0:
        with run_fake_provider_in_thread() as (issuer, fake), \
                bench_home(provider=False, storage="file") as bench:
            seed_sessions(bench, issuer, 1)
            slow = Behaviour(delay=options.latency)
            for _ in range(options.rounds + 2):
                fake.then(slow)
            bench.cli("auth", "token")  # starts the agent, which restores and refreshes
            run(bench, lambda: len(fake.refresh_requests()), options,
                f"provider {options.latency * 1000:.0f} ms away")
    return 0


if __name__ == "__main__":
    sys.exit(main())
