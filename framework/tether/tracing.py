"""OpenTelemetry tracing for both chains: spans with the RPC conventions, W3C context in metadata.

A :class:`Tracing` belongs to one App. It owns the OpenTelemetry SDK pipeline the ``tracing``
section describes (resource, parent-based ratio sampling, a batch processor, the OTLP gRPC
exporter) and makes the sampling decision of each call itself, so an unsampled call never
enters the SDK. Two middlewares use it: :func:`trace_server` (one SERVER span per served call,
its parent read from ``traceparent``/``tracestate``/``baggage``) and :func:`trace_client` (one
CLIENT span per outbound call, retries included, its context written into the call's
metadata). Breaker transitions, limiter refusals, retries and fallbacks are events on the
client span (:class:`SpanEvents`). HTTP edges get the same contract from
:class:`tether.asgi.TraceMiddleware`, which starts its spans with :meth:`Tracing.start_server_span`.

Why not ``opentelemetry-instrumentation-grpc``: its aio interceptors cut a bare server to about
half its throughput here (``docs/observability.md`` has the figures). These middlewares make
the same spans (``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``,
peer) and the same W3C propagation more cheaply; the interop tests run both against each other.

With tracing off, nothing is recorded or exported, but the context still passes through: an
inbound trace continues downstream unchanged, and a call without one gets fresh ids (not
sampled), so every log line of a call still carries a ``trace_id``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import importlib.metadata
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

from tether.breaker import BreakerEvent
from tether.config import TracingConfig
from tether.context import CallContext, MethodName, current_call, use_call
from tether.errors import StatusError
from tether.fallback import Degradation
from tether.middleware import Handler, Middleware

__all__ = [
    "SpanEvents",
    "Tracing",
    "in_context",
    "note_peer",
    "parse_traceparent",
    "to_thread",
    "trace_client",
    "trace_server",
]

# Server spans whose code is one of these are errors (OTel RPC conventions); any other code is
# the caller's problem, not the server's. On the client side every code but OK is an error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

# W3C trace context (level 1) as OpenTelemetry's TraceContextTextMapPropagator reads it.
_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_MAX_TRACEPARENT = 512
_MAX_TRACESTATE = 512
_MAX_BAGGAGE = 8192
_W3C_KEYS = ("traceparent", "tracestate", "baggage")
_BAGGAGE = W3CBaggagePropagator()
# OpenTelemetry's propagators log rejected headers, some quoting them; inbound metadata is
# never logged (a caller could fill the log), so those loggers keep only errors.
_QUIET_LOGGERS = (
    "opentelemetry.baggage.propagation",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.trace.span",
)
# Attributes of a method, built once per method and side (names come from the proto, but a
# server is sent any name: the cache stops growing here).
_CACHE_LIMIT = 4096
_EMPTY = Context()
_RANDOM_UNSAMPLED = TraceFlags(0x02)
_SAMPLED = TraceFlags(0x01)
_RANDOM_SAMPLED = TraceFlags(0x03)


def _quiet_propagators() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _new_id(bits: int) -> int:
    value = random.getrandbits(bits)
    while not value:  # zero is the invalid id
        value = random.getrandbits(bits)
    return value


class _UnsampledSpan(NonRecordingSpan):
    """The span of an unsampled call: ids made when first asked for, by a log line or an
    outbound call; most calls never ask, and skip two random numbers and a SpanContext.

    Under a valid parent: its trace, a new span id, its (unsampled) flags and trace state. For
    a new trace: random ids, flagged as such (W3C level 2), as the SDK does.
    """

    def __init__(self, parent: SpanContext | None) -> None:
        self._parent = parent
        # At most one element that counts: the first appended. Threads the call's context
        # reached (to_thread) may ask at the same moment; list.append is atomic, so all of
        # them read the same ids.
        self._made: list[SpanContext] = []

    def get_span_context(self) -> SpanContext:
        made = self._made
        if not made:
            parent = self._parent
            if parent is None:
                made.append(SpanContext(_new_id(128), _new_id(64), False, _RANDOM_UNSAMPLED))
            else:
                made.append(
                    SpanContext(
                        parent.trace_id,
                        _new_id(64),
                        is_remote=False,
                        trace_flags=parent.trace_flags,
                        trace_state=parent.trace_state,
                    )
                )
        return made[0]

    def __repr__(self) -> str:
        return f"_UnsampledSpan({self.get_span_context()!r})"


def parse_traceparent(
    traceparent: str, tracestate: str | Sequence[str] | None = None
) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent`` (and ``tracestate``), or None.

    Follows OpenTelemetry's TraceContext propagator: a header that is too long, malformed, of
    version ``ff``, with zero ids, or of version ``00`` with extra fields yields None (the call
    starts a new trace); a ``tracestate`` that is too long or malformed is dropped. Several
    ``tracestate`` headers (a sequence) are one list, as RFC 9110 combines repeated fields.
    """
    if len(traceparent) > _MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, extra = match.groups()
    if version == "ff" or (version == "00" and extra):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = None
    if tracestate:
        headers = [tracestate] if isinstance(tracestate, str) else list(tracestate)
        # The length OpenTelemetry checks: the headers joined with commas.
        if sum(map(len, headers)) + len(headers) - 1 <= _MAX_TRACESTATE:
            state = TraceState.from_header(headers)
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(flags, 16)), trace_state=state
    )


