"""tether.http: the current trace context on outbound HTTP requests, received by a real ASGI app
(Starlette behind httpx's ASGI transport) and by httpx's sync client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support.tracing import assert_child, memory_tracing

import tether.http
from tether.asgi import TraceMiddleware

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


@pytest.fixture
def in_a_call() -> Iterator[None]:
    """The context of a call in progress: a sampled remote parent and one baggage entry."""
    parent = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(1))
    ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    ctx = baggage.set_baggage("tenant", "acme", ctx)
    token = otel_context.attach(ctx)
    yield
    otel_context.detach(token)


async def echo_headers(request: Request) -> Response:
    return JSONResponse({k: v for k, v in request.headers.items()})


ECHO = Starlette(routes=[Route("/echo", echo_headers)])


def test_inject_headers_adds_the_current_context(in_a_call: None) -> None:
    """traceparent and baggage of the current context are added to a copy of the headers."""
    mine = {"accept": "application/json", "TraceParent": "00-stale"}
    headers = tether.http.inject_headers(mine)
    assert headers == {
        "accept": "application/json",
        "traceparent": TRACEPARENT,
        "baggage": "tenant=acme",
    }
    assert mine == {"accept": "application/json", "TraceParent": "00-stale"}


def test_inject_headers_outside_a_call_adds_nothing() -> None:
    """With no trace context current, only the caller's headers come back."""
    assert tether.http.inject_headers() == {}
    assert tether.http.inject_headers({"accept": "text/plain"}) == {"accept": "text/plain"}


async def test_async_hooks_send_the_context_to_an_asgi_app(in_a_call: None) -> None:
    """An AsyncClient with async_httpx_event_hooks() delivers traceparent and baggage."""
    transport = httpx.ASGITransport(app=ECHO)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://edge",
        event_hooks=tether.http.async_httpx_event_hooks(),
    ) as http:
        received = (await http.get("/echo", headers={"traceparent": "00-stale-x-01"})).json()
    assert received["traceparent"] == TRACEPARENT
    assert received["baggage"] == "tenant=acme"


async def test_async_hooks_send_nothing_outside_a_call() -> None:
    """Outside any call the hook adds no trace headers."""
    transport = httpx.ASGITransport(app=ECHO)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://edge",
        event_hooks=tether.http.async_httpx_event_hooks(),
    ) as http:
        received = (await http.get("/echo")).json()
    assert "traceparent" not in received


def test_sync_hooks_send_the_context(in_a_call: None) -> None:
    """An httpx.Client with httpx_event_hooks() sends traceparent on each request."""
    seen: list[httpx.Headers] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(204)

    with httpx.Client(
        transport=httpx.MockTransport(answer), event_hooks=tether.http.httpx_event_hooks()
    ) as http:
        http.get("http://rates.example/eur")
    assert seen[0]["traceparent"] == TRACEPARENT


async def test_one_trace_runs_across_an_http_hop() -> None:
    """An edge calling a second HTTP service with the hooks: the second span is the first's
    child, in one trace."""
    exporter = InMemorySpanExporter()
    tracing = memory_tracing(exporter, "edge")
    inner = Starlette(
        routes=[Route("/rates", echo_headers)],
        middleware=[Middleware(TraceMiddleware, tracing=tracing)],
    )

    async def quote(request: Request) -> Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=inner),
            base_url="http://rates",
            event_hooks=tether.http.async_httpx_event_hooks(),
        ) as http:
            return JSONResponse((await http.get("/rates")).json())

    outer = Starlette(
        routes=[Route("/quote", quote)], middleware=[Middleware(TraceMiddleware, tracing=tracing)]
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=outer), base_url="http://edge"
    ) as http:
        assert (await http.get("/quote")).status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert_child(spans["GET /rates"], spans["GET /quote"])
    await tracing.shutdown()


def test_each_call_gives_new_lists() -> None:
    """Adding a hook of your own to the returned lists leaves the next call's untouched."""
    hooks = tether.http.async_httpx_event_hooks()
    hooks["request"].append(hooks["request"][0])
    assert len(tether.http.async_httpx_event_hooks()["request"]) == 1
    assert list(tether.http.httpx_event_hooks()) == ["request"]
