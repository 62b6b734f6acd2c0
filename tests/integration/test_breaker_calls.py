"""The breaker middleware on a real Echo server over loopback: concurrency, isolation, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.echo_service import EchoServicer, build_app

import tether
from tether.breaker import BreakerMiddleware, breaker
from tether.config import ClientConfig
from tether.testing import loopback_config, running

Req = echo_pb2.SayRequest
SERVICE = "echo.v1.Echo"
WAIT = 10.0  # bound on every call here; a healthy run needs a fraction of it
HOLD = 0.2  # seconds each slow call spends in the server


class Clock:
    """A fake monotonic clock for the breakers, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    """A stub whose channel runs only the breaker middleware, and the server it calls."""

    stub: Any
    servicer: EchoServicer
    guard: BreakerMiddleware

    def states(self) -> dict[str, str]:
        return self.guard.breakers.states()


@contextlib.asynccontextmanager
async def echo_through_breaker(
    clock: Clock | None = None, **breaker_config: Any
) -> AsyncIterator[Rig]:
    """Serve Echo on loopback and dial it through a breaker configured by ``breaker_config``."""
    servicer = EchoServicer("a")
    config = ClientConfig(breaker=breaker_config)
    guard = breaker(config.resolver(SERVICE), service=SERVICE, clock=clock or Clock())
    async with (
        running(build_app(loopback_config("echo"), servicer), grace=1) as app,
        tether.dial(app.target, middleware=[guard]) as channel,
    ):
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Say(Req(text="warm"), timeout=WAIT)  # connect before anything is timed
        yield Rig(stub, servicer, guard)


async def _requests(*texts: str) -> AsyncIterator[Any]:
    for text in texts:
        yield Req(text=text)


async def test_concurrent_calls_are_not_serialised() -> None:
    """Twenty concurrent slow calls through one breaker take about one call's time, not twenty."""
    async with echo_through_breaker() as rig:
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = await asyncio.gather(
            *(rig.stub.Say(Req(text=str(i), fail=f"slow:{HOLD}"), timeout=WAIT) for i in range(20))
        )
        took = loop.time() - started
    assert [r.text for r in replies] == [str(i) for i in range(20)]
    assert took < 5 * HOLD, f"20 calls of {HOLD} s took {took:.2f} s: the breaker serialises"
    assert rig.states() == {"echo.v1.Echo/Say": "closed"}


async def test_failing_method_opens_while_its_sibling_keeps_working() -> None:
    """INTERNAL answers open Say's breaker; Join and Split on the same service still work."""
    async with echo_through_breaker(fail_max=3) as rig:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rig.stub.Say(Req(text="x", fail="boom"), timeout=WAIT)
            assert err.value.code() == grpc.StatusCode.INTERNAL
        reached = rig.servicer.says
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.stub.Say(Req(text="fine now"), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == (
            "circuit breaker open for echo.v1.Echo/Say; next probe in 10.0 s"
        )
        assert rig.servicer.says == reached  # refused locally: nothing reached the server
        assert (await rig.stub.Join(_requests("still", "up"), timeout=WAIT)).text == "still up"
        assert [r.text async for r in rig.stub.Split(Req(text="a b"), timeout=WAIT)] == ["a", "b"]
        assert rig.states() == {
            "echo.v1.Echo/Say": "open",
            "echo.v1.Echo/Join": "closed",
            "echo.v1.Echo/Split": "closed",
        }


async def test_call_slower_than_its_deadline_counts_as_failure() -> None:
    """DEADLINE_EXCEEDED on a call that outlived its deadline opens the breaker."""
    async with echo_through_breaker(fail_max=1) as rig:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.stub.Say(Req(text="x", fail="slow:5"), timeout=HOLD)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert rig.states() == {"echo.v1.Echo/Say": "open"}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.stub.Say(Req(text="x"), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_probe_closes_the_breaker_once_the_dependency_recovers() -> None:
    """After reset_timeout one probe goes to the server; its success closes the breaker."""
    clock = Clock()
    async with echo_through_breaker(clock, fail_max=1) as rig:
        with pytest.raises(grpc.aio.AioRpcError):
            await rig.stub.Say(Req(text="x", fail="boom"), timeout=WAIT)
        clock.now += 10
        assert (await rig.stub.Say(Req(text="back"), timeout=WAIT)).text == "back"
        assert rig.states() == {"echo.v1.Echo/Say": "closed"}
