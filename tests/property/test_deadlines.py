"""Timeouts of any value: every call gets a sane deadline or a clean local refusal.

``grpc-timeout`` itself is parsed by grpc-core before tether sees a call (tether reads only
``context.time_remaining()``), and grpc's Python client drops a ``grpc-timeout`` typed into
the metadata by hand (``test_inbound_metadata`` sends such junk). What a caller controls is
the timeout value; these tests send every kind: tiny, huge, negative, infinite, NaN.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served_echo import ServedEcho
from support.echo_service import build_app

import tether
from tether.config import ClientConfig
from tether.context import CallContext, MethodName, Side, current_call, use_call
from tether.deadline import MAX_TIMEOUT_SECONDS, bound_deadline
from tether.errors import DeadlineExceeded, InvalidArgument
from tether.testing import loopback_config, running

NOW = 1000.0
MARGIN = 0.05
METHOD = MethodName.parse("/users.v1.Users/GetUser")
SLOW = 0.02  # the served call takes this long (fail="slow:...")

any_seconds = st.floats(allow_nan=True, allow_infinity=True)
#: Timeouts from a microsecond to 30 years, spread evenly over the orders of magnitude.
log_seconds = st.floats(min_value=-6, max_value=9).map(lambda e: 10.0**e)


def deadline_sent(
    caller: float | None, parent_left: float | None, default: float, stream: bool
) -> float | None:
    """Run bound_deadline (fake clock at NOW) and return the deadline the next handler got."""
    parent = None
    if parent_left is not None:
        parent = CallContext(
            method=MethodName.parse("/front.v1.Front/Get"),
            side=Side.SERVER,
            deadline=NOW + parent_left,
        )
    ctx = CallContext(
        method=METHOD,
        side=Side.CLIENT,
        deadline=None if caller is None else NOW + caller,
        response_streaming=stream,
        parent=parent,
    )
    middleware = bound_deadline(
        ClientConfig(timeout_seconds=default).resolver("users"), margin=MARGIN, clock=lambda: NOW
    )

    async def handler(request: Any) -> Any:
        seen = current_call()
        assert seen is not None
        return seen.deadline

    async def run() -> float | None:
        with use_call(ctx):
            return await middleware(handler)(None)  # type: ignore[no-any-return]

    return asyncio.run(run())


@settings(max_examples=2000)
@given(
    caller=st.one_of(st.none(), any_seconds, log_seconds),
    parent_left=st.one_of(st.none(), st.floats(-10, 1e12), log_seconds),
    default=st.floats(0.001, 3600),
    stream=st.booleans(),
)
def test_every_outbound_call_gets_a_sane_deadline_or_a_local_refusal(
    caller: float | None, parent_left: float | None, default: float, stream: bool
) -> None:
    """Any caller timeout and inbound deadline: the deadline sent is finite, in the future, no
    later than the caller's, the inbound one's (less the margin) and MAX_TIMEOUT_SECONDS from
    now; or the call is refused locally: DEADLINE_EXCEEDED when either is already spent,
    INVALID_ARGUMENT for a NaN timeout; never another exception."""
    own = None if caller is None else NOW + caller
    cap = None if parent_left is None else NOW + parent_left - MARGIN
    spent = (own is not None and own <= NOW) or (cap is not None and cap <= NOW)
    try:
        sent = deadline_sent(caller, parent_left, default, stream)
    except InvalidArgument:
        assert caller is not None and math.isnan(caller)
        return
    except DeadlineExceeded:
        assert spent, "refused a call with time left"
        return
    assert not spent, "sent a call whose deadline was spent"
    assert caller is None or not math.isnan(caller)
    if sent is None:
        assert stream and caller is None and parent_left is None
        return
    assert NOW < sent <= NOW + MAX_TIMEOUT_SECONDS
    if own is not None:
        assert sent <= own
    if cap is not None:
        assert sent <= cap
    if caller is None and cap is None:
        assert sent == NOW + default


@pytest.fixture(scope="module")
def stub(served_echo: ServedEcho) -> Iterator[echo_pb2_grpc.EchoStub]:
    with grpc.insecure_channel(served_echo.target) as channel:
        yield echo_pb2_grpc.EchoStub(channel)


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(timeout=st.one_of(log_seconds, st.sampled_from([0.0, -1.0, math.inf, 1e300])))
def test_any_timeout_on_the_wire_ends_in_ok_or_deadline_exceeded(
    served_echo: ServedEcho, stub: echo_pb2_grpc.EchoStub, timeout: float
) -> None:
    """A call of SLOW seconds under any timeout grpc's client sends (as ``grpc-timeout``, in
    every unit it uses): OK when there was time, DEADLINE_EXCEEDED when there was not, and
    the server serves the next call."""
    try:
        stub.Say(echo_pb2.SayRequest(text="x", fail=f"slow:{SLOW}"), timeout=timeout)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    if 2 * SLOW < timeout <= 1e9:
        assert code is grpc.StatusCode.OK
    elif timeout < SLOW:
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # near SLOW; or past what grpc's client can represent, which it refuses itself
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert stub.Say(echo_pb2.SayRequest(text="next"), timeout=10).text == "next"


@pytest.fixture
async def echo() -> AsyncIterator[tether.App]:
    async with running(build_app(loopback_config("echo"))) as app:
        yield app


async def test_absurd_timeouts_never_open_the_breaker(echo: tether.App) -> None:
    """Through tether's client, timeouts grpc cannot represent (infinite, 1e300 s) get the
    longest deadline instead of grpc's instant DEADLINE_EXCEEDED, and NaN is refused locally:
    none of them counts against the dependency, so its breaker stays closed."""
    config = ClientConfig(breaker={"fail_max": 2})
    async with tether.dial(echo.target, config=config) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for timeout in (math.inf, 1e300, 1e18, 2.0**70) * 2:
            reply = await stub.Say(echo_pb2.SayRequest(text="far"), timeout=timeout)
            assert reply.seen["deadline"] == "yes"
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Say(echo_pb2.SayRequest(text="nan"), timeout=math.nan)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a number" in (refused.value.details() or "")
        reply = await stub.Say(echo_pb2.SayRequest(text="after"), timeout=5)
        assert reply.text == "after"
