"""The reliability suite: fault scenarios with real processes and a real etcd on loopback.

Every scenario records its figures with the ``figures`` fixture; the figures of the whole run
are printed as one table at the end of pytest's report (so CI's log carries them) and, when
``TETHER_RELIABILITY_REPORT`` names a file, written there as JSON lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from support.figures import Figures

_RECORDED: list[Figures] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """The figures of this scenario, named after the test; kept even when the test fails."""
    record = Figures(scenario=request.node.name.removeprefix("test_"))
    yield record
    _RECORDED.append(record)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RECORDED:
        return
    terminalreporter.section("reliability figures")
    for record in _RECORDED:
        terminalreporter.write_line(record.line())
    target = os.environ.get("TETHER_RELIABILITY_REPORT")
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            for record in _RECORDED:
                out.write(json.dumps(asdict(record)) + "\n")
