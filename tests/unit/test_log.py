"""Logging set-up: JSON lines with process and call fields, console format, level filtering,
loggers that follow reconfiguration."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

import tether
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


def test_client_chain_line_names_the_served_method_and_the_outbound_rpc() -> None:
    """Inside a client chain, method stays the served call's; the outbound one is rpc."""
    stream = _configure()
    outbound = CallContext(
        method=MethodName.parse("/users.v1.Users/Get"), side=Side.CLIENT, parent=CALL
    )
    detached = outbound.replace(parent=None)
    with use_call(outbound):
        get_logger().info("inside")
    with use_call(detached):
        get_logger().info("no served call")
    inside, alone = _json_lines(stream)
    assert (inside["method"], inside["rpc"], inside["side"]) == (
        "shop.v1.Orders/Place",
        "users.v1.Users/Get",
        "client",
    )
    assert (alone["rpc"], alone["side"]) == ("users.v1.Users/Get", "client")
    assert "method" not in alone


class _Counting:
    """A processor that counts the lines reaching it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, _: object, __: str, event_dict: dict[str, object]) -> dict[str, object]:
        self.seen.append(str(event_dict["event"]))
        return event_dict


def test_a_disabled_level_reaches_no_processor() -> None:
    """Below the configured level a line stops before the first processor, on a logger made
    before configuration and already used, as module-level loggers are."""
    log = get_logger("early")
    log.info("before configure")  # assembled under structlog's defaults
    _configure(level="warning")
    counting = _Counting()
    structlog.get_config()["processors"].insert(0, counting)  # the live list, as capture_logs
    for _ in range(3):
        log.debug("d")
        log.info("i")
        log.warning("w")
    assert counting.seen == ["w"] * 3


def test_a_logger_is_assembled_once_per_configuration() -> None:
    """Lines reuse the logger assembled for the current settings: no factory call per line."""
    stream = io.StringIO()
    made: list[object] = []

    def factory(*args: object) -> structlog.WriteLogger:
        made.append(args)
        return structlog.WriteLogger(stream)

    _configure()
    structlog.configure(logger_factory=factory)
    log = get_logger("reused")
    for n in range(5):
        log.info("line", n=n)
    assert len(made) == 1
    assert [line["n"] for line in _json_lines(stream)] == list(range(5))


def test_configuring_again_reaches_loggers_already_used() -> None:
    """A new level, stream or capture_logs applies to a logger that has written before."""
    log = get_logger("module")
    first = _configure(level="warning")
    log.info("dropped")
    log.warning("first")
    second = _configure(level="debug")
    log.debug("second")
    with capture_logs() as captured:
        log.info("captured")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    log.warning("dropped too")
    assert [line["event"] for line in _json_lines(first)] == ["first"]
    assert [line["event"] for line in _json_lines(second)] == ["second"]
    assert [entry["event"] for entry in captured] == ["captured"]


def test_framework_lines_leave_the_process_and_call_fields_alone() -> None:
    """No framework log call passes service, instance_id, method, side, trace_id or span_id:
    those describe the process and the call in scope (a dependency is `dependency` and its
    method `rpc`), and a keyword would override them."""
    reserved = {"service", "instance_id", "method", "side", "trace_id", "span_id"}
    package = Path(tether.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not _writes_a_line(node.func):
                continue
            for keyword in node.keywords:
                if keyword.arg in reserved:
                    found.append(f"{path.relative_to(package)}:{node.lineno} {keyword.arg}=")
    assert not found, found


def _writes_a_line(func: ast.expr) -> bool:
    """``_log.info(...)`` and the like, ``log(...)`` (a level chosen earlier), and the
    registry's ``_StateLog(...)``, whose keywords go on every line it writes."""
    if isinstance(func, ast.Attribute):
        return func.attr in {"debug", "info", "warning", "error", "exception", "critical"} and (
            isinstance(func.value, ast.Name) and func.value.id in {"_log", "log"}
        )
    return isinstance(func, ast.Name) and func.id in {"log", "_StateLog"}
