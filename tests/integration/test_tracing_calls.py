"""Tracing over real gRPC calls on loopback: spans, parent links, propagation and its failures.

Spans go to OpenTelemetry's in-memory exporter (synchronously, as each span ends), so a test
reads them as soon as its call returns. The OTLP wire path is covered by test_trace_pipeline.
"""

from __future__ import annotations

import gc
import io
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
import structlog
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.echo_service import EchoServicer, build_app
from support.echo_service import log as echo_log
from support.tracing import assert_child, memory_tracing

import tether
from tether.log import REDACTED
from tether.registry import MemoryRegistry
from tether.testing import loopback_config, running

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _by_kind(spans: Sequence[ReadableSpan], kind: trace.SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind is kind]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def echo(exporter: InMemorySpanExporter) -> AsyncIterator[tether.App]:
    app = build_app(loopback_config("echo"), tracing=memory_tracing(exporter, "echo"))
    async with running(app):
        yield app


async def test_server_span_continues_the_callers_trace(
    echo: tether.App, exporter: InMemorySpanExporter
) -> None:
    """A traceparent from the caller makes the server span its child, with the RPC attributes."""
    async with grpc.aio.insecure_channel(echo.target) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(
            echo_pb2.SayRequest(text="hi"), metadata=(("traceparent", SAMPLED),)
        )
    assert reply.seen["trace_id"] == TRACE_ID
    [span] = exporter.get_finished_spans()
    assert span.name == "echo.v1.Echo/Say"
    assert span.kind is trace.SpanKind.SERVER
    assert _hex(span.context.trace_id, 32) == TRACE_ID
    assert span.parent is not None and _hex(span.parent.span_id, 16) == PARENT_ID
    assert span.parent.is_remote
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "echo.v1.Echo"
    assert attributes["rpc.method"] == "Say"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["net.peer.ip"] == "127.0.0.1"
    assert isinstance(attributes["net.peer.port"], int)
    assert span.resource.attributes["service.name"] == "echo"
    assert span.status.status_code is trace.StatusCode.UNSET


