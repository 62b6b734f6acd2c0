"""The one adapter between tether's middleware chain and ``grpc.aio``, for all four call shapes.

Everything gRPC-specific about running a chain lives here: building the call context from the
servicer context or the client call details, invoking the servicer or the continuation, and
mapping errors both ways at the edge (``StatusError`` → wire status on the server; ``AioRpcError``
→ ``RemoteError`` inside the client chain, and back to ``AioRpcError`` for the caller).
Middleware never sees ``continuation``, ``handler_call_details`` or a servicer context.

Wrapped handlers are built once per method and cached; the per-call work is one
``CallContext`` and two contextvar sets.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, cast

import grpc
from grpc.aio import AioRpcError, ClientCallDetails
from grpc_status import rpc_status

from tether.context import CallContext, Metadata, MethodName, Side, _current
from tether.errors import RemoteError, StatusError, TetherError
from tether.middleware import Handler, Middleware, chain

__all__ = ["EXEMPT_SERVICES", "ChainClientInterceptor", "ChainServerInterceptor"]

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
    return CallContext(
        method=name,
        side=Side.SERVER,
        metadata=metadata if type(metadata) is tuple else tuple(metadata),
        deadline=_deadline_in(context.time_remaining()),
        peer=context.peer(),
        request_streaming=request_streaming,
        response_streaming=response_streaming,
    )


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")


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
        enter, leave = self._enter, self._leave
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        if not ss:

            async def unary_response(request: Any, context: Any) -> Any:
                token = _current.set(_server_context(name, context, rs, ss))
                ctx_token = _servicer_context.set(context)
                enter()
                try:
                    return await wrapped(request)
                except StatusError as err:
                    await _abort_with(context, err)
                finally:
                    leave()
                    _servicer_context.reset(ctx_token)
                    _current.reset(token)

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


# --------------------------------------------------------------------------- client side


class _Invocation:
    """Per-call state the client terminal needs and middleware must not see."""

    __slots__ = ("call", "continuation", "deadline", "details", "metadata", "response")

    def __init__(
        self,
        continuation: Callable[..., Any],
        details: ClientCallDetails,
        metadata: Metadata,
        deadline: float | None,
    ) -> None:
        self.continuation = continuation
        self.details = details
        self.metadata = metadata
        self.deadline = deadline
        self.call: Any = None
        self.response: Any = None


_invocation: ContextVar[_Invocation] = ContextVar("tether_invocation")


def _details_for(inv: _Invocation, call: CallContext) -> ClientCallDetails:
    """The call details to send: the original ones unless middleware changed the context."""
    if call.metadata is inv.metadata and call.deadline == inv.deadline:
        return inv.details
    timeout = None if call.deadline is None else max(call.deadline - time.monotonic(), 0.0)
    return ClientCallDetails(
        method=inv.details.method,
        timeout=timeout,
        metadata=grpc.aio.Metadata(*call.metadata),
        credentials=inv.details.credentials,
        wait_for_ready=inv.details.wait_for_ready,
    )


def _remote_error(exc: AioRpcError) -> RemoteError:
    return RemoteError(
        exc.code(),
        exc.details() or "",
        trailing_metadata=tuple(cast(Metadata, exc.trailing_metadata() or ())),
    )


async def _send_unary_response(request: Any) -> Any:
    inv = _invocation.get()
    call_ctx = _current.get()
    assert call_ctx is not None
    call = await inv.continuation(_details_for(inv, call_ctx), request)
    inv.call = call
    try:
        response = await call
    except AioRpcError as exc:
        raise _remote_error(exc) from exc
    inv.response = response
    return response


async def _send_stream_response(request: Any) -> Any:
    inv = _invocation.get()
    call_ctx = _current.get()
    assert call_ctx is not None
    call = await inv.continuation(_details_for(inv, call_ctx), request)
    inv.call = inv.response = call
    return call


def _to_aio_error(err: TetherError) -> AioRpcError:
    """What the caller outside the chain receives for an error raised inside it."""
    if isinstance(err, RemoteError) and isinstance(err.__cause__, AioRpcError):
        return err.__cause__
    trailers: tuple[tuple[str, str | bytes], ...] = ()
    message = str(err)
    if isinstance(err, StatusError):
        trailers = (*getattr(err, "trailing_metadata", ()), *_trailers_for(err))
        message = err.message
    return AioRpcError(
        code=err.code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailers),
        details=message,
        debug_error_string="raised locally by the tether client chain",
    )


class ChainClientInterceptor:
    """Runs every outbound call on a channel through a middleware chain.

    grpc.aio files each interceptor object under one call shape only, so a channel takes the four
    shape-specific interceptors that :meth:`interceptors` returns; all four share this chain.
    The caller keeps the ``grpc.aio`` experience: it awaits a call object, and a failure arrives
    as ``grpc.aio.AioRpcError`` whether the peer or a middleware produced it.

    Args:
        middleware: the client chain, outermost first.
        target: what the channel dials, recorded as the call context's ``peer``.
    """

    def __init__(self, middleware: Sequence[Middleware], *, target: str | None = None) -> None:
        wrap = chain(middleware)
        self._unary = wrap(_send_unary_response)
        self._stream = wrap(_send_stream_response)
        self._target = target

    def interceptors(self) -> list[Any]:
        """The four ``grpc.aio`` client interceptors to pass to the channel."""
        return [_UnaryUnary(self), _UnaryStream(self), _StreamUnary(self), _StreamStream(self)]

    async def intercept(
        self,
        continuation: Callable[..., Any],
        details: ClientCallDetails,
        request: Any,
        request_streaming: bool,
        response_streaming: bool,
    ) -> Any:
        """Run one outbound call through the chain (called by the shape-specific interceptors)."""
        method = details.method
        name = MethodName.parse(method.decode() if isinstance(method, bytes) else method)
        metadata: Metadata = tuple(details.metadata) if details.metadata else ()
        deadline = _deadline_in(details.timeout)
        parent = _current.get()
        ctx = CallContext(
            method=name,
            side=Side.CLIENT,
            metadata=metadata,
            deadline=deadline,
            peer=self._target,
            request_streaming=request_streaming,
            response_streaming=response_streaming,
            parent=parent.parent if parent is not None and parent.side is Side.CLIENT else parent,
        )
        inv = _Invocation(continuation, details, metadata, deadline)
        token = _current.set(ctx)
        inv_token = _invocation.set(inv)
        try:
            handler = self._stream if response_streaming else self._unary
            response = await handler(request)
        except TetherError as err:
            raise _to_aio_error(err) from None
        finally:
            _invocation.reset(inv_token)
            _current.reset(token)
        # Hand back the real call when nothing replaced the response, so the caller still
        # reads its metadata, code and details.
        return inv.call if response is inv.response and inv.call is not None else response


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, chain: ChainClientInterceptor) -> None:
        self._chain = chain

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._chain.intercept(continuation, client_call_details, request, False, False)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, chain: ChainClientInterceptor) -> None:
        self._chain = chain

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._chain.intercept(continuation, client_call_details, request, False, True)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, chain: ChainClientInterceptor) -> None:
        self._chain = chain

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await self._chain.intercept(
            continuation, client_call_details, request_iterator, True, False
        )


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, chain: ChainClientInterceptor) -> None:
        self._chain = chain

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await self._chain.intercept(
            continuation, client_call_details, request_iterator, True, True
        )
