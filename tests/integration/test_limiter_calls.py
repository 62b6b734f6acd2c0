"""The client rate limiter on a real server over loopback: excess calls never leave the client."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.echo_service import EchoServicer, build_app

import tether
from tether.config_policies import LimiterConfig
from tether.limiter import rate_limit
from tether.testing import loopback_config, running

WAIT = 10.0  # bound on every call here; a healthy run needs a fraction of it


async def test_a_burst_over_the_limit_is_refused_locally() -> None:
    """Calls beyond burst + rate * elapsed fail RESOURCE_EXHAUSTED; the server sees none of them."""
    rate, burst, sent = 1.0, 3, 20
    servicer = EchoServicer()
    limiter = rate_limit(LimiterConfig(rate=rate, burst=burst), service="echo")
    async with (
        running(build_app(loopback_config("echo"), servicer)) as app,
        tether.dial(app.target, middleware=[limiter]) as channel,
    ):
        stub = echo_pb2_grpc.EchoStub(channel)

        async def say(n: int) -> echo_pb2.SayReply:
            reply: echo_pb2.SayReply = await stub.Say(
                echo_pb2.SayRequest(text=f"{n}"), timeout=WAIT
            )
            return reply

        started = time.monotonic()
        outcomes = await asyncio.gather(*(say(n) for n in range(sent)), return_exceptions=True)
        elapsed = time.monotonic() - started

    replies = [o for o in outcomes if isinstance(o, echo_pb2.SayReply)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(replies) + len(refused) == sent, [o for o in outcomes if isinstance(o, Exception)]
    assert burst <= len(replies) <= burst + int(rate * elapsed), (len(replies), elapsed)
    assert servicer.says == len(replies), "a refused call reached the server"
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'echo'" in (err.details() or "")
        status = rpc_status.from_call(err)
        assert status is not None, "the refusal carries no rich status"
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info)
        assert 0 < info.retry_delay.ToNanoseconds() <= 1e9 / rate


async def test_a_refused_call_is_answered_without_a_server() -> None:
    """With the bucket empty the refusal comes even when nothing listens at the target."""
    limiter = rate_limit(LimiterConfig(rate=0.001, burst=1), service="nowhere")
    async with tether.dial("127.0.0.1:1", middleware=[limiter]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as first:
            await stub.Say(echo_pb2.SayRequest(text="x"), timeout=WAIT)  # takes the one token
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE  # it was really sent
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await stub.Say(echo_pb2.SayRequest(text="y"), timeout=WAIT)
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'nowhere'" in (second.value.details() or "")