@pytest.mark.parametrize(
    ("fail", "code", "error"),
    [("boom", grpc.StatusCode.INTERNAL, True), ("not-found", grpc.StatusCode.NOT_FOUND, False)],
)
async def test_server_span_status_follows_the_conventions(
    echo: tether.App,
    exporter: InMemorySpanExporter,
    fail: str,
    code: grpc.StatusCode,
    error: bool,
) -> None:
    """INTERNAL marks the server span an error; NOT_FOUND (the caller's problem) does not."""
    async with grpc.aio.insecure_channel(echo.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await echo_pb2_grpc.EchoStub(channel).Say(echo_pb2.SayRequest(fail=fail))
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert (span.status.status_code is trace.StatusCode.ERROR) is error
    # The crash's message stays in the log; the span says only what the caller was told.
    assert "secret-internal-detail" not in (span.status.description or "")


@pytest.mark.parametrize(
    "metadata",
    [
        (("traceparent", "garbage"),),
        (("traceparent", "ff-" + "1" * 32 + "-" + "1" * 16 + "-01"),),
        (("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01"),),
        (("traceparent", SAMPLED + "-extra"),),
        (("traceparent", SAMPLED + " " * 600),),
        (("traceparent", SAMPLED), ("tracestate", "x" * 5000)),
        (("traceparent", SAMPLED), ("tracestate", "bad key=1,,=,")),
        # Over W3C's 4096-byte member limit yet under gRPC's 8 KiB soft limit on all metadata:
        # between 8 and 16 KiB gRPC refuses calls at random before tether sees them, so the
        # over-8 KiB case is a unit test of extraction (tests/unit/test_tracing.py).
        (("baggage", "k=" + "v" * 5000),),
        (("baggage", "%%%;;;===,,,"),),
    ],
    ids=[
        "junk",
        "version-ff",
        "zero-trace-id",
        "v00-extra-field",
        "oversized",
        "oversized-tracestate",
        "malformed-tracestate",
        "oversized-baggage",
        "malformed-baggage",
    ],
)
async def test_malformed_context_starts_a_new_trace_and_never_fails_the_call(
    echo: tether.App,
    exporter: InMemorySpanExporter,
    metadata: tuple[tuple[str, str], ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Junk, oversized or unsupported context is dropped: the call succeeds, a root span is made
    (unless a valid traceparent came with the bad tracestate), and the junk is logged nowhere."""
    async with grpc.aio.insecure_channel(echo.target) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(
            echo_pb2.SayRequest(text="ok"), metadata=metadata
        )
    assert reply.text == "ok"
    [span] = exporter.get_finished_spans()
    valid_parent = dict(metadata).get("traceparent") == SAMPLED
    assert (span.parent is not None) is valid_parent
    assert (_hex(span.context.trace_id, 32) == TRACE_ID) is valid_parent
    captured = capsys.readouterr()
    for _, value in metadata:
        assert value[:40] not in captured.out + captured.err


async def test_one_trace_across_three_services_with_parent_links(
    exporter: InMemorySpanExporter,
) -> None:
    """A calls B calls C through tether clients: five spans, one trace, each the child of the
    span that caused it; baggage set by the caller reaches C."""
    registry = MemoryRegistry()
    apps = [
        build_app(loopback_config(name), registry=registry, tracing=memory_tracing(exporter, name))
        for name in ("svc-a", "svc-b", "svc-c")
    ]
    async with running(apps[0]), running(apps[1]), running(apps[2]):
        # The test is the first client: its own tracing decides to sample.
        caller = memory_tracing(exporter, "caller")
        async with tether.dial(apps[0].target, tracing=caller) as channel:
            token = otel_context.attach(baggage.set_baggage("tenant", "t-42"))
            try:
                reply = await echo_pb2_grpc.EchoStub(channel).Say(
                    echo_pb2.SayRequest(text="deep", fail="via:svc-b,svc-c")
                )
            finally:
                otel_context.detach(token)
    assert reply.text == "deep"
    spans = exporter.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1, spans
    by_id = {span.context.span_id: span for span in spans}
    servers = {
        span.resource.attributes["service.name"]: span
        for span in spans
        if span.kind is trace.SpanKind.SERVER
    }
    clients = {
        span.resource.attributes["service.name"]: span
        for span in spans
        if span.kind is trace.SpanKind.CLIENT
    }
    assert set(servers) == {"svc-a", "svc-b", "svc-c"}
    assert set(clients) == {"caller", "svc-a", "svc-b"}
    assert clients["caller"].parent is None
    assert_child(servers["svc-a"], clients["caller"])
    assert_child(clients["svc-a"], servers["svc-a"])
    assert_child(servers["svc-b"], clients["svc-a"])
    assert_child(clients["svc-b"], servers["svc-b"])
    assert_child(servers["svc-c"], clients["svc-b"])
    assert all(span.parent is None or span.parent.span_id in by_id for span in spans)
    assert clients["svc-a"].attributes is not None
    assert clients["svc-a"].attributes["peer.service"] == "svc-b"
    assert clients["svc-a"].attributes["net.peer.name"] == "127.0.0.1"
    assert reply.seen["svc-b.svc-c.baggage"] == "tenant=t-42"


async def test_tracing_off_passes_the_context_through(exporter: InMemorySpanExporter) -> None:
    """With tracing off nothing is recorded, yet the caller's trace reaches the next service
    unchanged (its parent is the caller's span), and logs carry the trace id."""
    registry = MemoryRegistry()
    front = build_app(loopback_config("front"), registry=registry)  # tracing off
    back = build_app(
        loopback_config("back"), registry=registry, tracing=memory_tracing(exporter, "back")
    )
    async with running(front), running(back), grpc.aio.insecure_channel(front.target) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(
            echo_pb2.SayRequest(text="x", fail="via:back"),
            metadata=(("traceparent", SAMPLED),),
        )
    assert reply.seen["trace_id"] == TRACE_ID
    assert reply.seen["back.traceparent"] == SAMPLED
    [span] = exporter.get_finished_spans()  # only the traced service records
    assert span.resource.attributes["service.name"] == "back"
    assert span.parent is not None and _hex(span.parent.span_id, 16) == PARENT_ID


async def test_unsampled_calls_are_not_recorded_but_keep_their_ids(
    exporter: InMemorySpanExporter,
) -> None:
    """At ratio 0 no span is exported; the next hop still gets a traceparent, flagged unsampled."""
    app = build_app(loopback_config("echo"), tracing=memory_tracing(exporter, "echo", ratio=0.0))
    async with running(app):
        caller = memory_tracing(exporter, "caller", ratio=0.0)
        async with tether.dial(app.target, tracing=caller) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Say(echo_pb2.SayRequest(text="x"))
    assert exporter.get_finished_spans() == ()
    version, trace_id, _, flags = reply.seen["traceparent"].split("-")
    assert version == "00"
    assert not int(flags, 16) & 0x01  # not sampled
    assert reply.seen["trace_id"] == trace_id


async def test_outbound_context_replaces_what_the_caller_put_in_metadata(
    echo: tether.App, exporter: InMemorySpanExporter
) -> None:
    """A traceparent passed by hand is replaced by the client span's: one per call."""
    caller = memory_tracing(exporter, "caller")
    async with tether.dial(echo.target, tracing=caller) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(
            echo_pb2.SayRequest(text="x"), metadata=(("traceparent", SAMPLED),)
        )
    client = _by_kind(exporter.get_finished_spans(), trace.SpanKind.CLIENT)[0]
    ids = f"{_hex(client.context.trace_id, 32)}-{_hex(client.context.span_id, 16)}"
    expected = f"00-{ids}-{client.context.trace_flags:02x}"
    assert reply.seen["traceparent"] == expected


async def test_streaming_calls_end_their_spans_with_the_stream(
    echo: tether.App, exporter: InMemorySpanExporter
) -> None:
    """A response stream's server and client spans end when it ends, with its status."""
    caller = memory_tracing(exporter, "caller")
    async with tether.dial(echo.target, tracing=caller) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        words = [r.text async for r in stub.Split(echo_pb2.SayRequest(text="a b c"))]
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in stub.Split(echo_pb2.SayRequest(text="a b", fail="not-found")):
                pass
    assert words == ["a", "b", "c"]
    spans = exporter.get_finished_spans()
    codes = sorted(
        (span.kind.name, (span.attributes or {})["rpc.grpc.status_code"]) for span in spans
    )
    assert codes == [("CLIENT", 0), ("CLIENT", 5), ("SERVER", 0), ("SERVER", 5)]


async def test_governance_steps_are_events_on_the_client_span(
    echo: tether.App, exporter: InMemorySpanExporter
) -> None:
    """A retry, a fallback answer, a breaker opening and a limiter refusal appear as events."""
    config = tether.TetherConfig(
        service={"name": "caller"},
        client={
            "retry": {"max_attempts": 2, "initial_backoff_seconds": 0.001},
            "breaker": {"fail_max": 2, "reset_timeout_seconds": 60},
            "fallback_codes": ["UNAVAILABLE", "UNIMPLEMENTED"],
            "services": {"echo": {"limiter": {"rate": 0.001, "burst": 3}}},
        },
    )
    caller = memory_tracing(exporter, "caller")
    async with tether.dial(
        echo.target, service="echo", config=config.client, tracing=caller
    ) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        # Lookup is unimplemented on the server and declares a proto fallback (token 1).
        fallback_reply = await stub.Lookup(echo_pb2.SayRequest(text="x"))
        for _ in range(2):  # retried once each, then the breaker opens (tokens 2 and 3)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Say(echo_pb2.SayRequest(fail=f"unavailable:{echo.instance_id}"))
        with pytest.raises(grpc.aio.AioRpcError):  # the bucket is empty: refused locally
            async for _ in stub.Split(echo_pb2.SayRequest(text="a b")):
                pass
    assert fallback_reply.text == "static"
    events = [
        (event.name, dict(event.attributes or {}))
        for span in _by_kind(exporter.get_finished_spans(), trace.SpanKind.CLIENT)
        for event in span.events
    ]
    names = [name for name, _ in events]
    assert (
        "tether.fallback",
        {"tether.fallback.reason": "UNIMPLEMENTED", "tether.fallback.source": "proto"},
    ) in events
    assert ("tether.retry", {"tether.retry.attempt": 2, "rpc.grpc.status": "UNAVAILABLE"}) in events
    assert (
        "tether.breaker",
        {"tether.breaker.from": "closed", "tether.breaker.to": "open"},
    ) in events
    assert "tether.rate_limited" in names
    degraded = [
        span
        for span in exporter.get_finished_spans()
        if (span.attributes or {}).get("tether.degraded")
    ]
    assert [span.name for span in degraded] == ["echo.v1.Echo/Lookup"]


class MetadataLoggingServicer(EchoServicer):
    """Echo whose ``Say`` logs what a careless handler might: the metadata in every shape it
    comes in, and the authorization value under its own key."""

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        call = tether.current_call()
        assert call is not None
        metadata = context.invocation_metadata()
        echo_log.info(
            "metadata seen",
            metadata=metadata,
            pairs=list(call.metadata),
            headers=dict(call.metadata),
            authorization=call.header("authorization"),
        )
        return await super().Say(request, context)


async def test_authorization_value_reaches_no_span_and_no_log_line(
    exporter: InMemorySpanExporter,
) -> None:
    """A call with an authorization header, to a handler that logs the metadata and the header,
    with the access log on: the value is in no span attribute, event or log line, and each
    place it would have been says [redacted]."""
    secret = "Bearer s3cr3t-t0k3n-value"
    app = build_app(
        loopback_config("echo", logging={"access_log": True}),
        servicer=MetadataLoggingServicer(),
        tracing=memory_tracing(exporter, "echo"),
    )
    stream = io.StringIO()
    tether.configure_logging("debug", "json", stream=stream)
    caller = memory_tracing(exporter, "caller")
    try:
        async with running(app), tether.dial(app.target, tracing=caller) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            await stub.Say(echo_pb2.SayRequest(text="x"), metadata=(("authorization", secret),))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Say(
                    echo_pb2.SayRequest(fail="boom"), metadata=(("authorization", secret),)
                )
    finally:
        structlog.reset_defaults()
    dumped = [
        json.dumps(
            {
                "attributes": dict(span.attributes or {}),
                "events": [(e.name, dict(e.attributes or {})) for e in span.events],
                "status": span.status.description,
                "name": span.name,
            }
        )
        for span in exporter.get_finished_spans()
    ]
    assert len(dumped) == 4
    assert not [text for text in dumped if "s3cr3t" in text]
    text = stream.getvalue()
    assert "s3cr3t" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("metadata seen") == 2
    assert events.count("call") == 2 and "handler raised" in events  # access log, crash
    for seen in (line for line in lines if line["event"] == "metadata seen"):
        assert seen["authorization"] == REDACTED
        assert seen["headers"]["authorization"] == REDACTED
        assert ["authorization", REDACTED] in seen["pairs"]
        assert ["authorization", REDACTED] in seen["metadata"]


async def test_a_stream_dropped_unread_ends_its_span_as_cancelled(
    echo: tether.App, exporter: InMemorySpanExporter
) -> None:
    """A response stream abandoned after its first message still ends its client span: as
    CANCELLED, by the next traced call (a finalizer must not take the exporter's locks)."""
    caller = memory_tracing(exporter, "caller")
    async with tether.dial(echo.target, tracing=caller) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        stream = aiter(stub.Split(echo_pb2.SayRequest(text="a b c")))
        assert (await anext(stream)).text == "a"
        del stream
        gc.collect()
        await stub.Say(echo_pb2.SayRequest(text="next"))
    clients = {
        span.name: dict(span.attributes or {})
        for span in _by_kind(exporter.get_finished_spans(), trace.SpanKind.CLIENT)
    }
    assert (
        clients["echo.v1.Echo/Split"]["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    )
    assert clients["echo.v1.Echo/Say"]["rpc.grpc.status_code"] == 0
