"""Prometheus metrics of calls and governance, in a registry each App owns; no gRPC here.

:class:`Metrics` holds one ``prometheus_client.CollectorRegistry`` and the metric families
(``tether_*``), so several apps in one process never share or clash over series. Two
middlewares feed the call metrics: :func:`observe_server` (outermost in the server chain, so it
sees the status ``recover`` answers with) and :func:`observe_client` (outermost in the client
chain, so a call answered by a fallback counts as the caller saw it: OK). The governance pieces
report through hooks they already take: breaker and fallback listeners, the limiter's
``on_reject``, retry's ``on_retry``, the channel's ``on_members`` and the etcd registration's
``on_state``.

Label values are bounded: methods are labelled ``package.Service/Method`` only when the default
protobuf descriptor pool knows them (generated code registers every method it defines), and
``unknown`` otherwise, so junk method names sent to a server cannot create series; status codes
are gRPC's; targets are the dependency names the code dials.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer

from tether.breaker import BreakerEvent
from tether.context import MethodName, current_call
from tether.errors import StatusError
from tether.fallback import Degradation
from tether.middleware import Handler, Middleware

__all__ = [
    "BREAKER_STATES",
    "LATENCY_BUCKETS",
    "UNKNOWN",
    "Metrics",
    "MetricsEndpoint",
    "observe_client",
    "observe_server",
    "serve_metrics",
]

#: Histogram buckets (seconds) for RPC latency: 1 ms to 10 s, about three per decade.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The label of a method the descriptor pool does not know (and of its service).
UNKNOWN = "unknown"

#: ``tether_breaker_state`` values: ordered so that a higher value is a worse state.
BREAKER_STATES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}

# Method names are cached per name; names from the network could be endless, so caches stop
# growing here (an uncached name costs one descriptor-pool lookup per call, and still gets
# the bounded label).
_CACHE_LIMIT = 4096


def _code_of(exc: BaseException) -> str:
    """The status code name a call that raised ``exc`` ends with, as the caller sees it."""
    if isinstance(exc, StatusError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


class _Series:
    """The call figures of one method on one side: plain numbers, no lock.

    They change only on the event loop's thread, which runs the chains; the collector reads
    them from the scrape thread, where the GIL makes each read whole. A prometheus_client
    child takes a lock per update, five times a call: this is the hot path of every call.
    """

    __slots__ = ("buckets", "codes", "in_flight", "labels", "seconds")

    def __init__(self, labels: tuple[str, str]) -> None:
        self.labels = labels
        self.codes: dict[str, int] = {}  # at most one per status code
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: over every bound
        self.seconds = 0.0
        self.in_flight = 0

    def finish(self, code: str, started: float) -> None:
        """Count one call that ended with ``code`` after starting at ``started``."""
        seconds = time.perf_counter() - started
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le is inclusive
        self.seconds += seconds
        self.in_flight -= 1


# The ``le`` labels as prometheus_client writes them (repr of the float: 0.001, 1.0, 10.0).
_BOUNDS = tuple(repr(float(bound)) for bound in LATENCY_BUCKETS)


class _CallFamilies:
    """The calls counter, latency histogram and in-flight gauge of one side, as a collector.

    Exposed as ``prometheus_client`` would expose a Counter, Histogram and Gauge of these
    names and labels (without ``_created`` samples).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        side: str,
        labels: tuple[str, str],
        helps: tuple[str, str, str],
    ) -> None:
        self._names = (
            f"tether_{side}_calls",
            f"tether_{side}_call_seconds",
            f"tether_{side}_in_flight",
        )
        self._labels = labels
        self._helps = helps
        self._series: dict[tuple[str, str], _Series] = {}
        registry.register(self)

    def series(self, labels: tuple[str, str]) -> _Series:
        """The series of one pair of label values, made on first use."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(labels)
        return series

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily]:
        calls, seconds, in_flight = self._names
        calls_help, seconds_help, in_flight_help = self._helps
        return (
            CounterMetricFamily(calls, calls_help, labels=(*self._labels, "code")),
            HistogramMetricFamily(seconds, seconds_help, labels=self._labels),
            GaugeMetricFamily(in_flight, in_flight_help, labels=self._labels),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        calls, seconds, in_flight = self._families()
        for series in list(self._series.values()):  # copied whole: the loop may add one
            for code, count in list(series.codes.items()):
                calls.add_metric((*series.labels, code), count)
            cumulative, running = [], 0
            for bound, count in zip(_BOUNDS, series.buckets, strict=False):
                running += count
                cumulative.append((bound, running))
            cumulative.append(("+Inf", running + series.buckets[-1]))
            seconds.add_metric(series.labels, cumulative, series.seconds)
            in_flight.add_metric(series.labels, series.in_flight)
        yield from (calls, seconds, in_flight)


class Metrics:
    """The metric families of one App, in a registry of their own.

    Attributes:
        registry: the ``CollectorRegistry`` to expose (:func:`serve_metrics` serves it).

    Args:
        registry: where to register the families; a new ``CollectorRegistry`` if None.
        pool: the descriptor pool that decides which method names are real; the default pool
            (where generated code registers) if None.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._pool = pool or descriptor_pool.Default()
        self._labels: dict[str, tuple[str, str]] = {}
        r = self.registry
        method = ("service", "method")
        target = ("target", "method")
        self._server = _CallFamilies(
            r,
            side="server",
            labels=method,
            helps=(
                "Calls served, by final status code.",
                "Time from a call's arrival to its status, in seconds.",
                "Calls being served now.",
            ),
        )
        self._client = _CallFamilies(
            r,
            side="client",
            labels=target,
            helps=(
                "Outbound calls, by the status the caller got.",
                "Outbound call time, retries and backoff included, in seconds.",
                "Outbound calls in progress.",
            ),
        )
        self.breaker_state = Gauge(
            "tether_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            target,
            registry=r,
        )
        self.breaker_transitions = Counter(
            "tether_breaker_transitions",
            "Circuit breaker state changes, by the state entered.",
            (*target, "to"),
            registry=r,
        )
        self.limiter_rejections = Counter(
            "tether_limiter_rejections",
            "Calls the client rate limiter refused locally.",
            ("target",),
            registry=r,
        )
        self.retries = Counter(
            "tether_retries",
            "Attempts after the first (retries) sent by the client chain.",
            target,
            registry=r,
        )
        self.fallbacks = Counter(
            "tether_fallbacks",
            "Calls answered by a fallback, by the status it replaced.",
            (*target, "reason"),
            registry=r,
        )
        self.admission_rejections = Counter(
            "tether_admission_rejections",
            "Calls the server's admission control refused, by the limit reached.",
            (*method, "limit"),
            registry=r,
        )
        self.registration_state = Gauge(
            "tether_registration_state",
            "1 while this instance is registered (its last registration or renewal succeeded).",
            registry=r,
        )
        self.instances = Gauge(
            "tether_instances", "Instances known per dependency.", ("target",), registry=r
        )

    # ----------------------------------------------------------------- labels

    def method_labels(self, method: MethodName | str) -> tuple[str, str]:
        """The bounded ``(service, method)`` labels of a method.

        Args:
            method: a parsed name, or ``package.Service/Method`` (a leading ``/`` is optional).

        Returns:
            ``("package.Service", "package.Service/Method")`` as the descriptor pool names the
            method; ``("unknown", "unknown")`` when the pool does not know it.
        """
        if isinstance(method, str):
            method = MethodName.parse(method if method.startswith("/") else "/" + method)
        labels = self._labels.get(method.full)
        if labels is None:
            labels = self._decide(method)
            if len(self._labels) < _CACHE_LIMIT:
                self._labels[method.full] = labels
        return labels

    def _decide(self, method: MethodName) -> tuple[str, str]:
        service = method.qualified_service
        if not service or not method.method:
            return UNKNOWN, UNKNOWN
        try:
            found = self._pool.FindMethodByName(f"{service}.{method.method}")
        except KeyError:
            return UNKNOWN, UNKNOWN
        # The pool's own names: a mangled spelling of a real method maps to its one label.
        qualified = found.containing_service.full_name
        return qualified, f"{qualified}/{found.name}"

    def _server_series(self, method: MethodName) -> _Series:
        return self._server.series(self.method_labels(method))

    def _client_series(self, target: str, method: MethodName) -> _Series:
        return self._client.series((target, self.method_labels(method)[1]))

    # ----------------------------------------------------------------- hooks

    def observe_breaker(self, event: BreakerEvent) -> None:
        """A breaker listener (``breaker(..., listeners=[metrics.observe_breaker])``)."""
        labels = (event.service, self.method_labels(event.method)[1])
        self.breaker_state.labels(*labels).set(BREAKER_STATES.get(event.new, 0.0))
        self.breaker_transitions.labels(*labels, event.new).inc()

    def observe_fallback(self, event: Degradation) -> None:
        """A fallback listener (``fallback(..., listeners=[metrics.observe_fallback])``)."""
        method = self.method_labels(event.method)[1]
        self.fallbacks.labels(event.service, method, event.reason).inc()

    def rejection_counter(self, target: str) -> Callable[[], None]:
        """The limiter hook of ``target`` (``rate_limit(..., on_reject=...)``).

        Returns:
            A callable counting one rejection.
        """
        return self.limiter_rejections.labels(target).inc

    def admission_rejected(self, method: str, limit: str) -> None:
        """The server admission hook (``admit(..., on_reject=...)``): one refused call of
        ``method`` (``package.Service/Method``) at ``limit`` (``concurrency`` or ``rate``)."""
        self.admission_rejections.labels(*self.method_labels(method), limit).inc()

    def retry_counter(self, target: str) -> Callable[[MethodName, int, str], None]:
        """The retry hook of ``target`` (``retry(..., on_retry=...)``).

        Returns:
            A callable counting one retry of the method it is given.
        """

        def count(method: MethodName, attempt: int, code: str) -> None:
            self.retries.labels(target, self.method_labels(method)[1]).inc()

        return count

    def instances_gauge(self, target: str) -> Callable[[int], None]:
        """The membership hook of a channel to ``target`` (``Channel(..., on_members=...)``).

        Returns:
            A callable setting the number of instances known.
        """
        return self.instances.labels(target).set

    def observe_registration(self, state: str) -> None:
        """Record the registration's state: ``registered`` is 1, anything else 0.

        Args:
            state: as the registration loop names it (``registered``, ``unreachable``,
                ``lost``, ``failing``, ``deregistered``).
        """
        self.registration_state.set(1.0 if state == "registered" else 0.0)


