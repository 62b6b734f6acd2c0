"""What a reliability scenario reports: see tests/reliability/conftest.py, docs/reliability.md."""

from __future__ import annotations

from dataclasses import dataclass, field


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
