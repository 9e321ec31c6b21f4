"""Benchmark 2: the agent's token throughput and latency against a bare echo server.

Eight client processes each hold one connection and send `token` requests one
at a time (closed loop) for a fixed time, timing each round trip. The same
load then runs against `bench/echo_server.py`, a JSON-lines server of the
same architecture that does nothing but answer: the floor of a Python socket
server here. Runs alternate agent, echo, agent, echo, so noise hits both.
Targets (issue: benchmarks): throughput at least 0.8x the echo server's,
p99 latency at most 1.5x.

    .venv/bin/python bench/throughput.py [--clients 8] [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, Bench, bench_home, login, read_line, verdict

REQUEST = b'{"id": 1, "op": "token"}\n'


def client(path: str, seconds: float, start_at: float, out: multiprocessing.Queue) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buffer = bytearray()
    for _ in range(50):  # warm up
        sock.sendall(REQUEST)
        read_line(sock, buffer)
    latencies: list[int] = []
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.perf_counter() + seconds
    clock = time.perf_counter_ns
    while time.perf_counter() < end:
        before = clock()
        sock.sendall(REQUEST)
        line = read_line(sock, buffer)
        latencies.append(clock() - before)
        if b'"ok":true' not in line:
            raise SystemExit(f"request failed: {line[:200]!r}")
    sock.close()
    out.put(latencies)


def load(path: str, clients: int, seconds: float) -> tuple[float, float, float]:
    """(requests per second, p50 ms, p99 ms) of ``clients`` closed-loop clients."""
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = context.Queue()
    start_at = time.time() + 0.5
    workers = [context.Process(target=client, args=(path, seconds, start_at, queue))
               for _ in range(clients)]
    for worker in workers:
        worker.start()
    latencies: list[int] = []
    for _ in workers:
        latencies.extend(queue.get(timeout=seconds + 60))
    for worker in workers:
        worker.join()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] / 1e6
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1e6
    return len(latencies) / seconds, p50, p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    with bench_home() as bench:
        login(bench)
        bench.cli("auth", "token")  # the token is cached from here on
        echo_path = str(bench.home / "run" / "echo.sock")
        echo = subprocess.Popen([sys.executable, str(ROOT / "bench" / "echo_server.py"),
                                 echo_path], stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "serving"
            return report(bench, echo_path, options)
        finally:
            echo.terminate()
            echo.wait(10)
            Path(echo_path).unlink(missing_ok=True)


def report(bench: Bench, echo_path: str, options: argparse.Namespace) -> int:
    agent_runs, echo_runs = [], []
    for _ in range(options.rounds):
        agent_runs.append(load(bench.socket, options.clients, options.seconds))
        echo_runs.append(load(echo_path, options.clients, options.seconds))
    agent = [statistics.median(values) for values in zip(*agent_runs, strict=True)]
    floor = [statistics.median(values) for values in zip(*echo_runs, strict=True)]
    print(f"{options.clients} clients, {options.seconds:g} s x {options.rounds} rounds each, "
          "closed loop, one connection per client")
    for name, (rps, p50, p99) in (("agent", agent), ("echo server", floor)):
        print(f"{name:12} {rps:9.0f} req/s   p50 {p50:6.3f} ms   p99 {p99:6.3f} ms")
    print(verdict("throughput ", agent[0] / floor[0], 0.8, at_most=False))
    print(verdict("p99 ", agent[2] / floor[2], 1.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
