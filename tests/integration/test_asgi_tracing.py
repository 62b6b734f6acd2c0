"""Tracing at an HTTP edge: TraceMiddleware over Starlette, in process, and the HTTP to gRPC hop.

Requests go through httpx's ASGI transport (no sockets); the hop test calls a real tether gRPC
server on loopback. Spans go to OpenTelemetry's in-memory exporter as each ends.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from support.echo_service import build_app
from support.tracing import assert_child, memory_tracing

import tether
from tether.asgi import Message, Receive, Scope, Send, TraceMiddleware
from tether.testing import loopback_config, running

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
BASE_URL = "http://127.0.0.1:8080"


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _current_ids() -> dict[str, str]:
    sc = trace.get_current_span().get_span_context()
    return {"trace_id": _hex(sc.trace_id, 32), "span_id": _hex(sc.span_id, 16)}


class CrashError(Exception):
    """A handler failure whose message must stay off the span."""


async def hello(request: Request) -> Response:
    tether.get_logger("edge").info("hello", name=request.path_params["name"])
    return JSONResponse(_current_ids())


async def status(request: Request) -> Response:
    return PlainTextResponse("status", status_code=int(request.path_params["code"]))


async def crash(request: Request) -> Response:
    raise CrashError("secret-internal-detail at /srv/edge.py:7")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[str]:
        for _ in range(3):  # produced while the server sends the body, after the handler returned
            yield json.dumps(_current_ids()) + "\n"

    return StreamingResponse(chunks(), media_type="application/x-ndjson")


ROUTES = [
    Route("/hello/{name}", hello),
    Route("/status/{code:int}", status),
    Route("/crash", crash),
    Route("/stream", stream),
]


def _edge(tracing: tether.Tracing, routes: Sequence[Route] = ROUTES) -> Starlette:
    return Starlette(routes=list(routes), middleware=[Middleware(TraceMiddleware, tracing=tracing)])


def _client(app: object, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def edge(exporter: InMemorySpanExporter) -> Starlette:
    return _edge(memory_tracing(exporter, "edge"))


async def test_request_span_continues_the_callers_trace(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """A traceparent makes the request's SERVER span its child, named by the route, with the
    HTTP attributes; the handler runs in that span, and the context is left as it was."""
    async with _client(edge) as client:
        response = await client.get(
            "/hello/ada", headers={"traceparent": SAMPLED, "user-agent": "probe/1.0 " + "x" * 400}
        )
    assert response.status_code == 200
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /hello/{name}"
    assert span.kind is trace.SpanKind.SERVER
    assert _hex(span.context.trace_id, 32) == TRACE_ID
    assert span.parent is not None and _hex(span.parent.span_id, 16) == PARENT_ID
    assert span.parent.is_remote
    assert response.json() == {"trace_id": TRACE_ID, "span_id": _hex(span.context.span_id, 16)}
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/hello/ada",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": 8080,
        "client.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "user_agent.original": ("probe/1.0 " + "x" * 400)[:256],
        "http.route": "/hello/{name}",
        "http.response.status_code": 200,
    }
    assert span.status.status_code is trace.StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "edge"
    assert not trace.get_current_span().get_span_context().is_valid


async def test_request_without_context_starts_a_new_trace(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """No traceparent: the span is a root, and the handler runs in it."""
    async with _client(edge) as client:
        response = await client.get("/hello/ada")
    [span] = exporter.get_finished_spans()
    assert span.parent is None
    assert response.json()["trace_id"] == _hex(span.context.trace_id, 32)


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "garbage"},
        {"traceparent": "ff-" + "1" * 32 + "-" + "1" * 16 + "-01"},
        {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"},
        {"traceparent": SAMPLED + " " * 600},
        {"traceparent": "\xff\xfe-not-ascii"},
        {"baggage": "k=" + "v" * 9000},
    ],
    ids=["junk", "version-ff", "zero-trace-id", "oversized", "non-ascii", "oversized-baggage"],
)
async def test_malformed_context_starts_a_new_trace_and_never_fails_the_request(
    edge: Starlette, exporter: InMemorySpanExporter, headers: dict[str, str]
) -> None:
    """Junk or oversized context is dropped: 200, and the span is a new root."""
    encoded = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    async with _client(edge) as client:
        response = await client.get("/hello/ada", headers=encoded)
    assert response.status_code == 200
    [span] = exporter.get_finished_spans()
    assert span.parent is None
    assert _hex(span.context.trace_id, 32) != TRACE_ID


async def test_tracing_off_passes_the_context_through(exporter: InMemorySpanExporter) -> None:
    """Off: nothing is recorded, and the handler runs in the caller's own span context."""
    async with _client(_edge(tether.Tracing())) as client:
        passed = (await client.get("/hello/ada", headers={"traceparent": SAMPLED})).json()
        fresh = (await client.get("/hello/ada")).json()
    assert passed == {"trace_id": TRACE_ID, "span_id": PARENT_ID}
    assert fresh["trace_id"] not in (TRACE_ID, "0" * 32)  # fresh ids, so logs still correlate
    assert exporter.get_finished_spans() == ()


