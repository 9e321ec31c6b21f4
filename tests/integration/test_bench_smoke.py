"""The benchmarks run in tiny sizes, so they never rot. No timing is asserted here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.keyring_fixture import PACKAGES
from support.real_parts import require_tools

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.real_provider
def test_cli_cost_benchmark_runs_and_reports_a_ratio() -> None:
    result = subprocess.run([sys.executable, str(BENCH / "cli_cost.py"), "--runs", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^ratio \d+\.\d\d \(target <= 1\.5\): (meets|misses) the target$",
                     result.stdout, re.MULTILINE), result.stdout


@pytest.mark.real_provider
def test_throughput_benchmark_runs_and_reports_ratios() -> None:
    result = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--clients", "2",
                             "--seconds", "0.3", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^throughput ratio \d+\.\d\d \(target >= 0\.8\): (meets|misses) the "
                     r"target$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^p99 ratio \d+\.\d\d \(target <= 1\.5\)", result.stdout, re.MULTILINE)


@pytest.mark.real_provider
@pytest.mark.slow
def test_refresh_storm_benchmark_absorbs_the_storm_with_one_refresh() -> None:
    """Exactly one refresh per storm is checked by the benchmark itself (it exits non-zero)."""
    result = subprocess.run([sys.executable, str(BENCH / "refresh_storm.py"), "--requests",
                             "300", "--connections", "15", "--rounds", "2", "--latency", "0.05"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("1 refresh(es) at the provider (exactly one)") == 2
    assert re.search(r"^provider 50 ms away: ratio \d+\.\d\d \(target <= 3\): (meets|misses)",
                     result.stdout, re.MULTILINE), result.stdout


def test_idle_cost_benchmark_restores_refreshes_and_watches_the_agent() -> None:
    """The benchmark itself fails if the restored sessions do not all become fresh."""
    result = subprocess.run([sys.executable, str(BENCH / "idle_cost.py"), "--sessions", "20",
                             "--seconds", "0.5", "--settle", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert re.search(r"^20 sessions: wakeups \d+ \(target <= 1\): (meets|misses) the target$",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^20 sessions: RSS / target ratio \d+\.\d\d \(target <= 1\)",
                     result.stdout, re.MULTILINE), result.stdout
    assert "refresh requests served by the fake provider: 20" in result.stdout


def test_scheduler_scaling_benchmark_compares_the_heap_with_a_scan() -> None:
    result = subprocess.run([sys.executable, str(BENCH / "scheduler_scaling.py"), "--events",
                             "300", "--sizes", "10", "100"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert re.search(r"^scheduling cost per event at 100 vs 10 sessions: ratio \d+\.\d\d "
                     r"\(target <= 3\): (meets|misses) the target$", result.stdout,
                     re.MULTILINE), result.stdout


@pytest.mark.real_provider
def test_cold_start_benchmark_restores_from_the_real_keyring() -> None:
    require_tools(("dbus-run-session", "gnome-keyring-daemon"), PACKAGES, "for the real keyring")
    result = subprocess.run([sys.executable, str(BENCH / "cold_start.py"), "--runs", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "secret store: keyring" in result.stdout, result.stdout + result.stderr[-2000:]
    assert re.search(r"^cold start ratio \d+\.\d\d of python3 -c pass", result.stdout,
                     re.MULTILINE), result.stdout


@pytest.mark.real_provider
def test_adapter_cost_benchmark_runs_and_reports_what_the_adapters_add() -> None:
    result = subprocess.run([sys.executable, str(BENCH / "adapter_cost.py"), "--requests", "5",
                             "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for library in ("httpx", "requests"):
        assert re.search(rf"^{library}: CompozyAuth adds -?\d+\.\d{{3}} ms \(get_token alone "
                         r"\d+\.\d{3} ms\); ratio \d+\.\d\d \(no target\)$",
                         result.stdout, re.MULTILINE), result.stdout


@pytest.mark.real_provider
def test_dpop_cost_benchmark_runs_and_reports_the_ratio() -> None:
    result = subprocess.run([sys.executable, str(BENCH / "dpop_cost.py"), "--requests", "20",
                             "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^dpop_proof / token \(bearer\) p50 ratio \d+\.\d\d", result.stdout,
                     re.MULTILINE), result.stdout
    assert "Tokens: DPoP (" in result.stdout
