"""Admission control and deadline enforcement on a real server over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.echo_service import EchoServicer

import tether
from tether import current_call, recover, use_call
from tether.admission import admit
from tether.deadline import enforce_deadline
from tether.middleware import Handler
from tether.testing import eventually, loopback_config, running

Req = echo_pb2.SayRequest
WAIT = 10.0  # bound on every wait here; a healthy run needs a fraction of it
BUDGET_KEY = "x-server-budget"


def spend_budget(handler: Handler) -> Handler:
    """Test middleware: ``x-server-budget: <seconds>`` sets the deadline the chain sees.

    It stands in for time lost before the chain runs (a queue, a slow hop). Waiting for the
    real deadline to pass cannot produce an expired arrival: grpc cancels a call whose deadline
    passes while it waits. A budget shorter than the caller's timeout also shows that the
    chain, not grpc, cancelled a slow handler.
    """

    async def budgeted(request: Any) -> Any:
        call = current_call()
        budget = call.header(BUDGET_KEY) if call is not None else None
        if call is None or budget is None:
            return await handler(request)
        with use_call(call.replace(deadline=time.monotonic() + float(budget))):
            return await handler(request)

    return budgeted


@contextlib.asynccontextmanager
async def serving(
    servicer: EchoServicer, admission: Mapping[str, Any]
) -> AsyncIterator[echo_pb2_grpc.EchoStub]:
    """Echo behind [recover, spend_budget, enforce_deadline, admit]; yields a stub to it."""
    config = loopback_config("echo", server={"admission": admission})
    app = tether.App(
        config,
        middleware=[recover, spend_budget, enforce_deadline, admit(config.server.admission)],
    )
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)
    try:
        async with running(app, grace=1), tether.dial(app.target, middleware=[]) as channel:
            yield echo_pb2_grpc.EchoStub(channel)
    finally:
        servicer.release.set()  # never leave a held call behind


async def health_of(target: str, service: str) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
        return reply.status


async def test_a_full_method_refuses_fast_while_held_calls_finish() -> None:
    """At max_concurrent the next call gets RESOURCE_EXHAUSTED with RetryInfo at once."""
    servicer = EchoServicer()
    limits = {"methods": {"echo.v1.Echo/Hold": {"max_concurrent": 2, "retry_after_seconds": 0.5}}}
    async with serving(servicer, limits) as stub:
        held = [
            asyncio.ensure_future(stub.Hold(Req(text=f"held-{n}"), timeout=WAIT)) for n in (0, 1)
        ]
        await eventually(lambda: servicer.holding == 2, within=WAIT, message="two calls held")

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Hold(Req(text="third"), timeout=WAIT)
        assert time.monotonic() - started < 1.0, "the refusal was not fast"
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "echo.v1.Echo/Hold" in (refused.value.details() or "")
        status = rpc_status.from_call(refused.value)
        assert status is not None, "the refusal carries no rich status"
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info)
        assert info.retry_delay.ToNanoseconds() == 500_000_000
        assert servicer.holding == 2

        assert (await stub.Say(Req(text="other method"), timeout=WAIT)).text == "other method"
        servicer.release.set()
        replies = await asyncio.gather(*held)
        assert [r.text for r in replies] == ["held-0", "held-1"]
        assert (await stub.Hold(Req(text="after"), timeout=WAIT)).text == "after"


async def test_health_stays_serving_while_a_method_is_full() -> None:
    """Health checks bypass the chain: a saturated method leaves the instance SERVING."""
    servicer = EchoServicer()
    config = loopback_config(
        "echo", server={"admission": {"max_concurrent": 1, "rate": 0.001, "burst": 1}}
    )
    app = tether.App(config, middleware=[recover, enforce_deadline, admit(config.server.admission)])
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)
    async with running(app, grace=1), tether.dial(app.target, middleware=[]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        held = asyncio.ensure_future(stub.Hold(Req(text="held"), timeout=WAIT))
        try:
            await eventually(lambda: servicer.holding == 1, within=WAIT, message="a call held")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Hold(Req(text="refused"), timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for service in ("", "echo.v1.Echo"):
                for _ in range(5):  # more checks than any limit above would allow
                    assert (
                        await health_of(app.target, service)
                        == health_pb2.HealthCheckResponse.SERVING
                    )
        finally:
            servicer.release.set()
        assert (await held).text == "held"


async def test_a_call_expired_on_arrival_never_runs() -> None:
    """A call whose deadline passed before the chain ran answers DEADLINE_EXCEEDED, unrun."""
    servicer = EchoServicer()
    async with serving(servicer, {}) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(text="late"), timeout=WAIT, metadata=((BUDGET_KEY, "-0.001"),))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "before the call started" in (err.value.details() or "")
        assert servicer.says == 0
        assert (await stub.Say(Req(text="on time"), timeout=WAIT)).text == "on time"
        assert servicer.says == 1


async def test_a_handler_past_the_chains_deadline_is_cancelled() -> None:
    """The chain cancels a handler at its deadline and answers DEADLINE_EXCEEDED itself."""
    servicer = EchoServicer()
    limits = {"methods": {"echo.v1.Echo/Say": {"max_concurrent": 1}}}
    async with serving(servicer, limits) as stub:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(fail="slow:60"), timeout=WAIT, metadata=((BUDGET_KEY, "0.2"),))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "while the call ran" in (err.value.details() or ""), "grpc, not the chain, ended it"
        assert time.monotonic() - started < WAIT / 2
        await eventually(lambda: servicer.cancelled == 1, within=WAIT, message="handler cancelled")
        # The cancelled call freed its admission slot.
        assert (await stub.Say(Req(text="next"), timeout=WAIT)).text == "next"


async def test_a_handler_past_the_callers_deadline_is_cancelled() -> None:
    """A slow handler is cancelled when the caller's own deadline passes."""
    servicer = EchoServicer()
    async with serving(servicer, {"methods": {"echo.v1.Echo/Say": {"max_concurrent": 1}}}) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(fail="slow:60"), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: servicer.cancelled == 1, within=WAIT, message="handler cancelled")
        assert (await stub.Say(Req(text="next"), timeout=WAIT)).text == "next"
