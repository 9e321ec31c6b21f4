"""What the HTTP adapters add to a request: httpx and requests, with and without CompozyAuth.

A logged-in agent (the real test provider) and a local API stand-in on
127.0.0.1 (tests/support/bearer_server.py) that accepts any token. Each round
times sequential GETs over one kept-alive connection with a fixed token, with
``CompozyAuth`` (one ``get_token`` round trip to the agent per request), and
``get_token`` alone; rounds alternate, so the machine's noise hits every
variant. Reported: median milliseconds per request, and the added cost as a
ratio to the plain request. No target: the cost is one agent round trip, which
benchmark 2 (throughput.py) measures on its own.

    .venv/bin/python bench/adapter_cost.py [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import httpx
import requests

from _common import bench_home, login
from compozy_client import get_token
from compozy_client.httpx import CompozyAuth as HttpxAuth
from compozy_client.requests import CompozyAuth as RequestsAuth
from support.bearer_server import BearerServer


def median_ms(call: Callable[[], object], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with bench_home() as bench:
        login(bench)
        os.environ.update(bench.env)
        results: dict[str, list[float]] = {}
        # The baseline carries a fixed token of its own: the same request, minus the agent.
        fixed = {"Authorization": "Bearer fixed-token-for-the-baseline"}
        with BearerServer(lambda token: True) as api, httpx.Client(headers=fixed) as plain_httpx, \
                httpx.Client(auth=HttpxAuth()) as auth_httpx, requests.Session() as session:
            auth = RequestsAuth()
            variants: dict[str, Callable[[], object]] = {
                "get_token": get_token,
                "httpx": lambda: plain_httpx.get(api.url).raise_for_status(),
                "httpx + CompozyAuth": lambda: auth_httpx.get(api.url).raise_for_status(),
                "requests": lambda: session.get(api.url, headers=fixed).raise_for_status(),
                "requests + CompozyAuth":
                    lambda: session.get(api.url, auth=auth).raise_for_status(),
            }
            for call in variants.values():
                call()  # connections open, modules loaded
            for _ in range(args.rounds):
                for name, call in variants.items():
                    results.setdefault(name, []).append(median_ms(call, args.requests))
    figures = {name: statistics.median(values) for name, values in results.items()}
    for name, value in figures.items():
        print(f"{name}: {value:.3f} ms per request (median of {args.rounds} rounds)")
    for library in ("httpx", "requests"):
        added = figures[f"{library} + CompozyAuth"] - figures[library]
        print(f"{library}: CompozyAuth adds {added:.3f} ms "
              f"(get_token alone {figures['get_token']:.3f} ms); "
              f"ratio {figures[f'{library} + CompozyAuth'] / figures[library]:.2f} "
              "(no target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
