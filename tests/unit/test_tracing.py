"""Tracing without a network: header parsing, propagation, sampling, context for threads."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from support.tracing import memory_tracing

import tether
from tether.config import TracingConfig
from tether.context import CallContext, MethodName, Side
from tether.tracing import Tracing, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
CALL = CallContext(method=MethodName.parse("/shop.v1.Orders/Place"), side=Side.SERVER)

HEADERS = [
    f"00-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-00",
    f"00-{TRACE}-{SPAN}-03",
    f" \t00-{TRACE}-{SPAN}-01 ",
    f"01-{TRACE}-{SPAN}-01-future-fields",
    f"00-{TRACE}-{SPAN}-01-extra",
    f"ff-{TRACE}-{SPAN}-01",
    f"00-{'0' * 32}-{SPAN}-01",
    f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE.upper()}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}",
    f"0-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-01" + " " * 600,
    "",
    "garbage",
    "00--",
]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("state", [None, "vendor=value,other=1", "bad key=1", "k=" + "v" * 600])
def test_traceparent_parsing_agrees_with_opentelemetry(header: str, state: str | None) -> None:
    """tether's lean parser accepts and refuses exactly what OpenTelemetry's propagator does."""
    carrier = {"traceparent": header, **({"tracestate": state} if state is not None else {})}
    theirs = trace.get_current_span(
        TraceContextTextMapPropagator().extract(carrier)
    ).get_span_context()
    ours = parse_traceparent(header, state)
    if not theirs.is_valid:
        assert ours is None
        return
    assert ours is not None
    assert (ours.trace_id, ours.span_id, ours.trace_flags, ours.is_remote) == (
        theirs.trace_id,
        theirs.span_id,
        theirs.trace_flags,
        theirs.is_remote,
    )
    assert dict(ours.trace_state or {}) == dict(theirs.trace_state or {})


def test_context_round_trips_through_metadata() -> None:
    """What inject writes, extract reads back: ids, flags, trace state and baggage."""
    tracing = Tracing()
    parent = parse_traceparent(f"00-{TRACE}-{SPAN}-01", "vendor=abc")
    assert parent is not None
    ctx = baggage.set_baggage(
        "tenant", "t-1", trace.set_span_in_context(trace.NonRecordingSpan(parent))
    )
    pairs = tracing.propagation.inject(ctx)
    assert dict(pairs) == {
        "traceparent": f"00-{TRACE}-{SPAN}-01",
        "tracestate": "vendor=abc",
        "baggage": "tenant=t-1",
    }
    back = tracing.propagation.extract(tuple(pairs))
    got = trace.get_current_span(back).get_span_context()
    assert (format(got.trace_id, "032x"), format(got.span_id, "016x")) == (TRACE, SPAN)
    assert baggage.get_baggage("tenant", back) == "t-1"


def test_no_context_in_metadata_yields_an_empty_context() -> None:
    tracing = Tracing()
    assert tracing.propagation.extract((("user-agent", "x"), ("x-bin", b"\x00"))) == Context()
    assert tracing.propagation.inject(Context()) == []


@pytest.mark.parametrize(
    "header",
    ["k=" + "v" * 9000, "k=" + "v" * 5000, ",".join(f"k{i}=v" for i in range(200))],
    ids=["over-8KiB", "member-over-4KiB", "over-180-members"],
)
def test_oversized_baggage_is_dropped_and_the_trace_kept(header: str) -> None:
    """Baggage over W3C's limits is dropped whole or in part; the traceparent beside it holds."""
    tracing = Tracing()
    ctx = tracing.propagation.extract(
        (("traceparent", f"00-{TRACE}-{SPAN}-01"), ("baggage", header))
    )
    got = trace.get_current_span(ctx).get_span_context()
    assert format(got.trace_id, "032x") == TRACE
    kept = baggage.get_all(ctx)
    assert "k" not in kept
    assert len(kept) <= 180


class _HeaderPropagator(TextMapPropagator):
    """A non-W3C propagator (one ``x-trace`` header of the form ``trace:span``)."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        values = getter.get(carrier, "x-trace")
        if not values:
            return context or Context()
        trace_hex, span_hex = values[0].split(":")
        sc = trace.SpanContext(int(trace_hex, 16), int(span_hex, 16), True, trace.TraceFlags(1))
        return trace.set_span_in_context(trace.NonRecordingSpan(sc), context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        sc = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-trace", f"{sc.trace_id:032x}:{sc.span_id:016x}")

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


@pytest.fixture
def custom_propagator() -> Iterator[None]:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(_HeaderPropagator())
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


@pytest.mark.usefixtures("custom_propagator")
def test_another_global_propagator_is_used_instead_of_w3c() -> None:
    """A process that set its own propagator gets it on both sides, not W3C headers."""
    tracing = Tracing()
    ctx = tracing.propagation.extract((("x-trace", f"{TRACE}:{SPAN}"), ("traceparent", "junk")))
    got = trace.get_current_span(ctx).get_span_context()
    assert format(got.trace_id, "032x") == TRACE
    assert tracing.propagation.inject(ctx) == [("x-trace", f"{TRACE}:{SPAN}")]
    assert tracing.propagation.keys() == {"x-trace"}


def test_tracing_off_passes_an_inbound_context_through() -> None:
    """Off: the caller's span context is used as it is (no new span id), so the next hop's
    parent is the caller's span; without one, fresh unsampled ids keep logs correlated."""
    tracing = Tracing()
    inbound = CALL.replace(metadata=(("traceparent", f"00-{TRACE}-{SPAN}-01"),))
    span, ctx = tracing.server_context(inbound)
    sc = trace.get_current_span(ctx).get_span_context()
    assert (format(sc.trace_id, "032x"), format(sc.span_id, "016x")) == (TRACE, SPAN)
    assert not span.is_recording()
    span, ctx = tracing.server_context(CALL)
    fresh = trace.get_current_span(ctx).get_span_context()
    assert fresh.is_valid and not fresh.trace_flags.sampled


