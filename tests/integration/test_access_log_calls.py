"""The access log and the slow-call warning over a real server on loopback, as JSON lines."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import structlog
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.echo_service import EchoServicer, build_app
from support.tracing import memory_tracing

import tether
from tether.testing import eventually, loopback_config, running

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SLOW = 0.05  # logging.slow_call_seconds in the slow-call test
WAIT = 10.0


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _serve(
    logging: dict[str, Any], exporter: InMemorySpanExporter, servicer: EchoServicer | None = None
) -> tuple[tether.App, io.StringIO]:
    """An Echo app with ``logging`` settings, traced to ``exporter``; JSON lines to a stream."""
    app = build_app(
        loopback_config("echo", logging=logging),
        servicer=servicer or EchoServicer(),
        tracing=memory_tracing(exporter, "echo"),
    )
    stream = io.StringIO()
    tether.configure_logging(
        "info", "json", static={"service": "echo", "instance_id": app.instance_id}, stream=stream
    )
    return app, stream


def _lines(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [
        line
        for raw in stream.getvalue().splitlines()
        if (line := json.loads(raw))["event"] == event
    ]


def _server_span_ids(exporter: InMemorySpanExporter) -> list[str]:
    return [
        format(span.context.span_id, "016x")
        for span in exporter.get_finished_spans()
        if span.kind is trace.SpanKind.SERVER
    ]


async def test_access_log_writes_one_call_line_per_served_call() -> None:
    """With access_log on, each served call (OK or not) is one ``call`` line: method, code,
    duration, peer, and the call's trace and process fields."""
    exporter = InMemorySpanExporter()
    app, stream = _serve({"access_log": True, "slow_call_seconds": None}, exporter)
    async with running(app), grpc.aio.insecure_channel(app.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Say(echo_pb2.SayRequest(text="x"), metadata=(("traceparent", SAMPLED),))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Say(
                echo_pb2.SayRequest(fail="not-found"), metadata=(("traceparent", SAMPLED),)
            )
    calls = _lines(stream, "call")
    assert [line["code"] for line in calls] == ["OK", "NOT_FOUND"]
    assert [line["span_id"] for line in calls] == _server_span_ids(exporter)
    for line in calls:
        assert line["level"] == "info"
        assert line["method"] == "echo.v1.Echo/Say"
        assert line["side"] == "server"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["peer"].startswith("ipv4:127.0.0.1:")
        assert line["trace_id"] == TRACE_ID
        assert (line["service"], line["instance_id"]) == ("echo", app.instance_id)
        assert line["logger_name"] == "tether.access"


async def test_a_call_slower_than_the_threshold_is_a_warning() -> None:
    """A call held past slow_call_seconds is one ``slow call`` warning, with the access line's
    fields and the threshold, instead of the ``call`` line."""
    exporter = InMemorySpanExporter()
    servicer = EchoServicer()
    app, stream = _serve({"access_log": True, "slow_call_seconds": SLOW}, exporter, servicer)
    async with running(app), grpc.aio.insecure_channel(app.target) as channel:
        held = asyncio.ensure_future(
            echo_pb2_grpc.EchoStub(channel).Hold(
                echo_pb2.SayRequest(text="x"), metadata=(("traceparent", SAMPLED),)
            )
        )
        await eventually(lambda: servicer.holding == 1, within=WAIT, message="the call is held")
        # The handler is running, so the access log's clock started before this point: held
        # for twice SLOW from here (a timer may fire a clock tick early), the call is slower
        # than the threshold whatever the load. Time passing is what is tested, not a stand-in.
        await asyncio.sleep(2 * SLOW)
        servicer.release.set()
        await asyncio.wait_for(held, WAIT)
    assert not _lines(stream, "call")
    [slow] = _lines(stream, "slow call")
    assert slow["level"] == "warning"
    assert slow["threshold_ms"] == SLOW * 1000
    assert slow["duration_ms"] > SLOW * 1000
    assert slow["method"] == "echo.v1.Echo/Hold"
    assert slow["code"] == "OK"
    assert slow["peer"].startswith("ipv4:127.0.0.1:")
    assert slow["trace_id"] == TRACE_ID
    assert [slow["span_id"]] == _server_span_ids(exporter)
    assert (slow["service"], slow["instance_id"]) == ("echo", app.instance_id)
