"""The ``grpc.aio`` call objects a tether :class:`~tether.channel.Channel` hands to stubs.

A generated stub calls ``channel.unary_unary(...)`` once per method and then calls the result
per RPC; the caller awaits or iterates what comes back, and may read its code, details and
metadata. These classes give that experience while the call itself runs through the client
chain (see :class:`CallRunner`), inline in the task that first awaits or reads it. When no
middleware replaced the response, code, details and metadata come from the real ``grpc.aio``
call of the last attempt; when one did (a fallback), the trailing metadata is what the chain
added (:func:`tether.fallback.collect_trailers`). A ``TetherError`` that leaves the chain
reaches the caller as ``grpc.aio.AioRpcError`` (:func:`to_aio_error`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc.aio import AioRpcError

from tether.context import CallContext, MethodName
from tether.errors import RemoteError, StatusError, TetherError
from tether.fallback import collect_trailers
from tether.interceptors import _trailers_for

__all__ = [
    "CallRunner",
    "Invocation",
    "MethodSpec",
    "make_multicallable",
    "method_spec",
    "to_aio_error",
]


class CallRunner(Protocol):
    """What runs a call: builds its context and drives it through the chain."""

    def _context(self, spec: MethodSpec, timeout: float | None, metadata: Any) -> CallContext:
        """The call context of a new call."""
        ...

    async def _run(self, ctx: CallContext, inv: Invocation, request: Any) -> Any:
        """Run the call through the chain; errors leave it as ``AioRpcError``."""
        ...


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """What a stub's multicallable fixes: the method, its shape and its (de)serializers."""

    kind: str  # the grpc.aio.Channel method: unary_unary, unary_stream, ...
    method: str
    name: MethodName
    request_serializer: Callable[[Any], bytes] | None
    response_deserializer: Callable[[bytes], Any] | None
    registered: bool
    request_streaming: bool
    response_streaming: bool


