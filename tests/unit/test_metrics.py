"""The metrics middleware and hooks, read back from a fresh registry per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2
from support.fakes import FakeClock

from tether import CallContext, Handler, MethodName, Side, chain, use_call
from tether.app import default_server_middleware
from tether.breaker import breaker
from tether.client import default_client_middleware
from tether.config import ClientConfig
from tether.errors import Internal, NotFound, RateLimited, RemoteError
from tether.fallback import Fallbacks
from tether.metrics import UNKNOWN, Metrics, observe_client, observe_server
from tether.recovery import recover
from tether.testing import eventually, loopback_config

SAY = MethodName.parse("/echo.v1.Echo/Say")
HOLD = MethodName.parse("/echo.v1.Echo/Hold")
SPLIT = MethodName.parse("/echo.v1.Echo/Split")
LOOKUP = MethodName.parse("/echo.v1.Echo/Lookup")
SERVER = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Say"}
CLIENT = {"target": "echo", "method": "echo.v1.Echo/Say"}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series that does not exist yet."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def serve(
    handler: Handler, metrics: Metrics, method: MethodName = SAY, *, streaming: bool = False
) -> Any:
    """Run ``handler`` through observe_server as an inbound call of ``method``."""
    ctx = CallContext(method=method, side=Side.SERVER, response_streaming=streaming)
    with use_call(ctx):
        return await observe_server(metrics)(handler)("request")


def answering(outcome: object) -> Handler:
    """A handler that raises ``outcome`` if it is an exception, else returns it."""

    async def handle(request: Any) -> Any:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return handle


def streaming(*items: object) -> Handler:
    """A handler answering a stream of ``items``; an exception among them is raised there."""

    async def stream() -> AsyncIterator[Any]:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def handle(request: Any) -> Any:
        return stream()

    return handle


# --------------------------------------------------------------------------- call metrics


async def test_a_successful_call_counts_ok_and_is_timed() -> None:
    """One OK call: the OK counter and the histogram count move by one; nothing in flight."""
    metrics = Metrics()
    assert await serve(answering("reply"), metrics) == "reply"
    assert value(metrics, "tether_server_calls_total", **SERVER, code="OK") == 1
    assert value(metrics, "tether_server_call_seconds_count", **SERVER) == 1
    assert value(metrics, "tether_server_call_seconds_bucket", **SERVER, le="10.0") == 1
    assert value(metrics, "tether_server_in_flight", **SERVER) == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFound("gone"), "NOT_FOUND"),
        (Internal("internal error"), "INTERNAL"),
        (RemoteError(grpc.StatusCode.UNAVAILABLE, "peer down"), "UNAVAILABLE"),
        (asyncio.CancelledError(), "CANCELLED"),
        (ValueError("a bug"), "UNKNOWN"),
    ],
    ids=["status", "internal", "remote", "cancelled", "other"],
)
async def test_a_failed_call_counts_its_code(error: BaseException, code: str) -> None:
    """The code label is the status error's code, CANCELLED, or UNKNOWN for anything else."""
    metrics = Metrics()
    with pytest.raises(type(error)):
        await serve(answering(error), metrics)
    assert value(metrics, "tether_server_calls_total", **SERVER, code=code) == 1
    assert value(metrics, "tether_server_calls_total", **SERVER, code="OK") == 0
    assert value(metrics, "tether_server_call_seconds_count", **SERVER) == 1
    assert value(metrics, "tether_server_in_flight", **SERVER) == 0


async def test_in_flight_counts_calls_until_they_finish() -> None:
    """Two held calls show 2 in flight; once released the gauge is back to 0."""
    metrics = Metrics()
    release = asyncio.Event()
    entered: list[str] = []

    async def held(request: Any) -> Any:
        entered.append(request)
        await release.wait()
        return "reply"

    calls = [asyncio.ensure_future(serve(held, metrics)) for _ in range(2)]
    await eventually(lambda: len(entered) == 2, within=5, message="both calls in the handler")
    assert value(metrics, "tether_server_in_flight", **SERVER) == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert value(metrics, "tether_server_in_flight", **SERVER) == 0
    assert value(metrics, "tether_server_calls_total", **SERVER, code="OK") == 2