class _MetadataGetter(Getter[Iterable[tuple[str, Any]]]):
    """Reads gRPC metadata pairs for a propagator (every str value of a key)."""

    def get(self, carrier: Iterable[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Iterable[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


class _ListSetter(Setter[list[tuple[str, str]]]):
    """Writes metadata pairs for a propagator."""

    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key, value))


_GETTER = _MetadataGetter()
_SETTER = _ListSetter()


class _Propagation:
    """How context crosses the wire: W3C trace context and baggage by a lean path while the
    global propagator is OpenTelemetry's default pair, else the global propagator itself
    (``OTEL_PROPAGATORS=b3``, ``opentelemetry.propagate.set_global_textmap``)."""

    def __init__(self) -> None:
        self._seen: TextMapPropagator | None = None
        self._chosen: TextMapPropagator | None = None
        self._keys: frozenset[str] = frozenset(_W3C_KEYS)

    def _custom(self) -> TextMapPropagator | None:
        """The global propagator when it is not the default W3C pair, else None (lean path)."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._seen:
            self._seen = textmap
            keys = frozenset(textmap.fields)
            lean = type(textmap) is CompositePropagator and keys == frozenset(_W3C_KEYS)
            self._chosen = None if lean else textmap
            self._keys = keys
        return self._chosen

    def extract(self, metadata: Iterable[tuple[str, Any]]) -> Context:
        """The context the caller sent (empty when it sent none or sent junk)."""
        custom = self._custom()
        keys = self._keys
        for key, _ in metadata:
            if key in keys:
                break
        else:  # most calls carry no trace context: no work beyond this scan
            return _EMPTY
        try:
            if custom is not None:
                return custom.extract(metadata, _EMPTY, _GETTER)
            return _extract_w3c(metadata)
        except Exception:  # a propagator must never fail a call: junk starts a new trace
            return _EMPTY

    def inject(self, ctx: Context) -> list[tuple[str, str]]:
        """The metadata pairs carrying ``ctx`` to the next hop."""
        custom = self._custom()
        pairs: list[tuple[str, str]] = []
        if custom is not None:
            custom.inject(pairs, ctx, _SETTER)
            return pairs
        sc = trace.get_current_span(ctx).get_span_context()
        if sc.is_valid:
            pairs.append(
                ("traceparent", f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}")
            )
            if sc.trace_state:
                pairs.append(("tracestate", sc.trace_state.to_header()))
        if otel_baggage.get_all(ctx):
            _BAGGAGE.inject(pairs, ctx, _SETTER)
        return pairs

    def keys(self) -> frozenset[str]:
        """The metadata keys propagation writes (replaced on outbound calls)."""
        self._custom()
        return self._keys


def _extract_w3c(metadata: Iterable[tuple[str, Any]]) -> Context:
    traceparent = header = None
    tracestate: list[str] | None = None  # every tracestate header: together, one list
    for key, value in metadata:
        if not isinstance(value, str):
            continue
        if key == "traceparent" and traceparent is None:
            traceparent = value
        elif key == "tracestate":
            if tracestate is None:
                tracestate = [value]
            else:
                tracestate.append(value)
        elif key == "baggage" and header is None:
            header = value
    ctx = _EMPTY
    if traceparent is not None:
        parent = parse_traceparent(traceparent, tracestate)
        if parent is not None:
            ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
    if header is not None and len(header) <= _MAX_BAGGAGE:
        ctx = _BAGGAGE.extract({"baggage": header}, ctx)
    return ctx


class Tracing:
    """The tracing of one App: where its spans go and how its calls are sampled.

    With ``config.enabled``: a ``TracerProvider`` with the resource given, a parent-based
    ratio sampler (``config.sample_ratio`` of new traces; a call with a sampled parent is
    sampled, one with an unsampled parent is not) and a batch processor exporting over OTLP
    gRPC to ``config.endpoint`` (``http://`` plaintext, ``https://`` TLS; the exporter's
    ``OTEL_EXPORTER_OTLP_*`` variables apply too). Without it, propagation only (see the
    module). :meth:`shutdown` flushes what is left.

    Args:
        config: the ``tracing`` section.
        resource: resource attributes, e.g. ``service.name``, ``service.version``,
            ``service.instance.id`` (``OTEL_RESOURCE_ATTRIBUTES`` adds to them).
        exporter: export to this instead of OTLP, synchronously as each span ends (a
            ``SimpleSpanProcessor``): for tests and debugging.
        batch: hand ``exporter`` a batch processor instead, as OTLP gets (benchmarks
            compare the pipeline's cost without a collector).

    Attributes:
        enabled: spans are recorded and exported.
        provider: the SDK provider, for spans of your own (``provider.get_tracer(__name__)``);
            None when tracing is off. ``App.run()`` makes it the global provider.
    """

    def __init__(
        self,
        config: TracingConfig | None = None,
        *,
        resource: Mapping[str, str] | None = None,
        exporter: SpanExporter | None = None,
        batch: bool = False,
    ) -> None:
        cfg = config if config is not None else TracingConfig()
        _quiet_propagators()
        self.enabled = cfg.enabled
        self.ratio = cfg.sample_ratio
        self.propagation = _Propagation()
        self.provider: TracerProvider | None = None
        self._processor: SpanProcessor | None = None
        self._server_attributes: dict[str, dict[str, Any]] = {}
        self._client_attributes: dict[tuple[str, str], dict[str, Any]] = {}
        self._resource: Resource | None = None
        self._scope: InstrumentationScope | None = None
        if not self.enabled:
            return
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=cfg.endpoint,
                headers={k: v.get_secret_value() for k, v in cfg.headers.items()} or None,
                timeout=cfg.timeout_seconds,
            )
            self._processor = BatchSpanProcessor(exporter)
        elif batch:
            self._processor = BatchSpanProcessor(exporter)
        else:
            self._processor = SimpleSpanProcessor(exporter)
        res = Resource.create(dict(resource or {}))
        # Users' spans sample as configured. tether's own spans are _LeanSpans, made only once
        # tether decided to sample them and handed to the same processor when they end.
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
            resource=res,
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self._processor)
        self._resource = res
        self._scope = InstrumentationScope("tether", _version())

    @classmethod
    def for_service(
        cls, config: TracingConfig, *, service: str, version: str, instance_id: str
    ) -> Tracing:
        """The tracing of a service, its resource named after it."""
        return cls(
            config,
            resource={
                "service.name": service,
                "service.version": version,
                "service.instance.id": instance_id,
            },
        )

    # ----------------------------------------------------------------- spans

    def _sampled(self, parent: SpanContext) -> bool:
        if parent.is_valid:
            return parent.trace_flags.sampled
        return random.random() < self.ratio

    def _unsampled(self, parent: SpanContext) -> NonRecordingSpan:
        return _UnsampledSpan(parent if parent.is_valid else None)

    def start_server_span(
        self,
        name: str,
        parent_ctx: Context,
        attributes: Callable[[], Mapping[str, AttributeValue]],
    ) -> tuple[Span, Context]:
        """Start the SERVER span of an inbound request, gRPC or HTTP, under what the caller sent.

        The one place a served request's sampling is decided: a valid parent decides (sampled
        or not), a new trace is sampled at ``sample_ratio``; an unsampled request gets ids but
        no SDK span. With tracing off an inbound context is passed through as it is (the next
        hop's parent is the caller's span), and a request without one gets fresh unsampled ids.

        Args:
            name: the span's name (``package.Service/Method``, ``GET /users/{id}``).
            parent_ctx: the context extracted from the request (``propagation.extract``).
            attributes: builds the span's attributes; called only when the span is recorded,
                so an unsampled request costs no attribute work.

        Returns:
            The span (not recording unless sampled; end it when the request ends) and the
            context to run the request in.
        """
        parent = trace.get_current_span(parent_ctx).get_span_context()
        span: Span
        if not self.enabled:
            if parent.is_valid:
                return trace.INVALID_SPAN, parent_ctx  # pass the caller's context through
            span = self._unsampled(parent)
        elif self._sampled(parent):
            span = self._recorded(name, parent, SpanKind.SERVER, dict(attributes()))
        else:
            span = self._unsampled(parent)
        return span, trace.set_span_in_context(span, parent_ctx)

    def _recorded(
        self, name: str, parent: SpanContext, kind: SpanKind, attributes: dict[str, Any]
    ) -> _LeanSpan:
        """A sampled span of tether's own, child of ``parent`` (or a root)."""
        assert self._processor is not None and self._resource is not None
        if parent.is_valid:
            context = SpanContext(
                parent.trace_id,
                _new_id(64),
                is_remote=False,
                trace_flags=_RANDOM_SAMPLED if parent.trace_flags.random_trace_id else _SAMPLED,
                trace_state=parent.trace_state,
            )
            return _LeanSpan(name, context, parent, kind, attributes, self)
        context = SpanContext(_new_id(128), _new_id(64), False, _RANDOM_SAMPLED)
        return _LeanSpan(name, context, None, kind, attributes, self)

    def server_context(self, call: CallContext) -> tuple[Span, Context]:
        """Start the span of an inbound call; returns it and the context to run the call in."""

        def attributes() -> dict[str, Any]:
            cached = self._server_attributes.get(call.method.full)
            if cached is None:
                cached = _method_attributes(call.method)
                if len(self._server_attributes) < _CACHE_LIMIT:
                    self._server_attributes[call.method.full] = cached
            return {**cached, **_peer_attributes(call.peer)}

        return self.start_server_span(
            call.method.path, self.propagation.extract(call.metadata), attributes
        )

    def client_context(self, call: CallContext, target: str | None) -> tuple[Span, Context]:
        """Start the span of an outbound call under the current context."""
        current = otel_context.get_current()
        parent = trace.get_current_span(current).get_span_context()
        span: Span
        if not self.enabled:
            return trace.INVALID_SPAN, current
        if self._sampled(parent):
            key = (call.method.full, target or "")
            attributes = self._client_attributes.get(key)
            if attributes is None:
                attributes = _method_attributes(call.method)
                if target:
                    attributes["peer.service"] = target
                if len(self._client_attributes) < _CACHE_LIMIT:
                    self._client_attributes[key] = attributes
            span = self._recorded(call.method.path, parent, SpanKind.CLIENT, dict(attributes))
        else:
            span = self._unsampled(parent)
        return span, trace.set_span_in_context(span, current)

    def tracer(self, name: str) -> trace.Tracer:
        """A tracer for spans of your own: the provider's, or a no-op one when tracing is off."""
        if self.provider is None:
            return trace.NoOpTracer()
        return self.provider.get_tracer(name)

    async def shutdown(self) -> None:
        """Export the spans still buffered and stop the exporter (at most ``timeout_seconds``
        while the collector does not answer); safe to call twice."""
        provider, self.provider = self.provider, None
        self._processor = None  # spans ending later are dropped, not handed to a closed one
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)


