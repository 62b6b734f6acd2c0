"""The figures fixture itself: recorded per scenario and printed at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def test_figures_are_printed_and_written(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        test_x="""
def test_scenario_one(figures):
    figures.calls = 10
    figures.failed = 1
    figures.extra["p99_ms"] = 2.5
"""
    )
    report = pytester.path / "report.jsonl"
    monkeypatch.setenv("TETHER_RELIABILITY_REPORT", str(report))
    result = pytester.runpytest_inprocess("-p", "no:tether")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*reliability figures*", "scenario_one*calls=10*failed=1*p99_ms=2.5"]
    )
    assert '"scenario": "scenario_one"' in report.read_text()