class Invocation:
    """Per-call state the terminal needs and middleware must not see."""

    __slots__ = (
        "call",
        "cancelled",
        "compression",
        "credentials",
        "response",
        "spec",
        "trailers",
        "tried",
        "wait_for_ready",
    )

    def __init__(
        self,
        spec: MethodSpec,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self.spec = spec
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
        self.tried: set[str] = set()  # addresses of this logical call's attempts
        self.call: Any = None  # the last attempt's grpc.aio call
        self.response: Any = None  # what the last attempt answered
        self.cancelled = False  # the caller cancelled: make no further attempt
        self.trailers: list[tuple[str, str]] = []  # what the chain adds to an answer it made


def method_spec(
    kind: str,
    method: str,
    request_serializer: Callable[[Any], bytes] | None,
    response_deserializer: Callable[[bytes], Any] | None,
    registered: bool | None,
) -> MethodSpec:
    """Describe one method of a stub, as ``channel.unary_unary(...)`` and its siblings are told.

    Args:
        kind: the ``grpc.aio.Channel`` method that was called, e.g. ``unary_stream``.
        method: the full method name, ``/package.Service/Method``.
        request_serializer: turns a request message into bytes.
        response_deserializer: turns bytes into a response message.
        registered: generated code's ``_registered_method`` flag, passed on to grpc.

    Returns:
        The spec; equal specs share one grpc multicallable per subchannel.
    """
    return MethodSpec(
        kind=kind,
        method=method,
        name=MethodName.parse(method),
        request_serializer=request_serializer,
        response_deserializer=response_deserializer,
        registered=bool(registered),
        request_streaming=kind.startswith("stream_"),
        response_streaming=kind.endswith("_stream"),
    )


def to_aio_error(err: TetherError) -> AioRpcError:
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


_PENDING: Any = object()  # no outcome yet
_END: Any = object()  # the end of a written request stream


class RequestQueue:
    """The request stream of a call written with ``write()`` instead of an iterator."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    def put(self, request: Any) -> None:
        """Queue one request message."""
        if self.closed:
            raise grpc.aio.UsageError("done_writing() was already called")
        self._queue.put_nowait(request)

    def close(self) -> None:
        """End the stream after the messages queued so far."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(_END)

    def __aiter__(self) -> RequestQueue:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        return item


_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lacks the EOF sentinel


class _OutboundCall:
    """What the four call shapes share: run the chain once, inline, and remember the outcome.

    The chain runs in the task that first awaits or reads the call (no extra task per call).
    When no middleware replaced the response, code, details and metadata come from the real
    ``grpc.aio`` call of the last attempt.
    """

    def __init__(
        self,
        runner: CallRunner,
        spec: MethodSpec,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self._runner = runner
        if spec.request_streaming and request is None:
            request = RequestQueue()  # the caller will write() and done_writing()
        self._request = request
        self._ctx = runner._context(spec, timeout, metadata)
        self._inv = Invocation(spec, credentials, wait_for_ready, compression)
        self._outcome: Any = _PENDING
        self._error: BaseException | None = None
        self._running = False
        self._settled: asyncio.Event | None = None
        self._done = False
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []

    async def _start(self) -> Any:
        """Run the chain if nobody has yet; return its outcome or raise its error.

        A unary response ends the call; a response stream is only opened, and ends when read
        to its end.
        """
        while self._running:  # another task is running it: wait for that run
            if self._settled is None:
                self._settled = asyncio.Event()
            await self._settled.wait()
        if self._error is not None:
            raise self._error
        if self._outcome is not _PENDING:
            return self._outcome
        if self._cancelled:
            raise asyncio.CancelledError
        self._running = True
        try:
            with collect_trailers(self._inv.trailers):
                self._outcome = await self._runner._run(self._ctx, self._inv, self._request)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._running = False
            if self._settled is not None:
                self._settled.set()
                self._settled = None
        if not self._inv.spec.response_streaming:
            self._finish()
        return self._outcome

    async def _settle(self) -> None:
        """Let the call run to its end, keeping its error for code() and friends."""
        try:
            await self._start()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own task is being cancelled, not the call
        except Exception:  # the outcome is kept in self._error
            pass

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, TetherError):
            exc = to_aio_error(exc)
        if isinstance(exc, asyncio.CancelledError):
            self._cancelled = True
        self._error = exc
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def _real_call(self) -> Any:
        """The last attempt's grpc call, when its response is what the caller got."""
        inv = self._inv
        if inv.call is not None and self._outcome is inv.response:
            return inv.call
        return None

    # grpc.aio.RpcContext and grpc.aio.Call

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return self._cancelled

    def done(self) -> bool:
        """Whether the call has finished."""
        return self._done

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline."""
        return self._ctx.time_remaining()

    def cancel(self) -> bool:
        """Cancel the call; an attempt in flight is cancelled, no further attempt is made."""
        if self._done:
            return False
        self._cancelled = True
        self._inv.cancelled = True
        if self._inv.call is not None:
            self._inv.call.cancel()
        if not self._running and self._outcome is _PENDING:
            self._error = asyncio.CancelledError()
            self._finish()
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(call)`` when the call finishes (at once if it has)."""
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        """The server's initial metadata (empty when the chain answered by itself)."""
        await self._settle()
        if isinstance(self._error, AioRpcError):
            return self._error.initial_metadata()
        real = self._real_call()
        return await real.initial_metadata() if real is not None else grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        """The server's trailing metadata; what the chain added when it answered by itself."""
        await self._settle()
        if isinstance(self._error, AioRpcError):
            return self._error.trailing_metadata()  # type: ignore[return-value]
        real = self._real_call()
        if real is not None:
            return await real.trailing_metadata()  # type: ignore[no-any-return]
        return grpc.aio.Metadata(*self._inv.trailers)

    async def code(self) -> grpc.StatusCode:
        """The call's status code."""
        await self._settle()
        error = self._error
        if isinstance(error, AioRpcError):
            return error.code()
        if self._cancelled:
            return grpc.StatusCode.CANCELLED
        if error is not None:
            return grpc.StatusCode.UNKNOWN
        real = self._real_call()
        return await real.code() if real is not None else grpc.StatusCode.OK

    async def details(self) -> str:
        """The call's status details."""
        await self._settle()
        if isinstance(self._error, AioRpcError):
            return self._error.details() or ""
        real = self._real_call()
        return (await real.details() or "") if real is not None else ""

    async def wait_for_connection(self) -> None:
        """Wait until the call is under way; raise its error if it failed first."""
        await self._start()
        real = self._real_call()
        if real is not None and self._inv.spec.response_streaming:
            await real.wait_for_connection()

    # grpc.aio request streaming, for callers that write() instead of passing an iterator

    async def write(self, request: Any) -> None:
        """Send one request message on a request-streaming call made without an iterator."""
        self._queue().put(request)

    async def done_writing(self) -> None:
        """End the request stream of a call made without an iterator."""
        self._queue().close()

    def _queue(self) -> RequestQueue:
        if not isinstance(self._request, RequestQueue):
            raise grpc.aio.UsageError(
                "write() and done_writing() need a call made without a request iterator"
            )
        return self._request


class _UnaryResponseCall(
    _OutboundCall, grpc.aio.UnaryUnaryCall[Any, Any], grpc.aio.StreamUnaryCall[Any, Any]
):
    """A call answered by one message: await it."""

    def __await__(self) -> Generator[Any, None, Any]:
        return self._start().__await__()


class _StreamResponseCall(
    _OutboundCall, grpc.aio.UnaryStreamCall[Any, Any], grpc.aio.StreamStreamCall[Any, Any]
):
    """A call answered by a stream: iterate it, or read() until ``grpc.aio.EOF``."""

    _reader: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._reader is None:
            self._reader = self._messages()
        return self._reader

    async def read(self) -> Any:
        """The next response message, or ``grpc.aio.EOF`` after the last."""
        try:
            return await self.__aiter__().__anext__()
        except StopAsyncIteration:
            return _EOF

    async def _messages(self) -> AsyncIterator[Any]:
        stream = await self._start()
        try:
            async for message in stream:
                yield message
        except BaseException as exc:
            self._fail(exc)
            mapped = self._error
            if mapped is not None and mapped is not exc:
                raise mapped from None
            raise
        self._finish()

    async def code(self) -> grpc.StatusCode:
        """The status once the stream has ended (like grpc, it waits for the end)."""
        await self._settle()
        real = self._real_call()
        if real is not None and self._error is None and not self._done:
            return await real.code()  # type: ignore[no-any-return]
        return await super().code()


class _MultiCallable:
    """What ``channel.unary_unary(...)`` and friends return: makes calls of one method.

    One ``__call__`` serves the four shapes; the subclasses below only give each shape its
    ``grpc.aio`` type, so stubs and type checkers see what they expect.
    """

    def __init__(self, runner: CallRunner, spec: MethodSpec) -> None:
        self._runner = runner
        self._spec = spec
        self._call_class = _StreamResponseCall if spec.response_streaming else _UnaryResponseCall

    def __call__(
        self,
        request: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        # ``request`` is the request iterator of a client-streaming method.
        return self._call_class(
            self._runner,
            self._spec,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )


class _UnaryUnaryMultiCallable(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    pass


class _StreamUnaryMultiCallable(_MultiCallable, grpc.aio.StreamUnaryMultiCallable[Any, Any]):
    pass


class _UnaryStreamMultiCallable(_MultiCallable, grpc.aio.UnaryStreamMultiCallable[Any, Any]):
    pass


class _StreamStreamMultiCallable(_MultiCallable, grpc.aio.StreamStreamMultiCallable[Any, Any]):
    pass


_MULTICALLABLES: dict[str, type[_MultiCallable]] = {
    "unary_unary": _UnaryUnaryMultiCallable,
    "unary_stream": _UnaryStreamMultiCallable,
    "stream_unary": _StreamUnaryMultiCallable,
    "stream_stream": _StreamStreamMultiCallable,
}


def make_multicallable(runner: CallRunner, spec: MethodSpec) -> Any:
    """What ``channel.unary_unary(...)`` and its siblings return for ``spec``."""
    return _MULTICALLABLES[spec.kind](runner, spec)
