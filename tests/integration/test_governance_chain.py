"""The default client chain end to end through app.client: breaker, typed fallback, isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.echo_service import build_app

import tether
from tether.fallback import degraded
from tether.registry import MemoryRegistry
from tether.testing import loopback_config, running

Req = echo_pb2.SayRequest
CLIENT = {
    "breaker": {"fail_max": 3, "reset_timeout_seconds": 30},
    "fallback_codes": ["INTERNAL", "UNAVAILABLE"],
    "retry": {"max_attempts": 1},
}


@pytest.fixture
async def caller() -> AsyncIterator[tether.App]:
    """An echo service, and a caller app with a fallback for Echo/Say; one shared registry."""
    registry = MemoryRegistry()
    echo = build_app(loopback_config("echo", registry={"backend": "memory"}), registry=registry)
    app = tether.App(loopback_config("caller", client=CLIENT), registry=registry)

    @app.fallback("echo.v1.Echo/Say")
    def cached_say(request: echo_pb2.SayRequest, error: tether.StatusError) -> echo_pb2.SayReply:
        return echo_pb2.SayReply(text=f"cached {request.text}", seen={"why": error.code.name})

    async with running(echo), running(app):
        yield app


async def test_tripped_breaker_serves_the_typed_fallback(caller: tether.App) -> None:
    """Failures open Say's breaker; callers then get SayReply from the fallback, marked degraded."""
    echo = caller.client("echo", echo_pb2_grpc.EchoStub)
    for _ in range(3):  # each failure is answered by the fallback, and counted by the breaker
        call = echo.Say(Req(text="a", fail="boom"))
        reply = await call
        assert reply.text == "cached a" and reply.seen["why"] == "INTERNAL"
        assert await degraded(call) == "INTERNAL"
    call = echo.Say(Req(text="b"))  # would succeed, but the breaker is open now
    reply = await call
    assert isinstance(reply, echo_pb2.SayReply)
    assert reply.text == "cached b"
    assert await degraded(call) == "UNAVAILABLE"


async def test_a_sibling_method_keeps_working_while_one_breaker_is_open(caller: tether.App) -> None:
    """Hold's failures open Hold's breaker only; Say on the same service still succeeds."""
    echo = caller.client("echo", echo_pb2_grpc.EchoStub)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo.Hold(Req(fail="boom"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo.Hold(Req(text="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # open: refused locally, no fallback
    assert "circuit breaker open for echo.v1.Echo/Hold" in (err.value.details() or "")
    call = echo.Say(Req(text="fine"))
    assert (await call).text == "fine"
    assert await degraded(call) is None


async def test_without_a_fallback_the_original_status_reaches_the_caller(
    caller: tether.App,
) -> None:
    """A method with no fallback fails with the dependency's own status."""
    echo = caller.client("echo", echo_pb2_grpc.EchoStub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo.Hold(Req(fail="not-found"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_probes_skip_the_chain() -> None:
    """Probes of a server not up yet never open a breaker; service calls do (fail_max 5)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tether.testing.etcd import _free_ports

    [port] = _free_ports(1, taken=set())  # nothing listens there
    async with tether.dial(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(8):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert "circuit breaker" not in (err.value.details() or "")
        echo = echo_pb2_grpc.EchoStub(channel)
        details = []
        for _ in range(6):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo.Say(Req(text="x"), timeout=1)
            details.append(err.value.details() or "")
        assert "circuit breaker open for echo.v1.Echo/Say" in details[-1]
