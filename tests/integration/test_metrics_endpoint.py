"""The Prometheus endpoint of a real App: scraped over loopback, parsed, and changing with calls."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request
from collections.abc import AsyncIterator, Mapping

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from support.echo_service import EchoServicer, build_app
from support.tracing import memory_tracing

import tether
from tether.registry import MemoryRegistry
from tether.testing import EtcdServer, eventually, loopback_config, running

METRICS = {"enabled": True, "host": "127.0.0.1", "port": 0}
SAY = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Say"}
WAIT = 5.0

# A proxy from the environment must never see a loopback scrape.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> Samples:
    with _DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> Samples:
    """Every sample the endpoint serves, parsed; the blocking read runs off the event loop."""
    return await asyncio.to_thread(_scrape, port)


def sample(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """A sample's value; 0 for a series not exported yet."""
    return samples.get((name, frozenset((labels or {}).items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return sample(after, name, labels) - sample(before, name, labels)


async def test_server_counters_change_as_calls_are_made() -> None:
    """An OK call and a NOT_FOUND one move their counters by one each, and the histogram by two."""
    app = build_app(loopback_config("echo", metrics=METRICS))
    async with running(app), tether.dial(app.target) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        before = await scrape(app.metrics_port)
        await echo.Say(echo_pb2.SayRequest(text="hi"), timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.Say(echo_pb2.SayRequest(fail="not-found"), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        after = await scrape(app.metrics_port)
    assert delta(before, after, "tether_server_calls_total", **SAY, code="OK") == 1
    assert delta(before, after, "tether_server_calls_total", **SAY, code="NOT_FOUND") == 1
    assert delta(before, after, "tether_server_call_seconds_count", **SAY) == 2
    assert sample(after, "tether_server_in_flight", SAY) == 0


async def test_internal_errors_and_streams_are_counted_as_callers_see_them() -> None:
    """A handler's bug counts as INTERNAL (metrics sit outside recover); a stream at its end."""
    app = build_app(loopback_config("echo", metrics=METRICS))
    split = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Split"}
    async with running(app), tether.dial(app.target) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.Say(echo_pb2.SayRequest(fail="boom"), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        words = [r.text async for r in echo.Split(echo_pb2.SayRequest(text="a b c"))]
        assert words == ["a", "b", "c"]
        samples = await scrape(app.metrics_port)
    assert sample(samples, "tether_server_calls_total", {**SAY, "code": "INTERNAL"}) == 1
    assert sample(samples, "tether_server_calls_total", {**split, "code": "OK"}) == 1
    assert sample(samples, "tether_server_in_flight", split) == 0


async def test_client_metrics_through_app_client() -> None:
    """app.client's calls are counted under the dependency's name, with its instances known."""
    registry = MemoryRegistry()
    echo_app = build_app(loopback_config("echo", metrics=METRICS), registry=registry)
    caller = tether.App(loopback_config("caller", metrics=METRICS), registry=registry)
    client = {"target": "echo", "method": "echo.v1.Echo/Say"}
    async with running(echo_app), running(caller):
        echo = caller.client("echo", echo_pb2_grpc.EchoStub)
        before = await scrape(caller.metrics_port)
        await echo.Say(echo_pb2.SayRequest(text="hi"))
        with pytest.raises(grpc.aio.AioRpcError):
            await echo.Say(echo_pb2.SayRequest(fail="not-found"))
        after = await scrape(caller.metrics_port)
        served = await scrape(echo_app.metrics_port)
    assert delta(before, after, "tether_client_calls_total", **client, code="OK") == 1
    assert delta(before, after, "tether_client_calls_total", **client, code="NOT_FOUND") == 1
    assert delta(before, after, "tether_client_call_seconds_count", **client) == 2
    assert sample(after, "tether_client_in_flight", client) == 0
    assert sample(after, "tether_instances", {"target": "echo"}) == 1
    assert sample(after, "tether_registration_state") == 1
    # Each app exports its own registry: the caller served nothing, the echo app called nothing.
    assert not any(name == "tether_server_calls_total" for name, _ in after)
    assert not any(name == "tether_client_calls_total" for name, _ in served)
    assert sample(served, "tether_server_calls_total", {**SAY, "code": "OK"}) == 1


# ------------------------------------------------------------------- governance, real calls

GOVERNANCE = ("tether_retries_total", "tether_fallbacks_total", "tether_limiter_rejections_total")


def governance_deltas(before: Samples, after: Samples) -> dict[str, float]:
    """How much each governance counter moved, summed over its series."""
    return {
        name: sum(value for (n, _), value in after.items() if n == name)
        - sum(value for (n, _), value in before.items() if n == name)
        for name in GOVERNANCE
    }


@contextlib.asynccontextmanager
async def echo_and_caller(
    client: Mapping[str, object], fallback: str | None = None
) -> AsyncIterator[tuple[EchoServicer, tether.App]]:
    """Echo as instance "a" (so fail="unavailable:a" fails there) and a caller App with
    metrics on and ``client`` settings, both on loopback and in one memory registry; with
    ``fallback``, the caller declares that fixed answer for Say."""
    registry = MemoryRegistry()
    servicer = EchoServicer("a")
    echo_app = build_app(loopback_config("echo"), servicer, registry=registry)
    caller = tether.App(
        loopback_config("caller", metrics=METRICS, client=client), registry=registry
    )
    if fallback is not None:
        caller.fallback(SAY["method"], response=fallback)
    async with running(echo_app), running(caller):
        yield servicer, caller


async def test_a_retry_is_counted() -> None:
    """A call that fails UNAVAILABLE on its first attempt is sent again: the server sees both
    attempts, and tether_retries_total moves by exactly one."""
    client = {"retry": {"max_attempts": 2, "initial_backoff_seconds": 0.001}}
    async with echo_and_caller(client) as (servicer, caller):
        echo = caller.client("echo", echo_pb2_grpc.EchoStub)
        before = await scrape(caller.metrics_port)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.Say(echo_pb2.SayRequest(fail="unavailable:a"), timeout=WAIT)
        after = await scrape(caller.metrics_port)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.says == 2
    assert delta(before, after, "tether_retries_total", target="echo", method=SAY["method"]) == 1
    assert governance_deltas(before, after) == dict.fromkeys(GOVERNANCE, 0) | {
        "tether_retries_total": 1
    }


async def test_a_fallback_answer_is_counted_with_its_reason() -> None:
    """A call the server fails UNAVAILABLE is answered by the declared fallback: the caller gets
    the fallback's reply, counted once in tether_fallbacks_total with reason UNAVAILABLE."""
    client = {"retry": {"max_attempts": 1}}
    async with echo_and_caller(client, fallback='text: "cached"') as (servicer, caller):
        echo = caller.client("echo", echo_pb2_grpc.EchoStub)
        before = await scrape(caller.metrics_port)
        reply = await echo.Say(echo_pb2.SayRequest(fail="unavailable:a"), timeout=WAIT)
        after = await scrape(caller.metrics_port)
    assert reply.text == "cached"
    assert servicer.says == 1
    labels = {"target": "echo", "method": SAY["method"], "reason": "UNAVAILABLE"}
    assert delta(before, after, "tether_fallbacks_total", **labels) == 1
    assert (
        delta(
            before,
            after,
            "tether_client_calls_total",
            target="echo",
            method=SAY["method"],
            code="OK",
        )
        == 1
    )
    assert governance_deltas(before, after) == dict.fromkeys(GOVERNANCE, 0) | {
        "tether_fallbacks_total": 1
    }


async def test_a_limiter_rejection_is_counted() -> None:
    """With a bucket of one token that does not refill within the test, the second call is
    refused locally (it never reaches the server) and tether_limiter_rejections_total moves by
    one."""
    limiter = {"rate": 0.001, "burst": 1, "max_wait_seconds": 0}
    client = {"services": {"echo": {"limiter": limiter}}}
    async with echo_and_caller(client) as (servicer, caller):
        echo = caller.client("echo", echo_pb2_grpc.EchoStub)
        before = await scrape(caller.metrics_port)
        await echo.Say(echo_pb2.SayRequest(text="first"), timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.Say(echo_pb2.SayRequest(text="second"), timeout=WAIT)
        after = await scrape(caller.metrics_port)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.says == 1
    assert delta(before, after, "tether_limiter_rejections_total", target="echo") == 1
    assert governance_deltas(before, after) == dict.fromkeys(GOVERNANCE, 0) | {
        "tether_limiter_rejections_total": 1
    }


async def test_the_endpoint_stops_with_the_app() -> None:
    """Once the app has stopped, its metrics port refuses connections."""
    app = build_app(loopback_config("echo", metrics=METRICS))
    async with running(app):
        port = app.metrics_port
        assert sample(await scrape(port), "tether_server_in_flight", SAY) == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_metrics_port_in_use_is_refused_with_config_error() -> None:
    """A metrics port another socket holds is refused at start-up naming metrics.port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        app = build_app(loopback_config("echo", metrics={**METRICS, "port": port}))
        with pytest.raises(tether.ConfigError) as err:
            await app.start()
    assert [p.field for p in err.value.problems] == ["metrics.port"]
    assert f"metrics.port={port}: cannot bind 127.0.0.1:{port}" in str(err.value)


async def test_a_grpc_port_in_use_releases_the_metrics_port() -> None:
    """When the gRPC port is refused, the metrics endpoint bound before it is closed again."""
    with socket.socket() as holder, socket.socket() as probe:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
        probe.close()  # a port known to be free; the app binds it for metrics
        config = loopback_config(
            "echo",
            server={"port": holder.getsockname()[1]},
            metrics={**METRICS, "port": metrics_port},
        )
        with pytest.raises(tether.ConfigError, match=r"server\.port"):
            await build_app(config).start()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", metrics_port)


async def test_registration_state_follows_etcd_through_an_outage(etcd: EtcdServer) -> None:
    """The gauge is 1 once registered, 0 while etcd is away, 1 again once it answers."""
    registry = {"backend": "etcd", "endpoints": [etcd.endpoint], "ttl_seconds": 2}
    app = build_app(loopback_config("echo", registry=registry, metrics=METRICS))

    async def registration_is(expected: float) -> bool:
        return sample(await scrape(app.metrics_port), "tether_registration_state") == expected

    async with running(app):
        assert await registration_is(1)
        etcd.stop()
        await eventually(lambda: registration_is(0), within=10, message="0 while unreachable")
        etcd.start()
        await eventually(lambda: registration_is(1), within=10, message="1 once registered")
    assert app.metrics is not None
    assert app.metrics.registry.get_sample_value("tether_registration_state") == 0


async def test_admission_refusals_are_counted_by_limit_and_marked_on_the_span() -> None:
    """A call refused by server admission moves ``tether_admission_rejections_total`` for its
    method and limit, and its SERVER span carries a ``tether.admission_refused`` event."""
    exporter = InMemorySpanExporter()
    servicer = EchoServicer()
    admission = {"methods": {"echo.v1.Echo/Hold": {"max_concurrent": 1}}}
    app = build_app(
        loopback_config("echo", metrics=METRICS, server={"admission": admission}),
        servicer=servicer,
        tracing=memory_tracing(exporter, "echo"),
    )
    hold = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Hold", "limit": "concurrency"}
    async with running(app), grpc.aio.insecure_channel(app.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        before = await scrape(app.metrics_port)
        held = asyncio.ensure_future(stub.Hold(echo_pb2.SayRequest(text="x"), timeout=WAIT))
        await eventually(lambda: servicer.holding == 1, within=WAIT, message="the call is held")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Hold(echo_pb2.SayRequest(text="y"), timeout=WAIT)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        await stub.Say(echo_pb2.SayRequest(text="z"), timeout=WAIT)  # other methods: no bound
        servicer.release.set()
        await held
        after = await scrape(app.metrics_port)
    assert delta(before, after, "tether_admission_rejections_total", **hold) == 1
    assert delta(before, after, "tether_server_calls_total", **SAY, code="OK") == 1
    # By status code (8: RESOURCE_EXHAUSTED, not an error status for a SERVER span).
    events = {
        (span.attributes or {})["rpc.grpc.status_code"]: [
            (e.name, dict(e.attributes or {})) for e in span.events
        ]
        for span in exporter.get_finished_spans()
        if span.kind is trace.SpanKind.SERVER and span.name == "echo.v1.Echo/Hold"
    }
    assert events == {
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: [
            ("tether.admission_refused", {"tether.admission.limit": "concurrency"})
        ],
        grpc.StatusCode.OK.value[0]: [],
    }
