"""Benchmark: what a DPoP proof (RFC 9449, op `dpop_proof`) costs next to a `token` request.

One agent holds two sessions at the test provider: `default` with bearer tokens
and `dpop` with DPoP-bound tokens (client compozy-cli-dpop, token_binding: dpop).
One client on one connection sends, in alternating rounds, closed loop: `token`
for the bearer profile, `token` (accept_dpop) for the DPoP profile, and
`dpop_proof` for the DPoP profile (a fresh signature each: ES256 or Ed25519).
Reported: per-request p50 and p99 of each, the ratio of `dpop_proof` to the
bearer `token`, and what a proof adds per request. Target: a proof adds at most
1 ms at the median (a signature is about 0.1 ms; the socket round trip is the
rest of a `token` request). The bearer `token` is the same code path as before
DPoP (one comparison more): bench/throughput.py measures it under load.

    .venv/bin/python bench/dpop_cost.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time

from _common import Bench, bench_home, login, read_line

REQUESTS = {
    "token (bearer)": b'{"id":1,"op":"token","profile":"default"}\n',
    "token (DPoP)": b'{"id":1,"op":"token","profile":"dpop","accept_dpop":true}\n',
    "dpop_proof": (b'{"id":1,"op":"dpop_proof","profile":"dpop","htm":"GET",'
                   b'"htu":"https://api.compozy.dev/v1/me"}\n'),
}


def timed(path: str, request: bytes, count: int) -> list[float]:
    """Round-trip times (ms) of ``count`` requests on one connection, after a warm-up."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buffer = bytearray()
    for _ in range(50):
        sock.sendall(request)
        read_line(sock, buffer)
    times = []
    clock = time.perf_counter_ns
    for _ in range(count):
        before = clock()
        sock.sendall(request)
        line = read_line(sock, buffer)
        times.append((clock() - before) / 1e6)
        if b'"ok":true' not in line:
            raise SystemExit(f"request failed: {line[:300]!r}")
    sock.close()
    return times


def configure(bench: Bench) -> None:
    issuer = bench.env["COMPOZY_ISSUER"]
    (bench.home / ".compozy" / "config.yaml").write_text(
        "storage: memory\nprofiles:\n"
        f"  default:\n    issuer: {issuer}\n"
        f"  dpop:\n    issuer: {issuer}\n    client_id: compozy-cli-dpop\n"
        "    token_binding: dpop\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with bench_home() as bench:
        configure(bench)
        login(bench)
        login(bench, "--profile", "dpop")
        algorithm = bench.cli("auth", "status", "--profile", "dpop").stdout
        samples: dict[str, list[float]] = {name: [] for name in REQUESTS}
        for _ in range(options.rounds):
            for name, request in REQUESTS.items():
                samples[name].extend(timed(bench.socket, request, options.requests))
    print(f"one connection, closed loop, {options.requests} requests x {options.rounds} "
          "rounds each")
    print(next((line.strip() for line in algorithm.splitlines() if "Tokens:" in line), ""))
    medians = {}
    for name, times in samples.items():
        times.sort()
        medians[name] = statistics.median(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(f"{name:15} p50 {medians[name]:6.3f} ms   p99 {p99:6.3f} ms")
    bearer = medians["token (bearer)"]
    added = medians["dpop_proof"] - bearer
    print(f"dpop_proof / token (bearer) p50 ratio {medians['dpop_proof'] / bearer:.2f}; "
          f"token (DPoP) / token (bearer) p50 ratio {medians['token (DPoP)'] / bearer:.2f}")
    print(f"a proof adds {added:.3f} ms at the median (target <= 1 ms): "
          f"{'meets' if added <= 1.0 else 'misses'} the target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
