"""The server half of the adapter between tether's middleware chain and ``grpc.aio``.

Everything gRPC-specific about serving through a chain lives here, for all four call shapes:
building the call context from the servicer context, invoking the servicer, and mapping a
``StatusError`` to the wire status at the edge. Middleware never sees ``continuation``,
``handler_call_details`` or a servicer context. The client half is :mod:`tether.channel`.

Wrapped handlers are built once per method and cached; the per-call work is one
``CallContext`` and two contextvar sets.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from grpc_status import rpc_status

from tether.context import CallContext, MethodName, Side, _current
from tether.errors import Internal, StatusError
from tether.middleware import Handler, Middleware, chain

__all__ = ["EXEMPT_SERVICES", "UNPROCESSED_TRAILER", "ChainServerInterceptor"]

#: Infrastructure services served without the chain: probes and tooling are not traffic.
EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_servicer_context: ContextVar[grpc.aio.ServicerContext[Any, Any]] = ContextVar(
    "tether_servicer_context"
)


def _deadline_in(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


def _trailers_for(err: StatusError) -> tuple[tuple[str, str | bytes], ...]:
    if not err.details:
        return ()
    return tuple(rpc_status.to_status(err.to_status_proto()).trailing_metadata)


class _HandlerAbort(StatusError):
    """The servicer called ``context.abort()``: the status is already set, pass it through."""

    def __init__(self, original: BaseException, code: grpc.StatusCode) -> None:
        self.code = code  # type: ignore[misc]
        super().__init__("aborted by handler")
        self.original = original


# --------------------------------------------------------------------------- server side


async def _refuse_unparsable(request: Any) -> Any:
    """The terminal for request bytes that do not parse (the chain sees the raw bytes)."""
    raise Internal("the request message could not be parsed")


def _server_terminal(behavior: Callable[..., Any], response_streaming: bool) -> Handler:
    """The innermost handler: call the servicer method with this call's servicer context."""
    is_coroutine = inspect.iscoroutinefunction(behavior)

    async def invoke(request: Any) -> Any:
        context = _servicer_context.get()
        try:
            if is_coroutine:
                return await behavior(request, context)
            if response_streaming:
                # An (async) generator: _catch_aborts iterates it. A plain generator runs on
                # the event loop, so it must not block.
                return behavior(request, context)
            # A plain function blocks: run it on a worker thread, with this call's context.
            return await asyncio.to_thread(behavior, request, context)
        except grpc.aio.AbortError as exc:
            raise _HandlerAbort(exc, context.code() or grpc.StatusCode.UNKNOWN) from exc

    if not response_streaming:
        return invoke

    async def invoke_stream(request: Any) -> Any:
        return _catch_aborts(await invoke(request))

    return invoke_stream