def _version() -> str:
    try:
        return importlib.metadata.version("tether")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


_ATTRIBUTE_TYPES = (str, bool, int, float)


def _valid_attribute(value: object) -> bool:
    if isinstance(value, _ATTRIBUTE_TYPES):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, _ATTRIBUTE_TYPES) for v in value)


class _LeanSpan(Span):
    """A recorded span of tether's own: plain fields while the call runs, one ``ReadableSpan``
    for the span processor when it ends.

    The SDK's live span costs about 46 µs a call here (locks, attribute validation, four
    allocations of a lock per span); this one about a tenth, and exports the same
    ``ReadableSpan`` through the same processor. Calls run in one task, so it takes no lock.
    Code inside a call may use it like any span: attributes, events, status, the name.
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_ended",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_start",
        "_status",
        "_tracing",
    )

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        tracing: Tracing,
    ) -> None:
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._events: list[Event] = []
        self._status = _UNSET
        self._start = time.time_ns()
        self._ended = False
        self._tracing = tracing

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended and _valid_attribute(value):
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if not self._ended:
            kept = {k: v for k, v in (attributes or {}).items() if _valid_attribute(v)}
            self._events.append(Event(name, kept, timestamp or time.time_ns()))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if self._status.status_code is not StatusCode.OK:  # OK is final, as in the SDK
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The type only: a message or traceback may hold request data (logs have the rest).
        self.add_event(
            "exception", {"exception.type": type(exception).__name__, **(attributes or {})}
        )

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        pass  # tether's spans have no links

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        tracing = self._tracing
        processor = tracing._processor
        if processor is None:  # tracing shut down meanwhile
            return
        processor.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracing._resource,
                attributes=self._attributes,
                events=tuple(self._events),
                links=(),
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=end_time or time.time_ns(),
                instrumentation_scope=tracing._scope,
            )
        )

    def __repr__(self) -> str:
        return f"_LeanSpan({self._name!r}, {self._context!r})"


_UNSET = Status(StatusCode.UNSET)


def _method_attributes(method: MethodName) -> dict[str, Any]:
    return {
        "rpc.system": "grpc",
        "rpc.service": method.qualified_service,
        "rpc.method": method.method,
    }


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _peer_attributes(peer: str | None) -> dict[str, Any]:
    """``net.peer.ip`` and ``net.peer.port`` of a gRPC peer (``ipv4:127.0.0.1:5555``)."""
    if not peer or peer.startswith("unix:"):
        return {}
    split = _split_address(peer.split(",")[0].partition(":")[2])
    if split is None:
        return {}
    return {"net.peer.ip": split[0], "net.peer.port": split[1]}


def note_peer(address: str) -> None:
    """Record the instance an outbound attempt goes to on the current (client) span."""
    span = trace.get_current_span()
    if span.is_recording():
        split = _split_address(address)
        if split is not None:
            span.set_attributes({"net.peer.name": split[0], "net.peer.port": split[1]})


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, StatusError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _end(
    span: Span, exc: BaseException | None, *, server: bool, end_time: int | None = None
) -> None:
    if not span.is_recording():
        return
    code = grpc.StatusCode.OK if exc is None else _code_of(exc)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK and (not server or code in _SERVER_ERRORS):
        message = exc.message if isinstance(exc, StatusError) else type(exc).__name__
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message[:256]}"))
    span.end(end_time=end_time)


# Spans of streams dropped unread, with when they were dropped. A finalizer must not end a span
# itself: the span processor takes locks the collected thread may be holding. A deque append is
# safe anywhere; the next traced call ends them, at the time recorded.
_abandoned: collections.deque[tuple[Span, bool, int]] = collections.deque()


def _end_abandoned() -> None:
    while _abandoned:
        try:
            span, server, at = _abandoned.popleft()
        except IndexError:  # another thread took the last one
            return
        _end(span, asyncio.CancelledError(), server=server, end_time=at)


class _TracedStream:
    """A response stream whose span ends with the stream, read in the call's context."""

    __slots__ = ("_ctx", "_server", "_span", "_stream")

    def __init__(self, stream: Any, span: Span, ctx: Context, *, server: bool) -> None:
        self._stream: AsyncIterator[Any] = aiter(stream)
        self._span: Span | None = span
        self._ctx = ctx
        self._server = server

    def __aiter__(self) -> _TracedStream:
        return self

    async def __anext__(self) -> Any:
        token = otel_context.attach(self._ctx)
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            self._finish(None)
            raise
        except BaseException as exc:
            self._finish(exc)
            raise
        finally:
            otel_context.detach(token)

    async def aclose(self) -> None:
        """Stop reading: the span ends as CANCELLED unless the stream already ended."""
        self._finish(asyncio.CancelledError())
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

    def _finish(self, exc: BaseException | None) -> None:
        span, self._span = self._span, None
        if span is not None:
            _end(span, exc, server=self._server)

    def __del__(self) -> None:
        span, self._span = self._span, None
        if span is not None and span.is_recording():  # abandoned before its end: CANCELLED
            _abandoned.append((span, self._server, time.time_ns()))


