"""The benchmarks run in tiny sizes, so they never rot. No timing is asserted here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.real_provider
def test_cli_cost_benchmark_runs_and_reports_a_ratio() -> None:
    result = subprocess.run([sys.executable, str(BENCH / "cli_cost.py"), "--runs", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^ratio \d+\.\d\d \(target <= 1\.5\): (meets|misses) the target$",
                     result.stdout, re.MULTILINE), result.stdout
