"""tether's spans and propagation interoperate with opentelemetry-instrumentation-grpc, both ways.

On the other side of each call is a plain ``grpc.aio`` server or channel instrumented with the
package's own interceptors and its own SDK provider; spans of both sides go to one in-memory
exporter, so the test reads one trace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.echo_service import EchoServicer, build_app
from support.tracing import assert_child, memory_tracing, same_attributes

import tether
from tether.testing import loopback_config, running


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def instrumented(exporter: InMemorySpanExporter) -> TracerProvider:
    """The provider the instrumentation package's interceptors use."""
    provider = TracerProvider(resource=Resource.create({"service.name": "instrumented"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
async def instrumented_server(instrumented: TracerProvider) -> AsyncIterator[str]:
    """A plain grpc.aio Echo server traced only by opentelemetry-instrumentation-grpc."""
    server = grpc.aio.server(interceptors=[aio_server_interceptor(tracer_provider=instrumented)])
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _only(spans: Sequence[ReadableSpan], service: str, kind: trace.SpanKind) -> ReadableSpan:
    [span] = [
        s for s in spans if s.resource.attributes["service.name"] == service and s.kind is kind
    ]
    return span


async def test_tether_client_to_instrumented_server(
    instrumented_server: str, exporter: InMemorySpanExporter
) -> None:
    """The instrumented server's span is the child of tether's client span, in its trace."""
    tracing = memory_tracing(exporter, "tether-client")
    async with tether.dial(instrumented_server, tracing=tracing) as channel:
        await echo_pb2_grpc.EchoStub(channel).Say(echo_pb2.SayRequest(text="hi"))
    spans = exporter.get_finished_spans()
    client = _only(spans, "tether-client", trace.SpanKind.CLIENT)
    server = _only(spans, "instrumented", trace.SpanKind.SERVER)
    assert_child(server, client)
    # Both sides describe the call with the same RPC attributes.
    same_attributes(server, client, ("rpc.system", "rpc.service", "rpc.method"))


async def test_instrumented_client_to_tether_server(
    instrumented: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """tether's server span is the child of the instrumented client's span, in its trace."""
    app = build_app(
        loopback_config("tether-server"), tracing=memory_tracing(exporter, "tether-server")
    )
    async with running(app):
        interceptors = aio_client_interceptors(tracer_provider=instrumented)
        async with grpc.aio.insecure_channel(app.target, interceptors=interceptors) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Say(echo_pb2.SayRequest(text="hi"))
    spans = exporter.get_finished_spans()
    client = _only(spans, "instrumented", trace.SpanKind.CLIENT)
    server = _only(spans, "tether-server", trace.SpanKind.SERVER)
    assert_child(server, client)
    assert reply.seen["trace_id"] == format(client.context.trace_id, "032x")
    same_attributes(
        server, client, ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code")
    )