# --------------------------------------------------------------------------- middleware


class _ObservedStream:
    """A response stream whose call is counted once, when the stream ends.

    A class rather than an async generator, so a stream dropped unread still counts its call
    (as CANCELLED) and leaves the in-flight gauge. That count comes from the finalizer, which
    the garbage collector may run on another thread; the series' numbers take no lock, so such
    a count can at worst race one update of the loop's thread (a rare miscount of one, never a
    deadlock, which a locked metric in a finalizer could cause).
    """

    __slots__ = ("_series", "_started", "_stream")

    def __init__(self, stream: Any, series: _Series, started: float) -> None:
        self._stream: AsyncIterator[Any] = aiter(stream)
        self._series: _Series | None = series
        self._started = started

    def __aiter__(self) -> _ObservedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            self._finish("OK")
            raise
        except BaseException as exc:
            self._finish(_code_of(exc))
            raise

    async def aclose(self) -> None:
        """Stop reading: the call counts as CANCELLED unless it already ended."""
        self._finish("CANCELLED")
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

    def _finish(self, code: str) -> None:
        series, self._series = self._series, None
        if series is not None:
            series.finish(code, self._started)

    def __del__(self) -> None:
        self._finish("CANCELLED")  # abandoned before its end


def _observer(series_of: Callable[[MethodName], _Series]) -> Middleware:
    """The call-metrics middleware, given how to find a method's label children."""
    cache: dict[str, _Series] = {}

    def middleware(handler: Handler) -> Handler:
        async def observed(request: Any) -> Any:
            ctx = current_call()
            if ctx is None:
                return await handler(request)
            series = cache.get(ctx.method.full)
            if series is None:
                series = series_of(ctx.method)
                if len(cache) < _CACHE_LIMIT:
                    cache[ctx.method.full] = series
            series.in_flight += 1
            started = time.perf_counter()
            try:
                response = await handler(request)
            except BaseException as exc:
                series.finish(_code_of(exc), started)
                raise
            if ctx.response_streaming:
                return _ObservedStream(response, series, started)
            series.finish("OK", started)
            return response

        return observed

    return middleware


