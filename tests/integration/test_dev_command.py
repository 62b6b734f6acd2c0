"""`tether dev`: a local etcd for a laptop, and a command run against it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

WAIT = 30.0  # etcd start-up on a loaded machine; a healthy one needs about a second

# A child that says where it was pointed, then waits for SIGTERM and exits 0 on it.
CHILD = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print('terminated', flush=True), sys.exit(0)))\n"
    "print('child sees', os.environ['TETHER_REGISTRY__ENDPOINTS'], flush=True)\n"
    "time.sleep(60)\n"
)


def _dev(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "dev", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], needle: str) -> list[str]:
    """Lines of output up to and including the first starting with ``needle``; fail if none."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith(needle):
            return lines
    proc.kill()
    raise AssertionError(f"never printed {needle!r}; printed {lines}")


def _endpoint(lines: list[str]) -> str:
    for line in lines:
        match = re.search(r"etcd is serving on (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"no endpoint in {lines}")


def _etcd_answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_runs_a_command_pointed_at_etcd_and_stops_both_on_ctrl_c() -> None:
    proc = _dev("--", sys.executable, "-c", CHILD)
    try:
        lines = _read_until(proc, "child sees")
        endpoint = _endpoint(lines)
        assert lines[-1] == f"child sees {endpoint}"
        assert _etcd_answers(endpoint)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the child is stopped gracefully, then etcd
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "terminated" in out
    assert "etcd stopped" in out
    assert not _etcd_answers(endpoint)


def test_the_commands_exit_status_is_returned() -> None:
    proc = _dev("--", sys.executable, "-c", "raise SystemExit(3)")
    try:
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 3, out
    assert "etcd stopped" in out


def test_without_a_command_it_serves_until_ctrl_c() -> None:
    proc = _dev()
    try:
        lines = _read_until(proc, "  Ctrl-C stops it")
        endpoint = _endpoint(lines)
        assert any(f"TETHER_REGISTRY__ENDPOINTS={endpoint}" in line for line in lines)
        assert _etcd_answers(endpoint)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert not _etcd_answers(endpoint)
