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

# A child that says where it was pointed, then waits for SIGTERM or SIGINT; on the first, it
# checks that etcd still answers (a service deregisters then) and exits 0.
CHILD = """
import os, signal, sys, time, urllib.request
endpoint = os.environ["TETHER_REGISTRY__ENDPOINTS"]
def stop(signum, _):
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as response:
            state = "etcd up" if response.status == 200 else "etcd unhealthy"
    except OSError:
        state = "etcd gone"
    print("terminated", signal.Signals(signum).name, state, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("child sees", endpoint, flush=True)
time.sleep(60)
"""


def _dev(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # A session of its own, as a shell gives a foreground job: the test can signal the group.
    return subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "dev", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    """Wait for ``proc`` to end; if it does not, stop it (and so its etcd) and fail."""
    try:
        out, _ = proc.communicate(timeout=WAIT)
        return out
    except subprocess.TimeoutExpired:
        proc.terminate()  # tether dev stops its command and etcd on SIGTERM
        try:
            proc.communicate(timeout=WAIT)
        finally:
            proc.kill()
        raise AssertionError(f"tether dev did not exit within {WAIT:g} s") from None


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


@pytest.mark.parametrize("group", [False, True], ids=["tether-dev-only", "whole-group"])
def test_runs_a_command_pointed_at_etcd_and_stops_both_on_ctrl_c(group: bool) -> None:
    """Ctrl-C stops the command while etcd still answers (so a service can deregister), then
    etcd; also when, as in a terminal, the whole process group gets the SIGINT."""
    proc = _dev("--", sys.executable, "-c", CHILD)
    try:
        lines = _read_until(proc, "child sees")
        endpoint = _endpoint(lines)
        assert lines[-1] == f"child sees {endpoint}"
        assert _etcd_answers(endpoint)
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        out = _finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "etcd up" in out and "etcd gone" not in out, out
    assert "etcd stopped" in out
    assert not _etcd_answers(endpoint)


def test_the_commands_exit_status_is_returned() -> None:
    proc = _dev("--", sys.executable, "-c", "raise SystemExit(3)")
    try:
        out = _finish(proc)
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
        os.killpg(proc.pid, signal.SIGINT)
        out = _finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert not _etcd_answers(endpoint)


# Prints the environment it was given, then how tether loads it.
SHOW_ENVIRONMENT = """
import os
import tether
config = tether.TetherConfig(service={"name": "child"})
print("variable", os.environ.get("TETHER_SERVICE__ENVIRONMENT"), flush=True)
print("loaded", config.service.environment, config.log_format, config.serves_reflection)
"""


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        (None, "development console True"),
        ("production", "production json False"),
        ("development", "development console True"),
    ],
    ids=["unset", "production-kept", "development-kept"],
)
def test_the_command_runs_in_development_unless_told_otherwise(
    preset: str | None, expected: str
) -> None:
    """The command gets TETHER_SERVICE__ENVIRONMENT=development (console logs, reflection on);
    a value the user already set is passed through untouched."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_SERVICE__")}
    if preset is not None:
        env["TETHER_SERVICE__ENVIRONMENT"] = preset
    proc = _dev("--", sys.executable, "-c", SHOW_ENVIRONMENT, env=env)
    try:
        out = _finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert f"variable {expected.split()[0]}" in out.splitlines(), out
    assert f"loaded {expected}" in out.splitlines(), out
