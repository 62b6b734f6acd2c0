"""The governance steps' log lines over real calls: inside a served call, a breaker opening and a
fallback answering are logged with the caller's own service, instance, trace and method, and
name the dependency and its method under their own keys (``dependency``, ``rpc``)."""

from __future__ import annotations

import contextlib
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
from tether.registry import MemoryRegistry
from tether.testing import loopback_config, running

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SERVED = "echo.v1.Echo/Hold"  # the caller's method: not the dependency's, so the two differ


class CallerServicer(EchoServicer):
    """``Hold`` calls the dependency ``dep`` twice: ``Say`` fails (and opens the breaker), and
    ``Lookup``, which dep does not implement, is answered by its proto fallback."""

    async def Hold(self, request: Any, context: Any) -> Any:  # noqa: N802
        assert self.app is not None
        stub = echo_pb2_grpc.EchoStub(self.app.client("dep"))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Say(echo_pb2.SayRequest(fail="unavailable:dep-1"))
        answer = await stub.Lookup(echo_pb2.SayRequest(text="x"))
        return echo_pb2.SayReply(text=answer.text)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


async def test_breaker_and_fallback_lines_keep_the_callers_context() -> None:
    """The breaker's and the fallback's lines, written in the caller's client chain while it
    serves a traced call, carry the caller's service, instance id, trace id, span and served
    method; the dependency is ``dependency`` and its method ``rpc``."""
    registry = MemoryRegistry()
    exporter = InMemorySpanExporter()
    dep = build_app(loopback_config("dep"), registry=registry, servicer=EchoServicer("dep-1"))
    caller = build_app(
        loopback_config(
            "caller",
            client={
                "retry": {"max_attempts": 1},
                "breaker": {"fail_max": 1, "reset_timeout_seconds": 60},
                "fallback_codes": ["UNIMPLEMENTED"],
            },
        ),
        registry=registry,
        servicer=CallerServicer(),
        tracing=memory_tracing(exporter, "caller"),
    )
    stream = io.StringIO()
    tether.configure_logging(
        "info",
        "json",
        static={"service": "caller", "instance_id": caller.instance_id},
        stream=stream,
    )
    async with running(dep), running(caller), grpc.aio.insecure_channel(caller.target) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Hold(
            echo_pb2.SayRequest(text="x"), metadata=(("traceparent", SAMPLED),)
        )
    assert reply.text == "static"  # the Lookup fallback declared in echo.proto

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [opened] = [line for line in lines if line["event"] == "circuit breaker state changed"]
    [answered] = [line for line in lines if line["event"] == "fallback answered"]
    clients = {
        span.name: span
        for span in exporter.get_finished_spans()
        if span.kind is trace.SpanKind.CLIENT
    }
    for line, rpc in ((opened, "echo.v1.Echo/Say"), (answered, "echo.v1.Echo/Lookup")):
        assert line["service"] == "caller", line
        assert line["instance_id"] == caller.instance_id, line
        assert line["trace_id"] == TRACE_ID, line
        # The span current in the client chain: the outbound call's, the one with the event.
        assert line["span_id"] == format(clients[rpc].context.span_id, "016x"), line
        assert line["method"] == SERVED, line
        assert line["side"] == "client", line
        assert line["dependency"] == "dep", line
        assert line["rpc"] == rpc, line
    assert (opened["state"], opened["previous"]) == ("open", "closed")
    assert answered["reason"] == "UNIMPLEMENTED"