async def test_a_response_stream_is_measured_until_it_ends() -> None:
    """A stream counts once it is read to its end, and stays in flight until then."""
    metrics = Metrics()
    labels = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Split"}
    stream = await serve(streaming("a", "b"), metrics, SPLIT, streaming=True)
    assert value(metrics, "tether_server_in_flight", **labels) == 1
    assert [item async for item in stream] == ["a", "b"]
    assert value(metrics, "tether_server_calls_total", **labels, code="OK") == 1
    assert value(metrics, "tether_server_in_flight", **labels) == 0


async def test_a_stream_failing_midway_counts_its_code() -> None:
    """An error raised while streaming is the call's code."""
    metrics = Metrics()
    labels = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Split"}
    stream = await serve(streaming("a", NotFound("gone")), metrics, SPLIT, streaming=True)
    with pytest.raises(NotFound):
        async for _ in stream:
            pass
    assert value(metrics, "tether_server_calls_total", **labels, code="NOT_FOUND") == 1
    assert value(metrics, "tether_server_in_flight", **labels) == 0


async def test_a_stream_closed_early_counts_as_cancelled() -> None:
    """A stream abandoned before its end is CANCELLED, once, and leaves the in-flight gauge."""
    metrics = Metrics()
    labels = {"service": "echo.v1.Echo", "method": "echo.v1.Echo/Split"}
    stream = await serve(streaming("a", "b"), metrics, SPLIT, streaming=True)
    assert await anext(stream) == "a"
    await stream.aclose()
    await stream.aclose()
    assert value(metrics, "tether_server_calls_total", **labels, code="CANCELLED") == 1
    assert value(metrics, "tether_server_in_flight", **labels) == 0


async def test_client_calls_are_labelled_by_target() -> None:
    """observe_client labels calls with the dependency and the method, and counts codes."""
    metrics = Metrics()
    for outcome in ("reply", NotFound("gone")):
        with use_call(CallContext(method=SAY, side=Side.CLIENT)):
            handler = observe_client(metrics, target="echo")(answering(outcome))
            if isinstance(outcome, BaseException):
                with pytest.raises(NotFound):
                    await handler("request")
            else:
                await handler("request")
    assert value(metrics, "tether_client_calls_total", **CLIENT, code="OK") == 1
    assert value(metrics, "tether_client_calls_total", **CLIENT, code="NOT_FOUND") == 1
    assert value(metrics, "tether_client_call_seconds_count", **CLIENT) == 2
    assert value(metrics, "tether_client_in_flight", **CLIENT) == 0


async def test_two_metrics_objects_never_share_series() -> None:
    """Each Metrics has its own registry: the same call recorded in one is absent in the other."""
    first, second = Metrics(), Metrics()
    await serve(answering("reply"), first)
    assert value(first, "tether_server_calls_total", **SERVER, code="OK") == 1
    assert value(second, "tether_server_calls_total", **SERVER, code="OK") == 0


# --------------------------------------------------------------------------- label bounds


async def test_methods_unknown_to_the_proto_share_one_label() -> None:
    """Junk method names are all labelled 'unknown': one series however many names arrive."""
    metrics = Metrics()
    for i in range(50):
        await serve(answering("x"), metrics, MethodName.parse(f"/junk{i}.Nope/Hack{i}"))
    await serve(answering("x"), metrics, MethodName.parse("no slashes at all"))
    samples = [
        sample
        for family in metrics.registry.collect()
        if family.name == "tether_server_calls"
        for sample in family.samples
        if sample.name == "tether_server_calls_total"
    ]
    assert [s.labels for s in samples] == [{"service": UNKNOWN, "method": UNKNOWN, "code": "OK"}]
    assert samples[0].value == 51


def test_method_labels_use_the_descriptor_pools_names() -> None:
    """A known method is labelled as the pool names it, however it was spelled on the wire."""
    metrics = Metrics()
    assert metrics.method_labels(SAY) == ("echo.v1.Echo", "echo.v1.Echo/Say")
    assert metrics.method_labels("echo.v1.Echo/Say") == ("echo.v1.Echo", "echo.v1.Echo/Say")
    mangled = MethodName.parse("/echo.v1/Echo.Say")
    assert metrics.method_labels(mangled) == ("echo.v1.Echo", "echo.v1.Echo/Say")
    assert metrics.method_labels("echo.v1.Echo/Nope") == (UNKNOWN, UNKNOWN)