@pytest.mark.parametrize(("flags", "recorded"), [("01", True), ("00", False)])
def test_a_parent_decides_sampling_whatever_the_ratio(flags: str, recorded: bool) -> None:
    """Parent-based: a sampled parent is followed at ratio 0, an unsampled one at ratio 1."""
    exporter = InMemorySpanExporter()
    tracing = memory_tracing(exporter, "shop", ratio=0.0 if recorded else 1.0)
    inbound = CALL.replace(metadata=(("traceparent", f"00-{TRACE}-{SPAN}-{flags}"),))
    span, ctx = tracing.server_context(inbound)
    assert span.is_recording() is recorded
    assert format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") == TRACE


@pytest.mark.parametrize("flags", ["00", None])
def test_an_unsampled_call_has_one_set_of_ids_whoever_asks(flags: str | None) -> None:
    """Unsampled spans make their ids when first asked; every later reader, in any thread,
    gets the same ones, under the caller's trace when there is a caller."""
    tracing = memory_tracing(InMemorySpanExporter(), "shop", ratio=0.0)
    metadata = () if flags is None else (("traceparent", f"00-{TRACE}-{SPAN}-{flags}"),)
    span, _ = tracing.server_context(CALL.replace(metadata=metadata))
    assert not span.is_recording()
    with ThreadPoolExecutor(max_workers=4) as pool:
        seen = list(pool.map(lambda _: span.get_span_context(), range(16)))
    context = seen[0]
    assert all(other is context for other in seen)
    assert context.is_valid and not context.trace_flags.sampled
    assert context.span_id != int(SPAN, 16)
    if flags is not None:
        assert format(context.trace_id, "032x") == TRACE


@pytest.mark.parametrize(("ratio", "recorded"), [(1.0, True), (0.0, False)])
def test_new_traces_are_sampled_at_the_ratio(ratio: float, recorded: bool) -> None:
    exporter = InMemorySpanExporter()
    tracing = memory_tracing(exporter, "shop", ratio=ratio)
    spans = [tracing.server_context(CALL)[0] for _ in range(20)]
    assert {span.is_recording() for span in spans} == {recorded}
    assert len({span.get_span_context().trace_id for span in spans}) == 20


def test_users_spans_join_the_call_and_the_pipeline() -> None:
    """app.tracing.tracer() makes spans of the app's own pipeline, children of the call."""
    exporter = InMemorySpanExporter()
    tracing = memory_tracing(exporter, "shop")
    span, ctx = tracing.server_context(CALL)
    token = otel_context.attach(ctx)
    try:
        with tracing.tracer("shop.work").start_as_current_span("compute"):
            pass
    finally:
        otel_context.detach(token)
    [mine] = exporter.get_finished_spans()
    assert mine.parent is not None and mine.parent.span_id == span.get_span_context().span_id


async def test_context_reaches_threads_through_the_helpers() -> None:
    """to_thread and in_context carry the call's trace into threads, executors included, and one
    bound function may run in several threads at once."""
    exporter = InMemorySpanExporter()
    tracing = memory_tracing(exporter, "shop")
    _, ctx = tracing.server_context(CALL)
    expected = trace.get_current_span(ctx).get_span_context().trace_id

    def trace_id(_: object = None) -> int:
        return trace.get_current_span().get_span_context().trace_id

    token = otel_context.attach(ctx)
    try:
        seen = [await tether.to_thread(trace_id)]
        bound = tether.in_context(trace_id)
        with ThreadPoolExecutor(4) as pool:
            seen += list(pool.map(bound, range(8)))
            seen.append(await asyncio.get_running_loop().run_in_executor(pool, bound))
        box: list[int] = []
        worker = threading.Thread(target=tether.in_context(lambda: box.append(trace_id())))
        worker.start()
        worker.join()
        seen += box
        # Without the helper, a thread starts from an empty context.
        plain: list[int] = []
        worker = threading.Thread(target=lambda: plain.append(trace_id()))
        worker.start()
        worker.join()
    finally:
        otel_context.detach(token)
    assert seen == [expected] * 11
    assert plain == [0]


def test_log_lines_carry_the_current_span() -> None:
    stream = io.StringIO()
    tether.configure_logging("info", "json", stream=stream)
    parent = parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert parent is not None
    token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        tether.get_logger().info("inside")
    finally:
        otel_context.detach(token)
    line = json.loads(stream.getvalue())
    assert (line["trace_id"], line["span_id"]) == (TRACE, SPAN)


async def test_shutdown_is_bounded_when_the_collector_is_down(listening_port: int) -> None:
    """Spans for a collector that never answers are given up after timeout_seconds."""
    tracing = Tracing(
        TracingConfig(
            enabled=True, endpoint=f"http://127.0.0.1:{listening_port}", timeout_seconds=0.5
        )
    )
    span, _ = tracing.server_context(CALL)
    span.end()
    await asyncio.wait_for(tracing.shutdown(), 20)
    await tracing.shutdown()  # twice is fine
    assert tracing.provider is None