async def test_unsampled_parent_is_followed(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """A parent flagged unsampled: no span recorded, the handler keeps the caller's trace id."""
    async with _client(edge) as client:
        seen = (await client.get("/hello/ada", headers={"traceparent": SAMPLED[:-2] + "00"})).json()
    assert seen["trace_id"] == TRACE_ID
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(("code", "error"), [(503, True), (500, True), (404, False), (200, False)])
async def test_status_follows_the_server_conventions(
    edge: Starlette, exporter: InMemorySpanExporter, code: int, error: bool
) -> None:
    """A 5xx response marks the span an error; a 4xx (the client's problem) does not."""
    async with _client(edge) as client:
        response = await client.get(f"/status/{code}")
    assert response.status_code == code
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /status/{code:int}"
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == code
    assert (span.status.status_code is trace.StatusCode.ERROR) is error
    assert attributes.get("error.type") == (str(code) if error else None)


async def test_exception_marks_the_span_and_is_reraised(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """An exception escaping the app is an error recorded by type only, and is re-raised."""
    async with _client(edge) as client:
        with pytest.raises(CrashError):
            await client.get("/crash")
    [span] = exporter.get_finished_spans()
    name = f"{__name__}.CrashError"
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.status.description == name
    assert dict(span.attributes or {})["error.type"] == name
    assert span.events == ()  # no exception event: its message and traceback stay off the span
    assert "secret" not in json.dumps(dict(span.attributes or {}))


async def test_unrouted_request_is_named_by_its_method(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """No route matched: the span is named by the method alone (the path is an attribute), and
    an unknown method is _OTHER, named HTTP, so a client cannot mint span names."""
    async with _client(edge) as client:
        await client.get("/no/such/page-123")
        await client.request("FROBNICATE", "/hello/ada")
    missing, odd = exporter.get_finished_spans()
    assert missing.name == "GET"
    assert dict(missing.attributes or {})["url.path"] == "/no/such/page-123"
    assert "http.route" not in dict(missing.attributes or {})
    assert odd.name == "HTTP /hello/{name}"
    assert dict(odd.attributes or {})["http.request.method"] == "_OTHER"


async def test_streamed_body_is_produced_in_the_requests_context(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """A streaming response's chunks are made in the span, which ends after the last one."""
    async with _client(edge) as client:
        response = await client.get("/stream", headers={"traceparent": SAMPLED})
    [span] = exporter.get_finished_spans()
    chunks = [json.loads(line) for line in response.text.splitlines()]
    expected = {"trace_id": TRACE_ID, "span_id": _hex(span.context.span_id, 16)}
    assert chunks == [expected] * 3


async def test_secret_headers_reach_no_span_and_no_log_line(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """Authorization and cookie values appear in no span attribute, event, status or log."""
    stream = io.StringIO()
    tether.configure_logging("debug", "json", stream=stream)
    headers = {"authorization": "Bearer s3cr3t-t0k3n", "cookie": "session=s3cr3t-c00kie"}
    async with _client(edge, raise_app_exceptions=False) as client:
        await client.get("/hello/ada", headers=headers)
        await client.get("/status/503", headers=headers)
        await client.get("/crash", headers=headers)
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    for span in spans:
        dumped = json.dumps(
            {
                "name": span.name,
                "attributes": dict(span.attributes or {}),
                "events": [(e.name, dict(e.attributes or {})) for e in span.events],
                "status": span.status.description,
            }
        )
        assert "s3cr3t" not in dumped
    assert "s3cr3t" not in stream.getvalue()


async def test_log_lines_in_the_handler_carry_the_trace(
    edge: Starlette, exporter: InMemorySpanExporter
) -> None:
    """A line the handler writes carries the request's trace id and span id."""
    stream = io.StringIO()
    tether.configure_logging("info", "json", stream=stream)
    async with _client(edge) as client:
        await client.get("/hello/ada", headers={"traceparent": SAMPLED})
    [span] = exporter.get_finished_spans()
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "hello"
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, _hex(span.context.span_id, 16))


async def test_any_asgi_app_is_traced_and_other_scopes_pass_through(
    exporter: InMemorySpanExporter,
) -> None:
    """A bare ASGI callable (no framework, no route) is traced; lifespan and websocket scopes
    reach it untouched, with no span."""
    seen: list[tuple[Scope, Receive, Send]] = []

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    middleware = TraceMiddleware(bare, memory_tracing(exporter, "edge"))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    for kind in ("lifespan", "websocket"):
        scope: Scope = {"type": kind, "headers": [(b"traceparent", SAMPLED.encode())]}
        await middleware(scope, receive, send)
        assert seen.pop() == (scope, receive, send)
    assert exporter.get_finished_spans() == ()
    async with _client(middleware) as client:
        response = await client.post("/anything/42", headers={"traceparent": SAMPLED})
    assert response.status_code == 204
    [span] = exporter.get_finished_spans()
    assert span.name == "POST"
    assert dict(span.attributes or {})["http.response.status_code"] == 204
    assert span.parent is not None and _hex(span.parent.span_id, 16) == PARENT_ID


async def test_cancelled_request_ends_its_span_without_an_error(
    exporter: InMemorySpanExporter,
) -> None:
    """A request the server cancels ends its span, not as an error, and the cancellation goes on."""

    async def cancelled(scope: Scope, receive: Receive, send: Send) -> None:
        raise asyncio.CancelledError

    async with _client(TraceMiddleware(cancelled, memory_tracing(exporter, "edge"))) as client:
        with pytest.raises(asyncio.CancelledError):
            await client.get("/slow")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.UNSET
    assert "error.type" not in dict(span.attributes or {})


def _one(spans: Sequence[ReadableSpan], kind: trace.SpanKind, service: str) -> ReadableSpan:
    [span] = [
        s for s in spans if s.kind is kind and s.resource.attributes["service.name"] == service
    ]
    return span


async def test_http_request_continues_into_grpc_calls(exporter: InMemorySpanExporter) -> None:
    """HTTP headers and gRPC metadata agree: a request with a traceparent calls a tether gRPC
    server; the HTTP span is the caller's child, the CLIENT span the HTTP span's, the gRPC
    SERVER span the CLIENT span's, in one trace that the server also sees in its metadata."""
    echo = build_app(loopback_config("echo"), tracing=memory_tracing(exporter, "echo"))
    edge_tracing = memory_tracing(exporter, "edge")
    async with running(echo), tether.dial(echo.target, tracing=edge_tracing) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)

        async def relay(request: Request) -> Response:
            reply = await stub.Say(echo_pb2.SayRequest(text=request.path_params["text"]))
            return JSONResponse(dict(reply.seen))

        app = _edge(edge_tracing, [Route("/relay/{text}", relay)])
        async with _client(app) as client:
            response = await client.get("/relay/hop", headers={"traceparent": SAMPLED})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    http = _one(spans, trace.SpanKind.SERVER, "edge")
    client_span = _one(spans, trace.SpanKind.CLIENT, "edge")
    grpc_server = _one(spans, trace.SpanKind.SERVER, "echo")
    assert http.name == "GET /relay/{text}"
    assert http.parent is not None and _hex(http.parent.span_id, 16) == PARENT_ID
    assert_child(client_span, http)
    assert_child(grpc_server, client_span)
    assert {_hex(span.context.trace_id, 32) for span in spans} == {TRACE_ID}
    seen = response.json()
    assert seen["traceparent"].split("-")[1] == TRACE_ID
    assert seen["traceparent"].split("-")[2] == _hex(client_span.context.span_id, 16)
    assert seen["trace_id"] == TRACE_ID