def test_the_label_cache_stops_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cache limit, names are still labelled but no longer remembered."""
    monkeypatch.setattr("tether.metrics._CACHE_LIMIT", 10)
    metrics = Metrics()
    for i in range(100):
        assert metrics.method_labels(f"junk.Svc/M{i}") == (UNKNOWN, UNKNOWN)
    assert metrics.method_labels(SAY)[1] == "echo.v1.Echo/Say"
    assert len(metrics._labels) == 10


# --------------------------------------------------------------------------- governance hooks


def client_chain(metrics: Metrics, terminal: Handler, **client: Any) -> Callable[[MethodName], Any]:
    """The default client chain of 'echo' with ``metrics``, over a fake terminal."""
    handler = chain(
        default_client_middleware(ClientConfig(**client), "echo", Fallbacks(), metrics)
    )(terminal)

    async def call(method: MethodName) -> Any:
        with use_call(CallContext(method=method, side=Side.CLIENT)):
            return await handler(echo_pb2.SayRequest(text="hi"))

    return call


def scripted(*outcomes: object) -> Handler:
    """A terminal answering from a script; the last outcome repeats."""
    queue = list(outcomes)

    async def handle(request: Any) -> Any:
        outcome = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return handle


def unavailable() -> RemoteError:
    return RemoteError(grpc.StatusCode.UNAVAILABLE, "peer down")


async def test_default_client_chain_counts_retries() -> None:
    """Two UNAVAILABLE attempts then a success: two retries, and one OK call for the caller."""
    metrics = Metrics()
    reply = echo_pb2.SayReply(text="hi")
    call = client_chain(
        metrics,
        scripted(unavailable(), unavailable(), reply),
        retry={"max_attempts": 3, "initial_backoff_seconds": 0.001},
    )
    assert await call(SAY) == reply
    assert value(metrics, "tether_retries_total", **CLIENT) == 2
    assert value(metrics, "tether_client_calls_total", **CLIENT, code="OK") == 1


async def test_default_client_chain_counts_limiter_rejections() -> None:
    """A call over the dependency's rate is refused locally and counted once."""
    metrics = Metrics()
    call = client_chain(
        metrics,
        scripted(echo_pb2.SayReply()),
        services={"echo": {"limiter": {"rate": 0.001, "burst": 1}}},
    )
    await call(HOLD)
    with pytest.raises(RateLimited):
        await call(HOLD)
    assert value(metrics, "tether_limiter_rejections_total", target="echo") == 1
    hold = {"target": "echo", "method": "echo.v1.Echo/Hold"}
    assert value(metrics, "tether_client_calls_total", **hold, code="RESOURCE_EXHAUSTED") == 1


async def test_default_client_chain_counts_fallbacks_by_reason() -> None:
    """Lookup's proto fallback answers an UNAVAILABLE call: counted, and OK for the caller."""
    metrics = Metrics()
    call = client_chain(metrics, scripted(unavailable()), retry={"max_attempts": 1})
    reply = await call(LOOKUP)
    assert reply.text == "static"
    lookup = {"target": "echo", "method": "echo.v1.Echo/Lookup"}
    assert value(metrics, "tether_fallbacks_total", **lookup, reason="UNAVAILABLE") == 1
    assert value(metrics, "tether_client_calls_total", **lookup, code="OK") == 1


async def test_default_client_chain_reports_breaker_transitions() -> None:
    """fail_max failures open Hold's breaker: state 2 and one transition to open."""
    metrics = Metrics()
    call = client_chain(
        metrics,
        scripted(RemoteError(grpc.StatusCode.INTERNAL, "bug")),
        breaker={"fail_max": 2, "reset_timeout_seconds": 30},
        retry={"max_attempts": 1},
    )
    for _ in range(2):
        with pytest.raises(RemoteError):
            await call(HOLD)
    hold = {"target": "echo", "method": "echo.v1.Echo/Hold"}
    assert value(metrics, "tether_breaker_state", **hold) == 2
    assert value(metrics, "tether_breaker_transitions_total", **hold, to="open") == 1
    assert value(metrics, "tether_client_calls_total", **hold, code="INTERNAL") == 2


