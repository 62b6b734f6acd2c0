"""Tracing for HTTP edges: an ASGI middleware giving each request the trace contract of a gRPC call.

:class:`TraceMiddleware` wraps any ASGI 3 application (Starlette, FastAPI, a bare callable) and
uses an App's :class:`~tether.tracing.Tracing`, so HTTP headers and gRPC metadata agree: the
request's ``traceparent``/``tracestate``/``baggage`` are read by the same propagation code, its
sampling is decided by the same rules (:meth:`Tracing.start_server_span`), and its context is
current while the app runs, so log lines and outbound tether calls carry the trace.

Span names and attributes follow the OpenTelemetry HTTP server conventions. The name is
``{method} {route}`` when the framework routed the request (it left ``scope["route"]``), else
the method alone: the conventions forbid the raw path as a name (one name per URL, any number
of them for a scanner), so the path is the ``url.path`` attribute instead. The response gets
no trace header (neither ``traceparent`` nor level 2's draft ``traceresponse``): gRPC replies
carry none either, and an edge should not hand internal ids and sampling decisions to whoever
calls it; ``docs/observability.md`` says more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from tether.tracing import Tracing

__all__ = ["TraceMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The methods the HTTP conventions know; any other is recorded as _OTHER and named HTTP, so a
# client cannot mint span names.
_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
# Client-supplied values are cut: a span is not a place to store whatever a caller sends.
_MAX_USER_AGENT = 256
_MAX_PATH = 1024
_MAX_ROUTE = 256


class TraceMiddleware:
    """ASGI middleware: one SERVER span per HTTP request, its context current while it runs.

    The parent comes from the request's W3C headers (or the process's propagator); bad or
    oversized ones start a new trace and never fail the request. The span is named
    ``GET /users/{id}`` (the framework's route) or ``GET`` (no route), with
    ``http.request.method``, ``url.path``, ``url.scheme``, ``server.address``,
    ``server.port``, ``client.address``, ``network.protocol.version``,
    ``user_agent.original`` (cut to 256 characters), ``http.route`` and
    ``http.response.status_code``. It is an error for a 5xx response and for an exception
    escaping the app, which is re-raised; only the exception's type is recorded. No other
    header is read onto the span, and no header is written to the response.

    Lifespan and websocket connections pass through untouched. With tracing off nothing is
    recorded and the caller's context passes through, as for a gRPC call.

    Args:
        app: the ASGI application to wrap.
        tracing: the App's tracing (``app.tracing``), or a ``Tracing`` of the edge's own.
    """

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pairs: list[tuple[str, str]] = []
        user_agent: str | None = None
        for raw_key, raw_value in scope.get("headers", ()):
            # ASGI headers are bytes; latin-1 maps every byte, so no header fails decoding.
            key, value = raw_key.decode("latin-1").lower(), raw_value.decode("latin-1")
            pairs.append((key, value))
            if key == "user-agent" and user_agent is None:
                user_agent = value
        method = str(scope.get("method", "")).upper()
        if method not in _METHODS:
            method = "_OTHER"
        label = "HTTP" if method == "_OTHER" else method
        span, ctx = self.tracing.start_server_span(
            label,
            self.tracing.propagation.extract(pairs),
            lambda: _request_attributes(scope, method, user_agent),
        )
        token = otel_context.attach(ctx)
        try:
            if not span.is_recording():  # nothing to note: the app talks to the server directly
                await self.app(scope, receive, send)
                return
            status: int | None = None

            async def send_noting_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_noting_status)
            except BaseException as exc:
                _finish(span, scope, label, status, exc)
                raise
            _finish(span, scope, label, status, None)
        finally:
            otel_context.detach(token)


def _request_attributes(
    scope: Scope, method: str, user_agent: str | None
) -> dict[str, AttributeValue]:
    """The span's attributes known when the request arrives."""
    attributes: dict[str, AttributeValue] = {
        "http.request.method": method,
        "url.path": str(scope.get("path", ""))[:_MAX_PATH],
        "url.scheme": str(scope.get("scheme", "http")),
    }
    server = scope.get("server")
    if server:  # (host, port), or (unix socket path, None)
        host, port = server
        if host:
            attributes["server.address"] = str(host)
        if port is not None:
            attributes["server.port"] = int(port)
    client = scope.get("client")
    if client and client[0]:
        attributes["client.address"] = str(client[0])
    version = scope.get("http_version")
    if version:
        attributes["network.protocol.version"] = str(version)
    if user_agent is not None:
        attributes["user_agent.original"] = user_agent[:_MAX_USER_AGENT]
    return attributes


def _route(scope: Scope) -> str | None:
    """The route template the framework matched (Starlette and FastAPI leave the route object
    in ``scope["route"]``), or None."""
    route = scope.get("route")
    path = route if isinstance(route, str) else getattr(route, "path", None)
    return path[:_MAX_ROUTE] if isinstance(path, str) and path else None


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _finish(
    span: Span, scope: Scope, label: str, status: int | None, exc: BaseException | None
) -> None:
    """End the span with what the request came to: route, status code, error."""
    route = _route(scope)
    if route is not None:
        span.update_name(f"{label} {route}")
        span.set_attribute("http.route", route)
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if isinstance(exc, Exception):
        # The type only: a message or traceback may hold request data or internals.
        name = _type_name(exc)
        span.set_attribute("error.type", name)
        span.set_status(Status(StatusCode.ERROR, name))
    elif status is not None and status >= 500:
        # 4xx is the client's problem, not the server's (the HTTP server conventions).
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
    # A cancellation alone (the server gave up on the request) is not an error, as a CANCELLED
    # gRPC call is not the server's.
    span.end()
