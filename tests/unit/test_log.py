"""Logging set-up: JSON lines with process and call fields, console format, level filtering."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator

import pytest
import structlog

from tether import CallContext, MethodName, Side, configure_logging, get_logger, use_call

CALL = CallContext(method=MethodName.parse("/shop.v1.Orders/Place"), side=Side.SERVER)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _configure(level: str = "info", fmt: str = "json") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt, static={"service": "orders", "instance_id": "i-1"}, stream=stream)
    return stream


def test_json_line_carries_service_instance_and_call() -> None:
    """A line written inside a call has the process fields and the call's method and side."""
    stream = _configure()
    with use_call(CALL):
        get_logger("orders").info("placed", order=7)
    [line] = _json_lines(stream)
    assert line["event"] == "placed"
    assert line["order"] == 7
    assert line["service"] == "orders"
    assert line["instance_id"] == "i-1"
    assert line["method"] == "shop.v1.Orders/Place"
    assert line["side"] == "server"
    assert line["logger_name"] == "orders"
    assert line["level"] == "info"
    assert "timestamp" in line


def test_line_outside_a_call_has_no_call_fields() -> None:
    """Outside any call and span, no call or trace fields are invented."""
    stream = _configure()
    get_logger().info("boot")
    [line] = _json_lines(stream)
    assert not {"method", "side", "trace_id", "span_id"} & set(line)
    assert line["service"] == "orders"


async def test_call_fields_follow_tasks_and_threads() -> None:
    """Lines from a task or a to_thread worker started inside the call carry the call."""
    stream = _configure()
    log = get_logger()

    async def in_task() -> None:
        log.info("from task")

    with use_call(CALL):
        await asyncio.create_task(in_task())
        await asyncio.to_thread(log.info, "from thread")
    lines = _json_lines(stream)
    assert [line["method"] for line in lines] == ["shop.v1.Orders/Place"] * 2


def test_levels_below_configured_are_dropped() -> None:
    """With level warning, info and debug lines are not written."""
    stream = _configure(level="warning")
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    assert [line["event"] for line in _json_lines(stream)] == ["w"]


def test_exception_is_rendered_as_structured_traceback() -> None:
    """exc_info becomes a structured exception field in JSON, not a lost object."""
    stream = _configure()
    try:
        raise ValueError("bad")
    except ValueError as exc:
        get_logger().error("failed", exc_info=exc)
    [line] = _json_lines(stream)
    assert "exception" in line
    assert "ValueError" in json.dumps(line["exception"])


def test_console_format_is_readable_text() -> None:
    """Console format writes one human line, not JSON."""
    stream = _configure(fmt="console")
    with use_call(CALL):
        get_logger().info("placed")
    text = stream.getvalue()
    assert "placed" in text
    assert "method=shop.v1.Orders/Place" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
