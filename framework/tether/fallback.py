"""Fallbacks typed by the proto: the answer a client gives in place of a failed call; no gRPC here.

A fallback is declared per method, in code (a function from the request and the error to a
message of the method's output type) or in the proto::

    import "tether/v1/options.proto";

    rpc GetUser(GetUserRequest) returns (User) {
      option (tether.v1.fallback) = "name: \"unknown\" cached: true";
    }

A fallback declared in code wins over the proto's. :meth:`Fallbacks.check` compares every
declaration with the descriptor pool at start-up, so a fallback that would answer with the wrong
type (which the caller could not decode) never serves. The :func:`fallback` middleware answers
with it when the call is refused locally (an open breaker, a rate limiter) or fails with a status
the method's policy lists in ``fallback_codes``; the caller can tell from the
``tether-fallback`` trailer (:func:`degraded`), the log and the listeners.
"""

from __future__ import annotations

import inspect
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

from google.protobuf import descriptor, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from tether.config_policies import PolicyResolver
from tether.context import MethodName, current_call
from tether.errors import (
    BreakerOpen,
    ConfigError,
    ConfigProblem,
    RateLimited,
    RemoteError,
    StatusError,
)
from tether.log import get_logger
from tether.middleware import Handler, Middleware
from tether.v1 import options_pb2

__all__ = [
    "FALLBACK_LOG_EVERY",
    "FALLBACK_TRAILER",
    "Degradation",
    "Fallback",
    "FallbackFn",
    "FallbackListener",
    "FallbackSource",
    "Fallbacks",
    "collect_trailers",
    "degraded",
    "fallback",
]

_log = get_logger("tether.fallback")

#: Trailing metadata key of a call answered by a fallback; its value is the reason, the status
#: code name of the error the fallback replaced (``UNAVAILABLE`` for an open breaker too).
FALLBACK_TRAILER = "tether-fallback"

#: A fallback in code: ``fn(request, error)`` returns (or, when async, resolves to) a message of
#: the method's output type. For a client-streaming call the request is its request stream.
FallbackFn: TypeAlias = Callable[[Any, StatusError], Message | Awaitable[Message]]

#: Where a fallback was declared: a function, a message given in code, or the proto's option.
FallbackSource: TypeAlias = Literal["code", "static", "proto"]

_F = TypeVar("_F", bound=Callable[..., Any])

_CACHE_LIMIT = 4096
_MESSAGE_LIMIT = 200  # characters of an error message a log line keeps
_VALUE_LIMIT = 60  # characters of a declaration a refusal shows


@dataclass(frozen=True, slots=True)
class Degradation:
    """One call answered by a fallback, as listeners (metrics, tracing) receive it.

    Attributes:
        service: the dependency, as the client chain was built for it.
        method: ``package.Service/Method``.
        reason: the status code name of the replaced error, e.g. ``UNAVAILABLE``.
        error: the error the fallback replaced (``BreakerOpen``, ``RateLimited``, ...).
        source: ``code`` (a function), ``static`` (a message given in code) or ``proto``.
    """

    service: str
    method: str
    reason: str
    error: StatusError
    source: FallbackSource


#: Called once per call a fallback answered; must not block. Exceptions are logged and dropped.
FallbackListener: TypeAlias = Callable[[Degradation], None]


class _Trailers(Protocol):
    """What :func:`degraded` reads: any call object with ``grpc.aio``'s trailing metadata."""

    def trailing_metadata(self) -> Awaitable[Iterable[tuple[str, str | bytes]] | None]: ...


@dataclass(frozen=True, slots=True)
class _Declared:
    """A fallback as declared in code, before it is checked against the descriptor pool."""

    method: str
    fn: Callable[..., Any] | None
    response: str | Message | None
    returns: type[Message] | None

    def shown(self) -> str:
        """The declaration, short, for a refusal."""
        if self.fn is not None:
            name = _qualname(self.fn)
            # The end of a function's name says most: keep it, drop the module first.
            if len(name) > _VALUE_LIMIT:
                name = getattr(self.fn, "__qualname__", name)
            return name if len(name) <= _VALUE_LIMIT else "..." + name[3 - _VALUE_LIMIT :]
        if isinstance(self.response, Message):
            return _short(f"{self.response.DESCRIPTOR.full_name}({_text(self.response)})")
        return _short(repr(self.response))


