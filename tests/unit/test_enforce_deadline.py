"""Tests for tether.deadline.enforce_deadline: expired calls never run, slow ones are cancelled."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tether import CallContext, MethodName, Side, use_call
from tether.deadline import enforce_deadline
from tether.errors import DeadlineExceeded

SAY = MethodName.parse("/echo.v1.Echo/Say")
BOUND = 5.0  # no test here should come near it; a hang fails instead of blocking the run


class Servicer:
    """Counts handler runs; `stall` never answers by itself and records its cancellation."""

    def __init__(self) -> None:
        self.runs = 0
        self.cancelled = False
        self.stream = object()

    async def answer(self, request: Any) -> Any:
        self.runs += 1
        return "ok"

    async def stall(self, request: Any) -> Any:
        self.runs += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def open_stream(self, request: Any) -> Any:
        self.runs += 1
        return self.stream


async def call(
    handler: Any, deadline: float | None, *, streaming: bool = False, request: Any = None
) -> Any:
    ctx = CallContext(method=SAY, side=Side.SERVER, deadline=deadline, response_streaming=streaming)
    async with asyncio.timeout(BOUND):
        with use_call(ctx):
            return await enforce_deadline(handler)(request)


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_call_expired_on_arrival_is_not_run(streaming: bool) -> None:
    """A deadline already passed answers DEADLINE_EXCEEDED without running the handler."""
    servicer = Servicer()
    with pytest.raises(DeadlineExceeded, match="before the call started"):
        await call(servicer.answer, time.monotonic() - 0.001, streaming=streaming)
    assert servicer.runs == 0


async def test_a_handler_running_past_its_deadline_is_cancelled() -> None:
    """At the deadline the handler is cancelled and the call answers DEADLINE_EXCEEDED."""
    servicer = Servicer()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="while the call ran"):
        await call(servicer.stall, started + 0.05)
    assert servicer.cancelled
    assert time.monotonic() - started >= 0.04  # not before the deadline (timer granularity)


async def test_a_call_within_its_deadline_answers() -> None:
    """A handler that finishes in time answers normally."""
    servicer = Servicer()
    assert await call(servicer.answer, time.monotonic() + 60) == "ok"
    assert await call(servicer.answer, None) == "ok"
    assert servicer.runs == 2


async def test_the_handlers_own_timeout_is_not_a_deadline() -> None:
    """A TimeoutError the handler raises itself passes through unchanged."""

    async def times_out(request: Any) -> Any:
        raise TimeoutError("an outbound wait of the handler's own")

    with pytest.raises(TimeoutError, match="handler's own"):
        await call(times_out, time.monotonic() + 60)


async def test_a_stream_in_time_is_returned_untouched() -> None:
    """A stream response gets the arrival check only; its stream is passed on as it is."""
    servicer = Servicer()
    assert await call(servicer.open_stream, time.monotonic() + 60, streaming=True) is (
        servicer.stream
    )


async def test_no_timer_when_the_transport_enforces_the_same_deadline() -> None:
    """grpc cancels a served call at the deadline its caller sent: the middleware arms no timer
    for it (a tightened one still gets the timer, as above)."""
    deadline = time.monotonic() + 0.01
    ctx = CallContext(method=SAY, side=Side.SERVER, deadline=deadline, transport_deadline=deadline)

    async def outlives(request: Any) -> Any:
        await asyncio.sleep(0.05)  # past the deadline: only a timer of ours could stop it
        return "finished"

    with use_call(ctx):
        assert await asyncio.wait_for(enforce_deadline(outlives)(None), BOUND) == "finished"
