"""The access log: one line per call when asked, a warning for slow calls, never the request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs
from support.fakes import FakeClock

from tether.access_log import log_calls
from tether.config import LoggingConfig
from tether.context import CallContext, MethodName, Side, use_call
from tether.errors import NotFound

SAY = MethodName.parse("/echo.v1.Echo/Say")


def server_call(streaming: bool = False) -> CallContext:
    return CallContext(
        method=SAY, side=Side.SERVER, metadata=(("authorization", "Bearer x"),), deadline=None,
        peer="ipv4:127.0.0.1:5555", request_streaming=False, response_streaming=streaming,
    )  # fmt: skip


async def run(config: LoggingConfig, clock: FakeClock, outcome: Any, *, took: float) -> list[Any]:
    async def handler(request: Any) -> Any:
        clock.now += took
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with capture_logs() as logs, use_call(server_call()), contextlib.suppress(NotFound):
        await log_calls(config, clock=clock)(handler)("secret request")
    return logs


async def test_access_log_line_per_call() -> None:
    """With access_log on, a call logs method context, code, duration and peer, not the request."""
    logs = await run(LoggingConfig(access_log=True), FakeClock(), "ok", took=0.25)
    [line] = logs
    assert line["event"] == "call"
    assert line["code"] == "OK" and line["duration_ms"] == 250.0
    assert line["peer"] == "ipv4:127.0.0.1:5555"
    assert "secret request" not in str(line) and "Bearer" not in str(line)


async def test_failed_call_logs_its_code() -> None:
    """A StatusError is logged with its code and still reaches the caller."""
    logs = await run(LoggingConfig(access_log=True), FakeClock(), NotFound("x"), took=0.01)
    assert [line["code"] for line in logs] == ["NOT_FOUND"]


async def test_slow_call_warning_only_above_the_threshold() -> None:
    """Without access_log, only calls slower than slow_call_seconds are logged, as warnings."""
    config = LoggingConfig(slow_call_seconds=0.5)
    assert await run(config, FakeClock(), "ok", took=0.4) == []
    [line] = await run(config, FakeClock(), "ok", took=0.6)
    assert line["event"] == "slow call" and line["log_level"] == "warning"
    assert line["threshold_ms"] == 500.0


async def test_off_means_not_in_the_chain() -> None:
    """Neither setting on: the middleware returns the handler itself."""

    async def handler(request: Any) -> Any:
        return request

    middleware = log_calls(LoggingConfig(access_log=False, slow_call_seconds=None))
    assert middleware(handler) is handler


async def test_stream_is_logged_when_it_ends() -> None:
    """A response stream is logged once, after its last message."""
    clock = FakeClock()

    async def replies() -> AsyncIterator[str]:
        yield "a"
        clock.now += 2
        yield "b"

    async def handler(request: Any) -> Any:
        return replies()

    with capture_logs() as logs, use_call(server_call(streaming=True)):
        stream = await log_calls(LoggingConfig(access_log=True), clock=clock)(handler)(None)
        assert logs == []
        assert [item async for item in stream] == ["a", "b"]
    [line] = logs
    assert line["code"] == "OK" and line["duration_ms"] == 2000.0


@pytest.mark.parametrize("value", [0, -1])
def test_slow_threshold_must_be_positive(value: float) -> None:
    """slow_call_seconds is > 0 or null."""
    with pytest.raises(ValueError, match="greater than 0"):
        LoggingConfig(slow_call_seconds=value)
