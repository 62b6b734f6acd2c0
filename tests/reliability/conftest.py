"""The reliability suite: fault scenarios with real processes and a real etcd on loopback.

Every scenario records its figures with the ``figures`` fixture; the figures of the whole run
are printed as one table at the end of pytest's report (so CI's log carries them) and, when
``TETHER_RELIABILITY_REPORT`` names a file, written there as JSON lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

_RECORDED: list[Figures] = []


@dataclass
class Figures:
    """What one scenario did: calls made and how they ended, and what discovery lost.

    ``extra`` holds the scenario's own measurements (seconds to re-register, p99 latency,
    ...), by name, already rounded for reading.
    """

    scenario: str
    calls: int = 0
    failed: int = 0
    fallback: int = 0
    instances_lost: int = 0
    extra: dict[str, float | int | str] = field(default_factory=dict)

    def line(self) -> str:
        extra = "  ".join(f"{key}={value}" for key, value in self.extra.items())
        return (
            f"{self.scenario:<44} calls={self.calls:<6} failed={self.failed:<4} "
            f"fallback={self.fallback:<5} lost={self.instances_lost:<2} {extra}"
        ).rstrip()


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