async def _as_async_stream(result: Any) -> AsyncIterator[Any]:
    """Normalise what a streaming servicer method gives back into an async iterator."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result  # the method wrote its responses with context.write()
    elif isinstance(result, Iterable):
        for item in result:
            yield item


async def _catch_aborts(stream: Any) -> AsyncIterator[Any]:
    context = _servicer_context.get()
    try:
        async for item in _as_async_stream(stream):
            yield item
    except grpc.aio.AbortError as exc:
        raise _HandlerAbort(exc, context.code() or grpc.StatusCode.UNKNOWN) from exc


async def _abort_with(context: grpc.aio.ServicerContext[Any, Any], err: StatusError) -> None:
    if isinstance(err, _HandlerAbort):
        raise err.original
    await context.abort(err.code, err.message, _trailers_for(err))


def _server_context(
    name: MethodName,
    context: grpc.aio.ServicerContext[Any, Any],
    request_streaming: bool,
    response_streaming: bool,
) -> CallContext:
    metadata: Any = context.invocation_metadata() or ()
    deadline = _deadline_in(context.time_remaining())
    return CallContext(
        method=name,
        side=Side.SERVER,
        metadata=metadata if type(metadata) is tuple else tuple(metadata),
        deadline=deadline,
        transport_deadline=deadline,  # grpc cancels the handler at this one itself
        peer=context.peer(),
        request_streaming=request_streaming,
        response_streaming=response_streaming,
    )


#: Trailer of a call refused before any handler ran (the server is shutting down): the request
#: was not processed, so a tether client may send it again elsewhere, whatever the method.
UNPROCESSED_TRAILER = "tether-unprocessed"


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.UNAVAILABLE,
        "server is shutting down",
        trailing_metadata=((UNPROCESSED_TRAILER, "shutting-down"),),
    )


# Request bytes are not decoded: a refused call costs nothing but the status.
_REFUSE: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_refuse)


class ChainServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Runs every inbound call through a middleware chain.

    Put it last in the server's interceptor list: it caches the handler grpc resolves for a
    method, which is only safe when nothing after it builds handlers per call.

    Args:
        middleware: the server chain, outermost first.
        exempt: fully qualified services served without the chain.
    """

    def __init__(
        self, middleware: Sequence[Middleware], *, exempt: frozenset[str] = EXEMPT_SERVICES
    ) -> None:
        self._wrap = chain(middleware)
        self._exempt = exempt
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._refusing = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Calls through the chain that have started and not yet finished."""
        return self._in_flight

    def refuse_new_calls(self) -> None:
        """Answer every call that arrives from now on with UNAVAILABLE (shutting down).

        grpc-core cancels calls that race its own shutdown; refusing here first gives those
        callers a status they may retry elsewhere while in-flight calls finish.
        """
        self._refusing = True
        self._idle = asyncio.Event()
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is in flight; call :meth:`refuse_new_calls` first."""
        assert self._idle is not None, "refuse_new_calls() first"
        await self._idle.wait()

    def _enter(self) -> None:
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if self._refusing:
            return _REFUSE
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            # Unknown method: grpc answers UNIMPLEMENTED. Not cached, so junk names cannot grow
            # the cache.
            return handler
        wrapped = self._wrap_handler(MethodName.parse(method), handler)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap_handler(
        self, name: MethodName, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if name.qualified_service in self._exempt:
            return handler
        rs, ss = handler.request_streaming, handler.response_streaming
        behavior = (
            handler.stream_stream
            if rs and ss
            else handler.unary_stream
            if ss
            else handler.stream_unary
            if rs
            else handler.unary_unary
        )
        assert behavior is not None, f"{name} has no behavior for its call shape"
        wrapped = self._wrap(_server_terminal(behavior, ss))
        # A single request is parsed here rather than by grpc, so corrupt bytes get a clean
        # INTERNAL (gRPC's code for a request that does not parse) through the chain, seen by
        # metrics, access log and span; grpc would answer UNKNOWN naming the exception, and
        # log a traceback per call where tether never sees it.
        parse = None if rs else handler.request_deserializer
        refusal: list[Handler] = []  # the chain that refuses such bytes, made when first needed

        def unparsable() -> Handler:
            if not refusal:
                refusal.append(self._wrap(_refuse_unparsable))
            return refusal[0]

        enter, leave = self._enter, self._leave
        serializers = {
            "request_deserializer": handler.request_deserializer if rs else None,
            "response_serializer": handler.response_serializer,
        }

        if not ss:

            async def unary_response(request: Any, context: Any) -> Any:
                # Each RPC runs in a task of its own: these sets end with it, no reset needed.
                _current.set(_server_context(name, context, rs, ss))
                _servicer_context.set(context)
                enter()
                try:
                    if parse is not None:
                        try:
                            request = parse(request)
                        except Exception:
                            return await unparsable()(request)
                    return await wrapped(request)
                except StatusError as err:
                    await _abort_with(context, err)
                finally:
                    leave()

            factory = (
                grpc.stream_unary_rpc_method_handler if rs else grpc.unary_unary_rpc_method_handler
            )
            return factory(unary_response, **serializers)

        async def stream_response(request: Any, context: Any) -> AsyncIterator[Any]:
            # Each RPC runs in its own task, so these sets cannot leak into another call; they
            # are not reset because an async generator may be finalised in another context.
            _current.set(_server_context(name, context, rs, ss))
            _servicer_context.set(context)
            enter()
            try:
                if parse is not None:
                    try:
                        request = parse(request)
                    except Exception:
                        await unparsable()(request)
                stream = await wrapped(request)
                async for item in stream:
                    yield item
            except StatusError as err:
                await _abort_with(context, err)
            finally:
                leave()

        factory = (
            grpc.stream_stream_rpc_method_handler if rs else grpc.unary_stream_rpc_method_handler
        )
        return factory(stream_response, **serializers)
