"""What every benchmark shares: its result shape, the machine's description, small helpers.

A benchmark module exposes ``async def measure(quick: bool) -> Section``. ``quick`` runs a few
iterations only, to check the harness works (CI); its figures mean nothing. Comparisons are
measured side by side in one run: variants alternate, several rounds, and the report gives the
median and the spread (min-max) of the rounds.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version


@dataclass
class Bar:
    """One performance bar of the benchmark issue, and whether this run met it."""

    text: str  # e.g. "tether at 100% tracing >= 0.75 of bare"
    measured: str  # e.g. "0.81"
    met: bool


@dataclass
class Section:
    """One benchmark's part of BENCHMARKS.md."""

    title: str
    method: str  # how it was measured, in a few sentences
    header: Sequence[str]
    rows: list[Sequence[str]]
    bars: list[Bar] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median_spread(samples: Sequence[float], fmt: str = "{:.0f}") -> str:
    """``median (min-max)`` of the rounds."""
    return (
        f"{fmt.format(statistics.median(samples))} "
        f"({fmt.format(min(samples))}-{fmt.format(max(samples))})"
    )


def percentile(samples: Sequence[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        h2load = subprocess.run(
            ["h2load", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        h2load = "not installed"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "opentelemetry-sdk": version("opentelemetry-sdk"),
        "tether": version("tether"),
        "h2load": h2load.splitlines()[0] if h2load else "?",
        "os": platform.platform(),
    }