def observe_server(metrics: Metrics) -> Middleware:
    """Build the server middleware counting calls, their latency and the calls in flight.

    Feeds ``tether_server_calls_total{service,method,code}``,
    ``tether_server_call_seconds{service,method}`` and ``tether_server_in_flight``. The code is
    the ``StatusError``'s, ``OK`` on success, ``CANCELLED`` when the call was cancelled and
    ``UNKNOWN`` for anything else; a response stream is measured until it ends.

    Args:
        metrics: where to record.

    Returns:
        A server middleware; put it outermost, so it sees the status ``recover`` answers with.
    """
    return _observer(metrics._server_series)


def observe_client(metrics: Metrics, *, target: str) -> Middleware:
    """Build the client middleware counting outbound calls, their latency and those in flight.

    Feeds ``tether_client_calls_total{target,method,code}``,
    ``tether_client_call_seconds{target,method}`` and ``tether_client_in_flight``, with codes
    as :func:`observe_server` names them.

    Args:
        metrics: where to record.
        target: the dependency this chain calls (the ``target`` label).

    Returns:
        A client middleware; put it outermost, so a call's time includes its retries and a
        call a fallback answered counts as OK (``tether_fallbacks_total`` counts those).
    """

    def series_of(method: MethodName) -> _Series:
        return metrics._client_series(target, method)

    return _observer(series_of)