async def _run_traced(
    handler: Handler, request: Any, span: Span, ctx: Context, call: CallContext, *, server: bool
) -> Any:
    """Run the next handler with ``ctx`` current; end ``span`` with the outcome (a response
    stream ends it when it ends)."""
    token = otel_context.attach(ctx)
    try:
        response = await handler(request)
    except BaseException as exc:
        _end(span, exc, server=server)
        raise
    finally:
        otel_context.detach(token)
    if call.response_streaming:
        return _TracedStream(response, span, ctx, server=server)
    _end(span, None, server=server)
    return response


def trace_server(tracing: Tracing) -> Middleware:
    """Build the server middleware that traces each call and binds its context.

    The call runs with its span current in the OpenTelemetry context (a contextvar), so logs,
    tasks created by the handler, work sent through :func:`to_thread`, and outbound calls
    made through tether all carry its trace. Malformed or oversized ``traceparent``,
    ``tracestate`` or ``baggage`` start a new trace; they never fail the call.

    Args:
        tracing: the App's tracing.

    Returns:
        A server middleware; put it outside ``recover`` and the access log, so their lines
        carry the trace and the span gets the status the caller gets.
    """

    def middleware(handler: Handler) -> Handler:
        async def traced(request: Any) -> Any:
            call = current_call()
            if call is None:
                return await handler(request)
            if _abandoned:
                _end_abandoned()
            span, ctx = tracing.server_context(call)
            return await _run_traced(handler, request, span, ctx, call, server=True)

        return traced

    return middleware


