"""`make bench --quick`: every benchmark's harness runs and the report is written. The figures
of a quick run mean nothing; this only proves the benchmarks work (h2load included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_every_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--output", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    text = report.read_text()
    assert "Quick mode" in text
    assert text.count("\n## ") == len(BENCHMARKS) + 1  # the bars, then one per benchmark