async def test_breaker_state_follows_open_half_open_closed() -> None:
    """The state gauge reads 2, 1, 0 as the breaker opens, probes and closes."""
    metrics, clock = Metrics(), FakeClock()
    config = ClientConfig(breaker={"fail_max": 1, "reset_timeout_seconds": 10})
    middleware = breaker(
        config.resolver("echo"), service="echo", clock=clock, listeners=[metrics.observe_breaker]
    )
    release, probing = asyncio.Event(), asyncio.Event()
    outcomes: list[object] = [unavailable(), release, "ok"]

    async def peer(request: Any) -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, asyncio.Event):
            probing.set()
            await outcome.wait()
            return "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    handler = middleware(peer)

    async def call() -> Any:
        with use_call(CallContext(method=SAY, side=Side.CLIENT)):
            return await handler("request")

    with pytest.raises(RemoteError):
        await call()
    assert value(metrics, "tether_breaker_state", **CLIENT) == 2
    clock.now += 10
    probe = asyncio.ensure_future(call())
    await asyncio.wait_for(probing.wait(), 5)  # the probe was admitted: half-open
    assert value(metrics, "tether_breaker_state", **CLIENT) == 1
    release.set()
    assert await asyncio.wait_for(probe, 5) == "ok"
    assert value(metrics, "tether_breaker_state", **CLIENT) == 0
    for to in ("open", "half-open", "closed"):
        assert value(metrics, "tether_breaker_transitions_total", **CLIENT, to=to) == 1


def test_registration_state_is_one_only_while_registered() -> None:
    """registered is 1; unreachable, lost and deregistered are 0."""
    metrics = Metrics()
    assert value(metrics, "tether_registration_state") == 0
    for state, expected in [
        ("registered", 1),
        ("unreachable", 0),
        ("registered", 1),
        ("lost", 0),
        ("registered", 1),
        ("deregistered", 0),
    ]:
        metrics.observe_registration(state)
        assert value(metrics, "tether_registration_state") == expected, state


def test_instances_gauge_follows_membership() -> None:
    """The on_members hook sets the number of instances known for its target."""
    metrics = Metrics()
    on_members = metrics.instances_gauge("echo")
    on_members(3)
    assert value(metrics, "tether_instances", target="echo") == 3
    on_members(1)
    assert value(metrics, "tether_instances", target="echo") == 1


def test_default_server_chain_observes_outermost_only_with_metrics() -> None:
    """Without metrics the server chain is unchanged; with them one step is added in front."""
    config = loopback_config("echo")
    plain = default_server_middleware(config)
    observed = default_server_middleware(config, Metrics())
    assert len(observed) == len(plain) + 1
    assert recover in plain
    # Metrics first, so they see the INTERNAL that recover answers (and the access log's view).
    assert observed.index(recover) == plain.index(recover) + 1
    assert observed[0] not in plain


async def test_latency_lands_in_cumulative_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 ms call counts in every bucket from le=0.005 up, and in _count and _sum."""
    metrics = Metrics()
    now = [100.0]
    monkeypatch.setattr("tether.metrics.time.perf_counter", lambda: now[0])

    async def three_ms(request: Any) -> Any:
        now[0] += 0.003
        return request

    await serve(three_ms, metrics)
    bucket = "tether_server_call_seconds_bucket"
    assert value(metrics, bucket, le="0.0025", **SERVER) == 0
    assert value(metrics, bucket, le="0.005", **SERVER) == 1
    assert value(metrics, bucket, le="10.0", **SERVER) == 1
    assert value(metrics, bucket, le="+Inf", **SERVER) == 1
    assert value(metrics, "tether_server_call_seconds_count", **SERVER) == 1
    assert value(metrics, "tether_server_call_seconds_sum", **SERVER) == pytest.approx(0.003)
    assert value(metrics, "tether_server_calls_total", code="OK", **SERVER) == 1


async def test_a_call_slower_than_every_bound_counts_only_in_inf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = Metrics()
    now = [100.0]
    monkeypatch.setattr("tether.metrics.time.perf_counter", lambda: now[0])

    async def slow(request: Any) -> Any:
        now[0] += 30.0
        return request

    await serve(slow, metrics)
    bucket = "tether_server_call_seconds_bucket"
    assert value(metrics, bucket, le="10.0", **SERVER) == 0
    assert value(metrics, bucket, le="+Inf", **SERVER) == 1
