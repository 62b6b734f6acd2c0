"""The demo (the README's first command) runs to the end with every step passing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"

pytestmark = pytest.mark.slow


def test_the_demo_passes_every_step_and_leaves_nothing_running() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TETHER_")}
    done = subprocess.run(
        [sys.executable, str(DEMO), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out[-6000:]}\n{done.stderr[-3000:]}"
    assert "6 of 6 passed" in out
    for step in (
        "1. balancing",
        "2. instances lost",
        "3. breaker",
        "4. rate limit",
        "5. one trace",
    ):
        assert f"{step}" in out
    assert "Traceback" not in out + done.stderr
    # Every pid in the demo's table of processes has exited: it stops what it started.
    pids = [
        int(words[-1])
        for words in (line.split() for line in out.splitlines())
        if len(words) == 4 and words[2] in ("gRPC", "HTTP") and words[-1].isdigit()
    ]
    assert len(pids) == 6, out
    running = [pid for pid in pids if _alive(pid)]
    assert not running, f"still running after the demo: {running}"


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except FileNotFoundError:
        return False
