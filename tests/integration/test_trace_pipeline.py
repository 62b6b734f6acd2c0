"""One trace across three processes: A calls B calls C, found through a real etcd, each exporting
OTLP over gRPC to a receiver on loopback, each writing JSON logs to a file.

The receiver is ``tether.testing.OtlpSink``, a real OTLP ``TraceService`` standing in for an
OpenTelemetry Collector (the collector build on PyPI has no OTLP receiver; see its module).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.processes import EchoProcess

import tether
from tether.testing import EtcdServer, OtlpSink, ReceivedSpan

pytestmark = pytest.mark.slow

SERVICES = ("svc-a", "svc-b", "svc-c")
METHOD = "echo.v1.Echo/Say"
# What each hop logs while serving the call (support/echo_service.py): the relays log from the
# handler, from a task, from asyncio's thread helper and from a thread given tether.in_context;
# every hop's access log writes "call".
RELAY_LINES = {"relaying", "relay task", "relay thread", "relay bound thread", "call"}
EXPECTED = {"svc-a": RELAY_LINES, "svc-b": RELAY_LINES, "svc-c": {"say", "call"}}
# Lines a process may write while the call is in flight that are not about the call: its
# background loops (discovery, which the first outbound call starts, and its registration)
# run detached from any call, and must not carry the call's context.
DETACHED = {
    # tether.channel: the dependency's membership
    "instances changed",
    "discovery watch closed",
    "discovery watch failed",
    # tether.registry: the discovery and registration loops' state changes
    "discovery in sync",
    "discovery failed; retrying",
    "discovery refused by etcd; keeping the last known instances",
    "registry unreachable; keeping the last known instances",
    "watch ended by etcd; reading the prefix again",
    "registration renewed",
    "registration failed; retrying",
    "registration refused by etcd; retrying",
    "registry unreachable; retrying until it answers",
    "lease lost; registering again",
    "registered",
}


async def test_one_trace_and_its_logs_across_three_processes(
    etcd: EtcdServer, otlp_sink: OtlpSink, tmp_path: Path
) -> None:
    processes: list[EchoProcess] = []
    try:
        for name in SERVICES:
            processes.append(
                await EchoProcess.start(
                    tmp_path,
                    f"{name}-1",
                    service=name,
                    etcd_endpoints=(etcd.endpoint,),
                    tracing_endpoint=otlp_sink.endpoint,
                    access_log=True,
                )
            )
        # Each process's lines for the call are those after these, up to its SIGTERM.
        marks = [len(process.lines()) for process in processes]
        async with tether.dial(processes[0].target) as channel:  # no trace: A starts one
            reply = await echo_pb2_grpc.EchoStub(channel).Say(
                echo_pb2.SayRequest(text="deep", fail="via:svc-b,svc-c"),
                timeout=10,
            )
        assert reply.text == "deep"
        trace_id = reply.seen["trace_id"]
        # A graceful stop exports what each process still buffers.
        for process in processes:
            assert await process.stop() == 0, f"{process.instance_id} did not exit cleanly"
    finally:
        await asyncio.gather(*(process.kill() for process in processes))

    spans = otlp_sink.trace(trace_id)
    _check_parent_links(spans)
    written = [json.loads(line) for line in otlp_sink.path.read_text().splitlines()]  # type: ignore[union-attr]
    assert {span["trace_id"] for span in written if span["service"] in SERVICES} == {trace_id}

    span_ids = {(s.service, s.kind): s.span_id for s in spans}
    for process, name, mark in zip(processes, SERVICES, marks, strict=True):
        _check_call_lines(name, process.lines()[mark:], trace_id, span_ids)


def _check_call_lines(
    name: str, lines: list[dict[str, Any]], trace_id: str, span_ids: dict[tuple[str, str], str]
) -> None:
    """Every line ``name`` wrote from the call's start to its SIGTERM, but the detached loops',
    carries the call's trace id, the span of its chain (server or client), the served method
    and the process fields; the detached lines carry none of the call's."""
    events = [line.get("event") for line in lines]
    assert "signal received" in events, f"{name} never logged its SIGTERM: {events}"
    window = lines[: events.index("signal received")]
    in_call = [line for line in window if line.get("event") not in DETACHED]
    assert {line["event"] for line in in_call} >= EXPECTED[name], events
    for line in in_call:
        side = line.get("side")
        assert line.get("trace_id") == trace_id, (
            f"{name}: a line of the call without its trace id: {line}"
        )
        assert side in ("server", "client"), f"{name}: a line without the call's side: {line}"
        assert line.get("span_id") == span_ids[(name, side.upper())], f"{name}: span: {line}"
        assert line.get("method") == METHOD, f"{name}: method: {line}"
        assert line.get("service") == name, f"{name}: service: {line}"
        assert line.get("instance_id") == f"{name}-1", f"{name}: instance: {line}"
    for line in window:
        if line.get("event") in DETACHED:
            assert not {"trace_id", "span_id", "method"} & set(line), f"{name}: {line}"


def _check_parent_links(spans: list[ReceivedSpan]) -> None:
    """A's server span is the root; each client span is the child of its service's server span,
    and each server span the child of the caller's client span."""
    server = {s.service: s for s in spans if s.kind == "SERVER"}
    client = {s.service: s for s in spans if s.kind == "CLIENT"}
    assert set(server) == set(SERVICES), spans
    assert set(client) == {"svc-a", "svc-b"}, spans
    assert len(spans) == 5, spans
    assert server["svc-a"].parent_span_id == ""
    assert client["svc-a"].parent_span_id == server["svc-a"].span_id
    assert server["svc-b"].parent_span_id == client["svc-a"].span_id
    assert client["svc-b"].parent_span_id == server["svc-b"].span_id
    assert server["svc-c"].parent_span_id == client["svc-b"].span_id
    assert {s.name for s in spans} == {"echo.v1.Echo/Say"}
    assert server["svc-b"].attributes["rpc.grpc.status_code"] == 0
    assert client["svc-a"].attributes["peer.service"] == "svc-b"
    assert server["svc-a"].resource["service.instance.id"] == "svc-a-1"
