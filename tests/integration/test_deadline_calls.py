"""Deadlines across hops: every outbound call has one, and never more than the inbound call's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc

import tether
from tether.config import ClientConfig
from tether.testing import loopback_config, running

Req = echo_pb2.SayRequest
# grpc-core rounds the grpc-timeout header up to its wire units; a server may see a little
# more than the caller set (measured: +9 ms of 2 s, +99 ms of 30 s).
WIRE_ROUNDING_MS = 25


def sent_at_most(timeout_ms: float) -> float:
    return timeout_ms * 1.01 + WIRE_ROUNDING_MS


def remaining_ms() -> str:
    call = tether.current_call()
    left = None if call is None else call.time_remaining()
    return "none" if left is None else f"{left * 1000:.3f}"


class Back(echo_pb2_grpc.EchoServicer):
    """The second hop: reports the time it was given."""

    def __init__(self) -> None:
        self.calls = 0

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls += 1
        return echo_pb2.SayReply(text=request.text, seen={"back": remaining_ms()})


class Front(echo_pb2_grpc.EchoServicer):
    """The first hop: calls the second through the default client chain."""

    def __init__(self, back: echo_pb2_grpc.EchoStub) -> None:
        self.back = back

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        front = remaining_ms()
        try:
            reply = await self.back.Say(Req(text=request.text))  # no timeout: inherited
        except grpc.aio.AioRpcError as exc:
            raise tether.DeadlineExceeded(f"back: {exc.details()}") from None
        return echo_pb2.SayReply(text=reply.text, seen={"front": front, **reply.seen})


@pytest.fixture
async def hops() -> AsyncIterator[tuple[echo_pb2_grpc.EchoStub, Back]]:
    back_servicer = Back()
    back_app = tether.App(loopback_config("back"))
    back_app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, back_servicer)
    async with running(back_app), tether.dial(back_app.target) as to_back:
        front_app = tether.App(loopback_config("front"))
        front_app.add_servicer(
            echo_pb2_grpc.add_EchoServicer_to_server, Front(echo_pb2_grpc.EchoStub(to_back))
        )
        async with running(front_app), tether.dial(front_app.target) as to_front:
            yield echo_pb2_grpc.EchoStub(to_front), back_servicer


async def test_downstream_never_gets_more_time_than_upstream(
    hops: tuple[echo_pb2_grpc.EchoStub, Back],
) -> None:
    """Two hops: the second hop's remaining time is below the first hop's, by the margin."""
    front, _ = hops
    for timeout in (0.5, 2.0, 30.0):
        reply = await front.Say(Req(text="x"), timeout=timeout)
        front_ms, back_ms = float(reply.seen["front"]), float(reply.seen["back"])
        assert back_ms < front_ms <= sent_at_most(timeout * 1000), reply.seen
        assert front_ms - back_ms >= 50 - WIRE_ROUNDING_MS, "the 50 ms margin was not kept"


async def test_spent_inbound_deadline_is_not_sent_downstream(
    hops: tuple[echo_pb2_grpc.EchoStub, Back],
) -> None:
    """With less inbound time left than the margin, the outbound call is refused locally."""
    front, back = hops
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await front.Say(Req(text="x"), timeout=0.04)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert back.calls == 0, "a call with no time left reached the second hop"


async def test_per_method_default_timeout_from_config() -> None:
    """A call without a timeout gets its method's configured default, not the global one."""
    back_servicer = Back()
    app = tether.App(loopback_config("back"))
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, back_servicer)
    config = ClientConfig(
        timeout_seconds=30,
        services={"back": {"methods": {"echo.v1.Echo/Say": {"timeout_seconds": 0.75}}}},
    )
    async with running(app), tether.dial(app.target, service="back", config=config) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(Req(text="x"))
    assert 0 < float(reply.seen["back"]) <= sent_at_most(750)