def trace_client(tracing: Tracing, *, target: str | None = None) -> Middleware:
    """Build the client middleware that traces each outbound call and sends its context.

    One CLIENT span per call, retries included (each attempt's server span is its child); the
    call's metadata gets ``traceparent``, ``tracestate`` and ``baggage`` (replacing any the
    caller put there). With tracing off the current context is still sent.

    Args:
        tracing: the App's tracing.
        target: the dependency's name (``peer.service``).

    Returns:
        A client middleware; put it outside the governance steps, so their events land on it.
    """
    propagation = tracing.propagation

    def middleware(handler: Handler) -> Handler:
        async def traced(request: Any) -> Any:
            call = current_call()
            if call is None:
                return await handler(request)
            if _abandoned:
                _end_abandoned()
            span, ctx = tracing.client_context(call, target)
            pairs = propagation.inject(ctx)
            if not pairs:
                return await handler(request)
            keys = propagation.keys()
            metadata = call.metadata
            if any(k in keys for k, _ in metadata):
                metadata = tuple(pair for pair in metadata if pair[0] not in keys)
            with use_call(call.replace(metadata=(*metadata, *pairs))):
                return await _run_traced(handler, request, span, ctx, call, server=False)

        return traced

    return middleware


class SpanEvents:
    """Hooks that put the client chain's governance on the current call's span.

    Each adds an event to the span current when the step acts (the call's CLIENT span) and
    does nothing when that span is not recorded.
    """

    @staticmethod
    def _span() -> Span | None:
        span = trace.get_current_span()
        return span if span.is_recording() else None

    @classmethod
    def breaker(cls, event: BreakerEvent) -> None:
        """A breaker listener: ``tether.breaker`` with the states left and entered."""
        span = cls._span()
        if span is not None:
            span.add_event(
                "tether.breaker",
                {"tether.breaker.from": event.old, "tether.breaker.to": event.new},
            )

    @classmethod
    def fallback(cls, event: Degradation) -> None:
        """A fallback listener: ``tether.fallback`` with the reason and where it came from;
        the span gets ``tether.degraded = true``."""
        span = cls._span()
        if span is not None:
            span.set_attribute("tether.degraded", True)
            span.add_event(
                "tether.fallback",
                {"tether.fallback.reason": event.reason, "tether.fallback.source": event.source},
            )

    @classmethod
    def admission_refused(cls, method: str, limit: str) -> None:
        """The server admission hook: ``tether.admission_refused`` with the limit reached, on
        the served call's SERVER span."""
        span = cls._span()
        if span is not None:
            span.add_event("tether.admission_refused", {"tether.admission.limit": limit})

    @classmethod
    def rejected(cls) -> None:
        """The limiter hook: ``tether.rate_limited``."""
        span = cls._span()
        if span is not None:
            span.add_event("tether.rate_limited")

    @classmethod
    def retried(cls, method: MethodName, attempt: int, code: str) -> None:
        """The retry hook: ``tether.retry`` with the attempt about to start and the code of
        the one that failed."""
        span = cls._span()
        if span is not None:
            span.add_event(
                "tether.retry", {"tether.retry.attempt": attempt, "rpc.grpc.status": code}
            )


# --------------------------------------------------------------------------- threads


def in_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` bound to a copy of the current context: the call, its trace, its log fields.

    For work handed to threads and executors, which do not copy the context themselves::

        loop.run_in_executor(pool, tether.in_context(work), item)
        pool.submit(tether.in_context(work), item)
        threading.Thread(target=tether.in_context(work)).start()
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        # A fresh copy per run: one context cannot be entered by two threads at once.
        return captured.copy().run(fn, *args, **kwargs)

    return run


async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on a worker thread in the current context and await it
    (``asyncio.to_thread``, which copies the context: the call's trace and log fields)."""
    return await asyncio.to_thread(fn, *args, **kwargs)