@dataclass(frozen=True, slots=True)
class Fallback:
    """A checked fallback of one method: answers with a fresh message of its output type.

    Attributes:
        method: ``package.Service/Method``.
        output: the method's output message class.
        source: ``code``, ``static`` or ``proto`` (see :class:`Degradation`).
    """

    method: str
    output: type[Message]
    source: FallbackSource
    fn: Callable[..., Any] | None = None
    template: Message | None = None

    async def respond(self, request: Any, error: StatusError) -> Message:
        """The message that replaces ``error`` as the answer to ``request``.

        Raises:
            TypeError: a fallback function returned something other than the output type.
            Exception: whatever the fallback function raised.
        """
        if self.template is not None:
            # A copy per call: the caller may change the message it got.
            answer = self.output()
            answer.CopyFrom(self.template)
            return answer
        assert self.fn is not None
        result = self.fn(request, error)
        if inspect.isawaitable(result):
            result = await result
        expected = self.output.DESCRIPTOR.full_name
        if not isinstance(result, Message) or result.DESCRIPTOR.full_name != expected:
            raise TypeError(
                f"fallback {_qualname(self.fn)} of {self.method} returned "
                f"{_type_name(type(result))}, not {expected}"
            )
        return result


class Fallbacks:
    """The fallbacks of the methods a process calls: declared in code, or in the proto.

    Declarations are checked by :meth:`check` (``App.start()`` does it), not when made, so one
    start-up reports every problem at once.

    Args:
        pool: where generated code registered its descriptors; the default pool if None.
    """

    def __init__(self, *, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._declared: dict[str, _Declared] = {}
        self._twice: list[_Declared] = []
        self._found: dict[str, Fallback | None] = {}

    def add(
        self,
        method: str,
        fn: FallbackFn | None = None,
        *,
        response: str | Message | None = None,
        returns: type[Message] | None = None,
    ) -> None:
        """Declare the fallback of ``method``: a function, or a fixed response.

        Args:
            method: ``package.Service/Method``, as in the client configuration.
            fn: ``fn(request, error) -> Output``, sync or async. Its return annotation (or
                ``returns``) must be the method's output message class.
            response: a fixed answer: a message of the output type, or its text format
                (``'name: "unknown" cached: true'``).
            returns: the output class, for a function without a return annotation.

        Raises:
            TypeError: neither or both of ``fn`` and ``response`` were given.
        """
        if (fn is None) == (response is None):
            raise TypeError(f"fallback of {method}: give either fn or response=, not both")
        entry = _Declared(_method_key(method), fn, response, returns)
        if entry.method in self._declared:
            self._twice.append(entry)  # refused by check(), with every other problem
        else:
            self._declared[entry.method] = entry
        self._found.clear()

    def method(self, method: str, *, returns: type[Message] | None = None) -> Callable[[_F], _F]:
        """Decorator form of :meth:`add`: ``@fallbacks.method("pkg.Service/Method")``.

        Args:
            method: ``package.Service/Method``.
            returns: the output class, for a function without a return annotation.

        Returns:
            A decorator that declares the function and returns it unchanged.
        """

        def declare(fn: _F) -> _F:
            self.add(method, fn, returns=returns)
            return fn

        return declare

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and _method_key(method) in self._declared

    def __len__(self) -> int:
        return len(self._declared)

    def check(self, method_names: Iterable[str] | None = None) -> None:
        """Check every fallback against the descriptor pool; refuse them all at once.

        Checked: each fallback declared in code (its method exists and answers one message;
        its function takes ``(request, error)`` and is annotated to return the output type, or
        its response is one or parses as one), and the ``(tether.v1.fallback)`` option of
        ``method_names``, or of every method of the generated modules imported so far.

        Args:
            method_names: ``package.Service/Method`` names whose proto options to check.

        Raises:
            ConfigError: one :class:`~tether.errors.ConfigProblem` per bad fallback, its field
                ``fallback[package.Service/Method]``.
        """
        problems: list[ConfigProblem] = []
        for entry in self._twice:
            problems.append(
                ConfigProblem(_field(entry.method), entry.shown(), "declared more than once")
            )
        for entry in self._declared.values():
            _, problem = self._resolve_declared(entry)
            if problem is not None:
                problems.append(problem)
        if method_names is None:
            methods: Iterable[descriptor.MethodDescriptor] = _imported_methods(self._pool)
        else:
            methods = []
            for name in dict.fromkeys(_method_key(n) for n in method_names):
                found = self._method(name)
                if found is None:
                    problems.append(ConfigProblem(_field(name), repr(name), _UNKNOWN))
                else:
                    methods.append(found)
        for method in methods:
            _, problem = _resolve_option(method)
            if problem is not None:
                problems.append(problem)
        if problems:
            raise ConfigError(problems, source="fallbacks")

    def lookup(self, method: str) -> Fallback | None:
        """The fallback of ``method`` (code first, then the proto), or None.

        A declaration :meth:`check` would refuse gives None, so the error stands; it is logged
        once.
        """
        key = _method_key(method)
        if key in self._found:
            return self._found[key]
        declared = self._declared.get(key)
        if declared is not None:
            found, problem = self._resolve_declared(declared)
        else:
            method_desc = self._method(key)
            found, problem = (None, None) if method_desc is None else _resolve_option(method_desc)
        if problem is not None:
            _log.error("fallback refused", rpc=key, problem=str(problem))
        if len(self._found) < _CACHE_LIMIT:  # names come from code, but stay bounded
            self._found[key] = found
        return found

    def _method(self, key: str) -> descriptor.MethodDescriptor | None:
        """The descriptor of ``package.Service/Method``; None for another spelling too, since
        calls look fallbacks up by that spelling alone."""
        service, slash, name = key.rpartition("/")
        if not slash or not service or "/" in service:
            return None
        try:
            return self._pool.FindMethodByName(f"{service}.{name}")
        except KeyError:
            return None

    def _resolve_declared(self, entry: _Declared) -> tuple[Fallback | None, ConfigProblem | None]:
        """The checked fallback of a declaration, or the problem that refuses it."""
        method = self._method(entry.method)
        if method is None:
            return None, ConfigProblem(_field(entry.method), entry.shown(), _UNKNOWN)
        expected = method.output_type.full_name

        def refuse(rule: str) -> tuple[None, ConfigProblem]:
            return None, ConfigProblem(_field(entry.method), entry.shown(), rule)

        if method.server_streaming:
            return refuse(_STREAMING)
        output = message_factory.GetMessageClass(method.output_type)
        if entry.fn is not None:
            got = _returned_type(entry.fn, entry.returns)
            if got != expected:
                return refuse(f"must return {expected}, got {got}")
            if not _takes_two(entry.fn):
                return refuse(f"must take (request, error) and return {expected}")
            return Fallback(entry.method, output, "code", fn=entry.fn), None
        if isinstance(entry.response, Message):
            got = entry.response.DESCRIPTOR.full_name
            if got != expected:
                return refuse(f"must return {expected}, got {got}")
            copy = output()
            copy.CopyFrom(entry.response)
            return Fallback(entry.method, output, "static", template=copy), None
        assert isinstance(entry.response, str)
        parsed, error = _parse(entry.response, output)
        if parsed is None:
            return refuse(f"must return {expected}, got text that does not parse as one: {error}")
        return Fallback(entry.method, output, "static", template=parsed), None


def _resolve_option(
    method: descriptor.MethodDescriptor,
) -> tuple[Fallback | None, ConfigProblem | None]:
    """The fallback the proto declares for ``method`` (None without one), or its problem."""
    options = method.GetOptions()
    if not options.HasExtension(_OPTION):
        return None, None
    text: str = options.Extensions[_OPTION]
    key = f"{method.containing_service.full_name}/{method.name}"
    expected = method.output_type.full_name

    def refuse(rule: str) -> tuple[None, ConfigProblem]:
        return None, ConfigProblem(_field(key), _short(repr(text)), rule)

    if method.server_streaming:
        return refuse(f"(tether.v1.fallback): {_STREAMING}")
    output = message_factory.GetMessageClass(method.output_type)
    template, error = _parse(text, output)
    if template is None:
        return refuse(
            f"(tether.v1.fallback) must return {expected}, "
            f"got text that does not parse as one: {error}"
        )
    return Fallback(key, output, "proto", template=template), None


#: The ``(tether.v1.fallback)`` extension. ``Any``: protoc's type stub declares a plain
#: FieldDescriptor, where types-protobuf wants an extension descriptor typed by its message.
_OPTION: Any = options_pb2.fallback

_UNKNOWN = (
    "names no method in the descriptor pool; use package.Service/Method and import the "
    "method's generated *_pb2 module first"
)
_STREAMING = "the method answers with a stream; fallbacks answer unary-response calls only"


def fallback(
    resolver: PolicyResolver,
    fallbacks: Fallbacks,
    *,
    service: str,
    listeners: Sequence[FallbackListener] = (),
    clock: Callable[[], float] = time.monotonic,
) -> Middleware:
    """Build the fallback middleware of one dependency's client chain.

    A unary-response call answers with the method's fallback (declared in code or in the
    proto) instead of failing when the call was refused locally (``BreakerOpen``,
    ``RateLimited``) or a peer answered a status in the method's ``fallback_codes``. Other
    errors, and methods without a fallback, fail unchanged. A fallback function that raises
    a ``StatusError`` answers with that status; one that fails otherwise is logged and the
    original error stands. Each answer is marked with the ``tether-fallback`` trailer and
    reported to ``listeners``; the ``fallback answered`` warning is logged for the first
    answer of a method and reason, then at most every ``FALLBACK_LOG_EVERY`` seconds with the
    count of answers in between, so an outage does not flood the log.

    Args:
        resolver: the dependency's policies (``fallback_codes`` per method).
        fallbacks: the declared fallbacks.
        service: the dependency's name, for logs and listeners.
        listeners: called with a :class:`Degradation` per answer (metrics, tracing).
        clock: a monotonic clock for the log's rate limit; injectable for tests.

    Returns:
        A client middleware; put it outside the breaker and the limiter, so it sees their
        refusals.
    """
    hooks = tuple(listeners)
    logged = _DegradationLog(clock)

    def middleware(handler: Handler) -> Handler:
        async def falling_back(request: Any) -> Any:
            ctx = current_call()
            if ctx is None or ctx.response_streaming:
                return await handler(request)
            try:
                return await handler(request)
            except StatusError as err:
                method = ctx.method.path
                if not _replaceable(err, resolver, method):
                    raise
                found = fallbacks.lookup(method)
                if found is None:
                    raise
                try:
                    response = await found.respond(request, err)
                except StatusError:
                    raise  # the fallback chose to answer with a status
                except Exception as exc:
                    _log.error("fallback failed", dependency=service, rpc=method, exc_info=exc)
                    # Not "from None": the caller's AioRpcError is the error's __cause__.
                    raise err  # noqa: B904
                event = Degradation(service, method, err.code.name, err, found.source)
                _mark(event, hooks, logged)
                return response

        return falling_back

    return middleware


def _replaceable(err: StatusError, resolver: PolicyResolver, method: str) -> bool:
    """Whether a fallback may replace ``err``: a local refusal, or a status policy lists."""
    if isinstance(err, BreakerOpen | RateLimited):
        return True
    return isinstance(err, RemoteError) and err.code.name in resolver.policy(method).fallback_codes


#: A fallback answering during an outage answers every call: one warning per method and
#: reason at most this often (seconds), with the number of answers not logged in between.
#: ``tether_fallbacks_total`` and the span events count every one.
FALLBACK_LOG_EVERY = 10.0


class _DegradationLog:
    """The rate-limited ``fallback answered`` warning of one client chain."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logged: dict[tuple[str, str], list[float]] = {}  # [logged at, answers since]

    def __call__(self, event: Degradation) -> None:
        key = (event.method, event.reason)
        now = self._clock()
        entry = self._logged.get(key)
        if entry is not None and now - entry[0] < FALLBACK_LOG_EVERY:
            entry[1] += 1
            return
        unlogged = 0 if entry is None else int(entry[1])
        if entry is not None or len(self._logged) < _CACHE_LIMIT:
            self._logged[key] = [now, 0]
        _log.warning(
            "fallback answered",
            dependency=event.service,
            rpc=event.method,
            reason=event.reason,
            error=event.error.message[:_MESSAGE_LIMIT],
            source=event.source,
            **({"unlogged_since_last": unlogged} if unlogged else {}),
        )


def _mark(event: Degradation, listeners: Sequence[FallbackListener], log: _DegradationLog) -> None:
    """Make a degraded answer visible: a log line (rate-limited), the caller's trailer, the
    listeners."""
    log(event)
    sink = _trailers.get()
    if sink is not None:
        sink.append((FALLBACK_TRAILER, event.reason))
    for listener in listeners:
        try:
            listener(event)
        except Exception as exc:  # a broken metric must not fail a call that was answered
            _log.error("fallback listener failed", listener=_qualname(listener), exc_info=exc)


# --------------------------------------------------------------------------- the caller's view

#: Trailers the client chain adds to an answer it made itself; the call adapter binds a list
#: per call (:func:`collect_trailers`) and serves it as the call's trailing metadata.
_trailers: ContextVar[list[tuple[str, str]] | None] = ContextVar(
    "tether_chain_trailers", default=None
)


class collect_trailers:  # noqa: N801 - used as a function: ``with collect_trailers(sink):``
    """Within the block, trailers the client chain adds go to ``sink`` (for the call adapter).

    A class, not a generator-based context manager: every outbound call enters it.
    """

    __slots__ = ("_sink", "_token")

    def __init__(self, sink: list[tuple[str, str]]) -> None:
        self._sink = sink

    def __enter__(self) -> list[tuple[str, str]]:
        self._token = _trailers.set(self._sink)
        return self._sink

    def __exit__(self, *exc: object) -> None:
        _trailers.reset(self._token)


async def degraded(call: _Trailers) -> str | None:
    """Why ``call`` was answered by a fallback, or None if it was not.

    Args:
        call: a call object of a tether channel (what a stub method returns); it is awaited
            to its end.

    Returns:
        The status code name the fallback replaced, e.g. ``UNAVAILABLE``.
    """
    for key, value in await call.trailing_metadata() or ():
        if key == FALLBACK_TRAILER:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return None


# --------------------------------------------------------------------------- helpers


def _method_key(method: str | MethodName) -> str:
    """``package.Service/Method``, whether or not the name came with a leading slash."""
    text = str(method)
    return text[1:] if text.startswith("/") else text


def _field(method: str) -> str:
    return f"fallback[{method}]"


def _short(text: str) -> str:
    return text if len(text) <= _VALUE_LIMIT else text[: _VALUE_LIMIT - 3] + "..."


def _qualname(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def _type_name(tp: object) -> str:
    """A type as a refusal names it: a message by its proto name, anything else as Python."""
    desc = getattr(tp, "DESCRIPTOR", None)
    if isinstance(desc, descriptor.Descriptor):
        return desc.full_name
    if isinstance(tp, type):
        return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__name__}"
    return repr(tp)


def _text(message: Message) -> str:
    return text_format.MessageToString(message, as_one_line=True)


def _returned_type(fn: Callable[..., Any], returns: type[Message] | None) -> str:
    """What ``fn`` says it returns, named as a refusal shows it."""
    if returns is not None:
        return _type_name(returns)
    # A callable object declares its return type on __call__.
    target = fn if inspect.isroutine(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:  # an annotation naming something not importable here
        return f"an annotation that does not resolve ({exc}); pass returns="
    if "return" not in hints:
        return "a function without a return annotation; annotate it or pass returns="
    return _type_name(hints["return"])


def _takes_two(fn: Callable[..., Any]) -> bool:
    """Whether ``fn(request, error)`` is a valid call of ``fn``."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): let the call decide
        return True
    return True


def _parse(text: str, output: type[Message]) -> tuple[Message | None, str]:
    """``text`` parsed as ``output``, or None and why not."""
    try:
        return text_format.Parse(text, output()), ""
    except text_format.ParseError as exc:
        return None, str(exc)


def _imported_methods(pool: descriptor_pool.DescriptorPool) -> list[descriptor.MethodDescriptor]:
    """Every method of the generated modules imported so far that registered in ``pool``."""
    seen: dict[str, descriptor.MethodDescriptor] = {}
    for module in list(sys.modules.values()):
        # Generated modules define DESCRIPTOR as a global: read the module's dict, so modules
        # with a __getattr__ (lazy or deprecating ones, such as copier's) are not woken.
        file = getattr(module, "__dict__", {}).get("DESCRIPTOR")
        if not isinstance(file, descriptor.FileDescriptor) or file.pool is not pool:
            continue
        for service in file.services_by_name.values():
            for method in service.methods:
                seen.setdefault(method.full_name, method)
    return list(seen.values())
