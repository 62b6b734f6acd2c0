"""Trace context for outbound HTTP: the current call's W3C headers, and httpx hooks that send them.

A service that calls an HTTP API must send the same ``traceparent``/``tracestate``/``baggage``
its gRPC calls carry, or the trace breaks in two at that hop. Inside a served call (or an HTTP
request under :class:`tether.asgi.TraceMiddleware`) the call's context is current, so::

    async with httpx.AsyncClient(event_hooks=tether.http.async_httpx_event_hooks()) as http:
        await http.get("https://rates.example/eur")      # carries the call's traceparent

    requests.get(url, headers=tether.http.inject_headers({"accept": "application/json"}))

The headers are written by the same propagation code as gRPC metadata (the process's global
propagator when it is not the default W3C pair, e.g. ``OTEL_PROPAGATORS=b3``), and any the
request already had are replaced, as the gRPC client chain does. tether makes no HTTP CLIENT
span: the server on the other side sees the call's span as its parent. Outside any call there
is no context, and nothing is added. ``tether check`` (TTH007) flags HTTP clients made without
these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping, MutableMapping
from typing import Any, Protocol

from opentelemetry import context as otel_context

from tether.tracing import _Propagation

__all__ = [
    "AsyncHook",
    "SyncHook",
    "async_httpx_event_hooks",
    "httpx_event_hooks",
    "inject_headers",
]

_PROPAGATION = _Propagation()


class _Request(Protocol):
    """What a request hook needs of an ``httpx.Request``: its mutable headers."""

    @property
    def headers(self) -> MutableMapping[str, str]: ...


#: A synchronous httpx request hook, as ``httpx.Client(event_hooks=...)`` calls it.
SyncHook = Callable[[_Request], None]
#: An asynchronous httpx request hook, as ``httpx.AsyncClient(event_hooks=...)`` awaits it.
AsyncHook = Callable[[_Request], Coroutine[Any, Any, None]]


def inject_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers of an outbound HTTP request carrying the current trace context.

    Args:
        headers: headers of your own to send too; not modified. Propagation headers among them
            (any case) are replaced by the current context's.

    Returns:
        A new dict: ``headers`` plus ``traceparent`` (and ``tracestate``, ``baggage`` when the
        context has them); just ``headers`` when no trace context is current.
    """
    keys = _PROPAGATION.keys()
    out = {k: v for k, v in (headers or {}).items() if k.lower() not in keys}
    out.update(_PROPAGATION.inject(otel_context.get_current()))
    return out


def _set_trace_headers(request: _Request) -> None:
    """Replace the request's propagation headers with the current context's."""
    headers = request.headers
    propagated = _PROPAGATION.keys()
    for key in propagated:
        if key in headers:  # httpx headers: case-insensitive, every value removed
            del headers[key]
    for key, value in _PROPAGATION.inject(otel_context.get_current()):
        headers[key] = value


async def _set_trace_headers_async(request: _Request) -> None:
    _set_trace_headers(request)


def httpx_event_hooks() -> dict[str, list[SyncHook]]:
    """Event hooks for ``httpx.Client`` (synchronous) that send the current trace context.

    ``httpx.Client(event_hooks=tether.http.httpx_event_hooks())``; for ``httpx.AsyncClient``,
    which awaits its hooks, use :func:`async_httpx_event_hooks`. The lists are new on each call:
    add hooks of your own to them.

    Returns:
        ``{"request": [hook]}``; the hook sets ``traceparent``, ``tracestate`` and ``baggage`` on
        each request from the context current when it is sent.
    """
    return {"request": [_set_trace_headers]}


def async_httpx_event_hooks() -> dict[str, list[AsyncHook]]:
    """Event hooks for ``httpx.AsyncClient`` that send the current trace context.

    ``httpx.AsyncClient(event_hooks=tether.http.async_httpx_event_hooks())``. The lists are new
    on each call: add hooks of your own to them.

    Returns:
        ``{"request": [hook]}``; the (async) hook sets ``traceparent``, ``tracestate`` and
        ``baggage`` on each request from the context of the task sending it.
    """
    return {"request": [_set_trace_headers_async]}
