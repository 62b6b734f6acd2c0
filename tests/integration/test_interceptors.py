"""The grpc.aio adapter, on a real server and channel over loopback, for all four call shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_status import rpc_status
from structlog.testing import capture_logs
from support.echo_service import build_app

import tether
from tether import CallContext, Handler, Side, current_call, use_call
from tether.testing import loopback_config, running

Req = echo_pb2.SayRequest


def recording(seen: list[CallContext], label: str = "") -> tether.Middleware:
    """A middleware that records the call context it runs under."""

    def middleware(handler: Handler) -> Handler:
        async def record(request: Any) -> Any:
            ctx = current_call()
            assert ctx is not None
            seen.append(ctx)
            return await handler(request)

        return record

    return middleware


async def _requests(*texts: str, fail: str = "") -> AsyncIterator[Any]:
    for text in texts:
        yield Req(text=text, fail=fail)


@pytest.fixture
async def echo_app() -> AsyncIterator[tether.App]:
    async with running(build_app(loopback_config("echo"))) as app:
        yield app


@pytest.fixture
async def stub(echo_app: tether.App) -> AsyncIterator[Any]:
    async with tether.dial(echo_app.target) as channel:
        yield echo_pb2_grpc.EchoStub(channel)


async def test_unary_unary_sees_server_context(stub: Any) -> None:
    """A unary call reaches the servicer with a server-side call context bound."""
    reply = await stub.Say(Req(text="hi"), metadata=(("x-user", "ada"),), timeout=5)
    assert reply.text == "hi"
    assert reply.seen["method"] == "/echo.v1.Echo/Say"
    assert reply.seen["service"] == "echo.v1.Echo"
    assert reply.seen["side"] == "server"
    assert reply.seen["deadline"] == "yes"
    assert reply.seen["x-user"] == "ada"


async def test_no_deadline_when_caller_sets_none(echo_app: tether.App) -> None:
    """A call without a timeout reaches the server with no deadline, not an invented one."""
    async with grpc.aio.insecure_channel(echo_app.target) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(Req(text="hi"))
    assert reply.seen["deadline"] == "no"


async def test_unary_stream(stub: Any) -> None:
    """A server-streaming call yields every message through the chain."""
    replies = [r.text async for r in stub.Split(Req(text="a b c"))]
    assert replies == ["a", "b", "c"]


async def test_stream_unary(stub: Any) -> None:
    """A client-streaming call hands the request iterator through the chain."""
    reply = await stub.Join(_requests("a", "b", "c"))
    assert reply.text == "a b c"
    assert reply.seen["method"] == "/echo.v1.Echo/Join"


async def test_stream_stream(stub: Any) -> None:
    """A bidi call streams both ways through the chain."""
    replies = [r.text async for r in stub.Chat(_requests("x", "y"))]
    assert replies == ["x", "y"]


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("Say", (False, False)),
        ("Split", (False, True)),
        ("Join", (True, False)),
        ("Chat", (True, True)),
    ],
)
async def test_server_chain_runs_for_every_shape(method: str, shape: tuple[bool, bool]) -> None:
    """Server middleware sees each call shape with the right streaming flags."""
    seen: list[CallContext] = []
    app = build_app(loopback_config("echo"))
    app.middleware = (tether.recover, recording(seen))
    async with running(app), tether.dial(app.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        call = getattr(stub, method)
        request: Any = _requests("a b") if shape[0] else Req(text="a b")
        if shape[1]:
            _ = [r async for r in call(request)]
        else:
            await call(request)
    assert [(c.request_streaming, c.response_streaming) for c in seen] == [shape]
    assert seen[0].side is Side.SERVER
    assert seen[0].method.method == method
    assert seen[0].peer is not None and "127.0.0.1" in seen[0].peer


@pytest.mark.parametrize("method", ["Say", "Split", "Join", "Chat"])
async def test_client_chain_runs_for_every_shape(echo_app: tether.App, method: str) -> None:
    """Client middleware sees each call shape, on the client side, once per call."""
    seen: list[CallContext] = []
    async with tether.dial(echo_app.target, middleware=[recording(seen)]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        call = getattr(stub, method)
        streaming_request = method in ("Join", "Chat")
        request: Any = _requests("a b") if streaming_request else Req(text="a b")
        if method in ("Split", "Chat"):
            texts = [r.text async for r in call(request)]
            assert texts
        else:
            await call(request)
    assert len(seen) == 1
    assert seen[0].side is Side.CLIENT
    assert seen[0].method.full == f"/echo.v1.Echo/{method}"
    assert seen[0].peer == echo_app.target


async def test_server_handlers_are_wrapped_once_per_method() -> None:
    """The server chain is composed on a method's first call, then reused for every call."""
    wrapped: list[int] = []

    def counting(handler: Handler) -> Handler:
        wrapped.append(1)
        return handler

    app = build_app(loopback_config("echo"))
    app.middleware = (counting,)
    async with running(app), tether.dial(app.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for _ in range(5):
            await stub.Say(Req(text="x"))
        for _ in range(3):
            _ = [r async for r in stub.Split(Req(text="a b"))]
    assert len(wrapped) == 2  # Say and Split, once each


async def test_client_middleware_changes_the_deadline(echo_app: tether.App) -> None:
    """A deadline a middleware sets is the one sent (the caller gave none)."""
    seen: list[float | None] = []

    def tighten(handler: Handler) -> Handler:
        async def tightened(request: Any) -> Any:
            ctx = current_call()
            assert ctx is not None
            seen.append(ctx.time_remaining())
            with use_call(ctx.replace(deadline=time.monotonic() + 0.2)):
                return await handler(request)

        return tightened

    async with tether.dial(echo_app.target, middleware=[tighten]) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Hold(Req(text="never released"))
        elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2, f"the 0.2 s deadline was not the one sent: took {elapsed:.2f} s"
    # No caller timeout and no deadline middleware in this chain: the chain sees none (the
    # terminal still sends client.timeout_seconds; see test_client_middleware_metadata...).
    assert seen == [None]


async def test_client_middleware_metadata_reaches_the_server(echo_app: tether.App) -> None:
    """Metadata a client middleware adds reaches the server, beside the caller's."""

    def stamp(handler: Handler) -> Handler:
        async def stamped(request: Any) -> Any:
            ctx = current_call()
            assert ctx is not None
            with use_call(ctx.with_metadata([("x-stamp", "1")])):
                return await handler(request)

        return stamped

    async with tether.dial(echo_app.target, middleware=[stamp]) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(
            Req(text="t"), metadata=(("x-user", "ada"),)
        )
    assert reply.seen["x-stamp"] == "1"
    assert reply.seen["x-user"] == "ada"
    assert reply.seen["deadline"] == "yes"


async def test_unexpected_exception_is_internal_without_internals(stub: Any) -> None:
    """An unexpected exception reaches the client as INTERNAL, generic message, and is logged."""
    with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Say(Req(text="x", fail="boom"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert "secret" not in str(err.value) and "/srv" not in str(err.value)
    [entry] = [e for e in logs if e["event"] == "handler raised"]
    assert entry["log_level"] == "error"
    assert isinstance(entry["exc_info"], Exception)
    assert "secret-internal-detail" in str(entry["exc_info"])


async def test_unexpected_exception_mid_stream_is_internal(stub: Any) -> None:
    """A failure after the first streamed message ends the stream with INTERNAL."""
    got = []
    with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as err:
        async for reply in stub.Split(Req(text="a b c", fail="boom")):
            got.append(reply.text)
    assert got == ["a"]
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert any(e["event"] == "handler raised" for e in logs)


async def test_status_error_keeps_its_code(stub: Any) -> None:
    """A StatusError raised by a handler reaches the client with its own code and message."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Say(Req(fail="not-found"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such thing"


async def test_rich_details_travel(stub: Any) -> None:
    """RetryInfo attached to ResourceExhausted arrives as grpc-status-details-bin."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Say(Req(fail="exhausted"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)
    assert status is not None
    from google.rpc import error_details_pb2

    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() == 1_500_000_000


async def test_servicer_abort_passes_through(stub: Any) -> None:
    """context.abort() in a servicer keeps its code; recovery does not turn it into INTERNAL."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Say(Req(fail="abort"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "aborted by servicer"


async def test_unimplemented_method_is_unimplemented(echo_app: tether.App) -> None:
    """A method the servicer left to the generated base class answers UNIMPLEMENTED."""

    class Partial(echo_pb2_grpc.EchoServicer):
        pass

    app = tether.App(loopback_config("partial"))
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, Partial())
    async with running(app), tether.dial(app.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Say(Req(text="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_client_middleware_error_reaches_caller_as_aio_error() -> None:
    """A StatusError raised by client middleware surfaces as AioRpcError, nothing sent."""
    served: list[CallContext] = []
    app = build_app(loopback_config("echo"))
    app.middleware = (recording(served),)

    def refuse(handler: Handler) -> Handler:
        async def refused(request: Any) -> Any:
            raise tether.ResourceExhausted("local limit")

        return refused

    async with running(app), tether.dial(app.target, middleware=[refuse]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(text="x"))
        assert served == []
        async with tether.dial(app.target) as plain:
            await echo_pb2_grpc.EchoStub(plain).Say(Req(text="y"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == "local limit"
    assert len(served) == 1  # the recorder works: only the refused call never arrived


async def test_client_chain_sees_remote_status_as_remote_error(
    stub: Any, echo_app: tether.App
) -> None:
    """Inside the client chain a peer's failure is a RemoteError carrying the code."""
    caught: list[tether.RemoteError] = []

    def observe(handler: Handler) -> Handler:
        async def observed(request: Any) -> Any:
            try:
                return await handler(request)
            except tether.RemoteError as exc:
                caught.append(exc)
                raise

        return observed

    async with tether.dial(echo_app.target, middleware=[observe]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Say(Req(fail="not-found"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [e.code for e in caught] == [grpc.StatusCode.NOT_FOUND]


async def test_client_middleware_can_replace_the_response(echo_app: tether.App) -> None:
    """A client middleware may answer with its own message of the method's type."""

    def substitute(handler: Handler) -> Handler:
        async def substituted(request: Any) -> Any:
            return echo_pb2.SayReply(text="from middleware")

        return substituted

    async with tether.dial(echo_app.target, middleware=[substitute]) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(Req(text="x"))
    assert reply.text == "from middleware"


async def test_caller_keeps_call_metadata_when_response_untouched(stub: Any) -> None:
    """When no middleware replaced the response, the caller still reads the real call's status."""
    call = stub.Say(Req(text="x"))
    await call
    assert await call.code() == grpc.StatusCode.OK
    assert await call.initial_metadata() is not None


async def test_outbound_call_inside_handler_has_parent(echo_app: tether.App) -> None:
    """A call made while serving carries the inbound call as its parent."""
    seen: list[CallContext] = []
    inbound = CallContext(method=tether.MethodName.parse("/a.B/C"), side=Side.SERVER)
    async with tether.dial(echo_app.target, middleware=[recording(seen)]) as channel:
        with use_call(inbound):
            await echo_pb2_grpc.EchoStub(channel).Say(Req(text="x"))
    assert seen[0].parent is inbound


async def test_health_is_served_without_the_chain(echo_app: tether.App) -> None:
    """Health checks bypass the server chain and answer SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with tether.dial(echo_app.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="echo.v1.Echo")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_method_is_unimplemented(echo_app: tether.App) -> None:
    """A method no servicer serves answers UNIMPLEMENTED and is not cached."""
    async with tether.dial(echo_app.target) as channel:
        call = channel.unary_unary("/nope.v1.Nope/Nothing")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/nope.v1.Nope/Nothing" not in echo_app._interceptor._handlers  # type: ignore[union-attr]


class WriterServicer(echo_pb2_grpc.EchoServicer):
    """Streams with context.write() from a coroutine instead of yielding."""

    async def Split(self, request: Any, context: Any) -> None:  # noqa: N802
        for word in request.text.split():
            await context.write(echo_pb2.SayReply(text=word))


class SyncGeneratorServicer(echo_pb2_grpc.EchoServicer):
    """Streams from a plain (non-async) generator."""

    def Split(self, request: Any, context: Any) -> Any:  # noqa: N802
        for word in request.text.split():
            yield echo_pb2.SayReply(text=word)


@pytest.mark.parametrize("servicer", [WriterServicer, SyncGeneratorServicer])
async def test_other_streaming_styles_go_through_the_chain(servicer: type) -> None:
    """context.write() coroutines and plain generators stream through the chain too."""
    seen: list[CallContext] = []
    app = tether.App(loopback_config("styles"), middleware=[tether.recover, recording(seen)])
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer())
    async with running(app), tether.dial(app.target) as channel:
        replies = [r.text async for r in echo_pb2_grpc.EchoStub(channel).Split(Req(text="a b c"))]
    assert replies == ["a", "b", "c"]
    assert len(seen) == 1 and seen[0].response_streaming