# --------------------------------------------------------------------------- the endpoint

_SHUTDOWN_POLL = 0.05


class MetricsEndpoint:
    """The HTTP server exposing a registry, on a daemon thread; :meth:`close` stops it.

    Args:
        server: the WSGI server.
        thread: the thread serving it.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server: WSGIServer | None = server
        self._thread = thread
        self.port: int = server.server_port

    async def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # shutdown() waits for the serving loop's next poll: off the event loop.
        await asyncio.to_thread(_stop_http, server, self._thread)


def _stop_http(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join()


def serve_metrics(metrics: Metrics, *, host: str, port: int) -> MetricsEndpoint:
    """Serve ``metrics`` at ``http://host:port/metrics`` in the Prometheus text format.

    Args:
        metrics: the registry to expose.
        host: the address to bind.
        port: the port to bind; 0 picks a free one (read it from ``MetricsEndpoint.port``).

    Returns:
        The running endpoint.

    Raises:
        OSError: the address cannot be bound (in use, not permitted, or a host that does not
            resolve: ``socket.gaierror``).
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    # prometheus_client's start_http_server polls for shutdown every 0.5 s, which every
    # App.stop() would wait out; the same server with a 50 ms poll stops at once.
    server_class = type("_MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server: WSGIServer = make_server(
        host, port, make_wsgi_app(metrics.registry), server_class, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _SHUTDOWN_POLL},
        name="tether-metrics",
        daemon=True,
    )
    thread.start()
    return MetricsEndpoint(server, thread)


class _QuietHandler(WSGIRequestHandler):
    """Scrapes are not worth a line on stderr each."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
