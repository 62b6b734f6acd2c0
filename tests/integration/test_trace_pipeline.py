"""One trace across three processes: A calls B calls C, found through a real etcd, each exporting
OTLP over gRPC to a receiver on loopback, each writing JSON logs to a file.

The receiver is ``tether.testing.OtlpSink``, a real OTLP ``TraceService`` standing in for an
OpenTelemetry Collector (the collector build on PyPI has no OTLP receiver; see its module).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.processes import EchoProcess

import tether
from tether.testing import EtcdServer, OtlpSink, ReceivedSpan

pytestmark = pytest.mark.slow

SERVICES = ("svc-a", "svc-b", "svc-c")
# What each hop logs while serving the call (support/echo_service.py): the relays log from the
# handler, from a task, from asyncio's thread helper and from a thread given tether.in_context.
RELAY_LINES = {"relaying", "relay task", "relay thread", "relay bound thread"}
EXPECTED = {"svc-a": RELAY_LINES, "svc-b": RELAY_LINES, "svc-c": {"say"}}


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
                )
            )
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

    for process, name in zip(processes, SERVICES, strict=True):
        in_call = [line for line in process.lines() if "method" in line]
        assert in_call, f"{name} logged nothing while serving"
        strays = [line for line in in_call if line.get("trace_id") != trace_id]
        assert not strays, f"{name}: lines of the call without its trace id: {strays}"
        assert {line["event"] for line in in_call} >= EXPECTED[name]
        assert all(line["service"] == name for line in in_call)
        assert all(line["instance_id"] == f"{name}-1" for line in in_call)
        assert all(line.get("span_id") for line in in_call)


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
