"""structlog set up by the framework: JSON lines in production, readable console in development."""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import grpc
import orjson
import structlog
from opentelemetry.trace import get_current_span

from tether.context import Side, current_call

try:  # structlog's settings, read only (see _Logger); private, so a rename falls back below
    from structlog._config import _CONFIG as _STRUCTLOG
except ImportError:  # pragma: no cover - a structlog that moved them
    _STRUCTLOG = None  # type: ignore[assignment]

__all__ = ["REDACTED", "add_call_context", "configure_logging", "get_logger", "redact_sensitive"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


#: What a sensitive value is replaced with in a log line.
REDACTED = "[redacted]"
# Substrings of a (lower-cased, '-' as '_') key that mark its value as secret.
_SENSITIVE = (
    "authorization",
    "cookie",
    "password",
    "passwd",
    "token",
    "secret",
    "api_key",
    "apikey",
)
# Longest string value written as it is; longer ones are cut, so no payload is logged whole.
_MAX_VALUE = 1024
_DEPTH = 4
# Sequences of values, metadata pairs among them, redacted item by item. grpc.aio's Metadata
# (what a call's initial_metadata() and trailing_metadata() return) is neither a tuple nor a
# mapping, and would otherwise be written whole, through its repr.
_SEQUENCES = (list, tuple, set, frozenset, grpc.aio.Metadata)
# Field values that _scrub looks inside (a string is only cut, in place).
_SCRUBBED = (Mapping, bytes, *_SEQUENCES)
# Fields later processors turn into text themselves (a traceback is not user data).
_RENDERED_LATER = frozenset({"exc_info", "stack_info"})
# Tracebacks name files, lines and functions, never the frames' local variables: those hold
# passwords, tokens, keys and whole requests, and structlog (like rich) shows them by default.
_JSON_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _is_sensitive(key: object) -> bool:
    return isinstance(key, str) and _sensitive_name(key)


# Every line's every key is checked, and keys come mostly from code: remembering the answer
# makes redaction about four times cheaper. Bounded, as nested mappings may bring data's keys.
@functools.lru_cache(maxsize=4096)
def _sensitive_name(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    return any(marker in lowered for marker in _SENSITIVE)


def _scrub(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with sensitive entries redacted and long strings cut."""
    if isinstance(value, str):
        return value if len(value) <= _MAX_VALUE else value[:_MAX_VALUE] + "...[cut]"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if depth >= _DEPTH:
        return value if isinstance(value, int | float | bool) or value is None else "[nested]"
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_sensitive(k) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, _SEQUENCES):
        # Metadata is a sequence of (key, value) pairs: redact a pair by its key.
        return [
            (item[0], REDACTED)
            if isinstance(item, tuple) and len(item) == 2 and _is_sensitive(item[0])
            else _scrub(item, depth + 1)
            for item in value
        ]
    return value


def redact_sensitive(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Processor: redact secrets (authorization, cookies, passwords, tokens, API keys) by key,
    in fields and in nested mappings and metadata pairs; cut long strings and bytes."""
    for key, value in event_dict.items():
        if key in _RENDERED_LATER:
            continue
        if _is_sensitive(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            if len(value) > _MAX_VALUE:
                event_dict[key] = _scrub(value)
        elif isinstance(value, _SCRUBBED):
            event_dict[key] = _scrub(value)
    return event_dict


def add_call_context(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Processor: add the current trace and call, so no handler has to.

    ``trace_id`` and ``span_id`` come from the OpenTelemetry context (the served call's span,
    or the outbound call's inside a client chain, or a span of your own). ``method``
    (``package.Service/Method``) is always the call this process serves; inside a client
    chain, ``rpc`` is the outbound call's method (``method`` is then the served call it is
    made for, if any), and ``side`` says which chain wrote the line (``server`` or
    ``client``). Fields the line already has are kept.
    """
    span_context = get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    call = current_call()
    if call is None:
        return event_dict
    if call.side is Side.SERVER:
        event_dict.setdefault("method", call.method.path)
    else:
        served = call.parent  # the inbound call this one is made for; None outside any
        if served is not None:
            event_dict.setdefault("method", served.method.path)
        event_dict.setdefault("rpc", call.method.path)
    event_dict.setdefault("side", call.side.value)
    return event_dict


class _StaticFields:
    """Processor adding fields fixed for the process (service name, instance id)."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = dict(fields)

    def __call__(self, _: Any, __: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
        for key, value in self._fields.items():
            event_dict.setdefault(key, value)
        return event_dict


def _orjson_bytes(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or repr)


def _orjson_text(obj: Any, default: Any = None) -> str:
    return _orjson_bytes(obj, default).decode()


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    *,
    static: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the process.

    Args:
        level: lowest level written (``debug`` ... ``critical``); a line below it reaches
            no processor (through :func:`get_logger`, it costs a check and a no-op call).
        fmt: ``json`` for one JSON object per line, ``console`` for people.
        static: fields added to every line (``service``, ``instance_id``).
        stream: where lines go; standard output by default.
    """
    out = stream if stream is not None else sys.stdout
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_call_context,
        _StaticFields(static or {}),
        redact_sensitive,
    ]
    if fmt == "console":
        processors.append(
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_console_tracebacks())
        )
        factory: Any = structlog.WriteLoggerFactory(file=out)
    else:
        processors.append(_JSON_TRACEBACKS)
        binary: Any = getattr(out, "buffer", None)
        if binary is not None:  # a real file: orjson's bytes go straight to it
            processors.append(structlog.processors.JSONRenderer(serializer=_orjson_bytes))
            factory = structlog.BytesLoggerFactory(file=binary)
        else:  # a text-only stream (StringIO, some wrappers)
            processors.append(structlog.processors.JSONRenderer(serializer=_orjson_text))
            factory = structlog.WriteLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,  # get_logger's loggers cache until reconfigured
    )
    # Libraries that log through the standard library (grpc, etcd3) stay quiet below WARNING.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr)


def _console_tracebacks() -> Any:
    """A traceback formatter for people that shows no local variables (see _JSON_TRACEBACKS)."""
    if importlib.util.find_spec("rich") is not None:
        return structlog.dev.RichTracebackFormatter(show_locals=False)
    return structlog.dev.plain_traceback


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``name`` becomes the ``logger_name`` field.

    The logger is lazy: it picks up :func:`configure_logging`'s settings when first used, and
    again whenever structlog is configured anew, so module-level loggers are safe. Between
    two configurations it reuses what it assembled, so a disabled level returns before any
    processor runs.
    """
    values = {} if name is None else {"logger_name": name}
    if _STRUCTLOG is None:  # pragma: no cover - structlog's own proxy: right, only slower
        return structlog.get_logger(**values)
    return _Logger(values)


class _Logger:
    """structlog's lazy proxy, reusing what it assembled until structlog is configured again.

    structlog's own proxy assembles a bound logger (a logger from the factory, a context, a
    wrapper) on every call, which costs a disabled ``debug`` about 20 times the filtering
    logger's no-op; its ``cache_logger_on_first_use`` keeps the first one for good, so a
    module-level logger used before :func:`configure_logging` (or across tests that configure
    again, or inside ``structlog.testing.capture_logs``) would keep stale settings. This one
    keeps its bound logger while structlog's settings are the very objects it was assembled
    from: every ``structlog.configure`` replaces at least one of them, and ``capture_logs``
    edits the processor list in place, which the bound logger shares.
    """

    __slots__ = ("_bound", "_context", "_factory", "_processors", "_values", "_wrapper")

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values
        self._bound: Any = None
        self._processors: Any = None
        self._wrapper: Any = None
        self._factory: Any = None
        self._context: Any = None

    def _logger(self) -> Any:
        settings = _STRUCTLOG
        if (
            self._processors is settings.default_processors
            and self._wrapper is settings.default_wrapper_class
            and self._factory is settings.logger_factory
            and self._context is settings.default_context_class
        ):
            return self._bound
        processors = settings.default_processors
        wrapper = settings.default_wrapper_class
        factory = settings.logger_factory
        context = settings.default_context_class
        bound = wrapper(factory(), processors=processors, context=context(self._values))
        # The logger first, its stamp after: a thread reading in between assembles again.
        self._bound = bound
        self._processors, self._wrapper, self._factory, self._context = (
            processors,
            wrapper,
            factory,
            context,
        )
        return bound

    # The level methods are properties handing out the bound logger's own method, so the
    # call's arguments go to it directly (a disabled level's is a no-op); and they are spelled
    # out, since a lookup that reaches __getattr__ costs more.
    @property
    def debug(self) -> Any:
        return self._logger().debug

    @property
    def info(self) -> Any:
        return self._logger().info

    @property
    def warning(self) -> Any:
        return self._logger().warning

    @property
    def error(self) -> Any:
        return self._logger().error

    @property
    def exception(self) -> Any:
        return self._logger().exception

    @property
    def critical(self) -> Any:
        return self._logger().critical

    def __getattr__(self, name: str) -> Any:
        # bind, new, unbind, log, msg, the async variants...: the current logger's own.
        return getattr(self._logger(), name)

    def __repr__(self) -> str:
        return f"<tether logger {self._values!r}>"
