"""The Greeter served in-process on loopback and called through a tether channel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from greeter.service import GREETINGS, create_app
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tether
from tether.testing import loopback_config, running

TIMEOUT = 5.0  # every call is bounded; a healthy run needs milliseconds


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async with (
        running(create_app(loopback_config("greeter"))) as app,
        tether.dial(app.target) as channel,
    ):
        yield channel


@pytest.fixture
def greeter(channel: grpc.aio.Channel) -> greeter_pb2_grpc.GreeterAsyncStub:
    # GreeterAsyncStub, what GreeterStub(channel) is on an aio channel, exists only for type
    # checkers (in the generated .pyi); annotations are not evaluated at run time.
    return greeter_pb2_grpc.GreeterStub(channel)


async def test_say_hello_greets_by_name(greeter: greeter_pb2_grpc.GreeterAsyncStub) -> None:
    """SayHello answers with a greeting naming the caller."""
    reply = await greeter.SayHello(greeter_pb2.HelloRequest(name="Ada"), timeout=TIMEOUT)
    assert reply.message == "Hello, Ada!"


async def test_say_hello_stream_sends_one_reply_per_language(
    greeter: greeter_pb2_grpc.GreeterAsyncStub,
) -> None:
    """SayHelloStream sends one greeting per known language, in order."""
    call = greeter.SayHelloStream(greeter_pb2.HelloRequest(name="Ada"), timeout=TIMEOUT)
    messages = [reply.message async for reply in call]
    assert messages == [f"{greeting}, Ada!" for _, greeting in GREETINGS]
    assert len(messages) == 3


@pytest.mark.parametrize("name", ["", "   "])
async def test_say_hello_without_name_is_invalid_argument(
    greeter: greeter_pb2_grpc.GreeterAsyncStub, name: str
) -> None:
    """An empty (or blank) name comes back as INVALID_ARGUMENT with a message, not INTERNAL."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.SayHello(greeter_pb2.HelloRequest(name=name), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "name is required"


async def test_say_hello_stream_without_name_is_invalid_argument(
    greeter: greeter_pb2_grpc.GreeterAsyncStub,
) -> None:
    """The stream refuses an empty name before sending anything."""
    call = greeter.SayHelloStream(greeter_pb2.HelloRequest(name=""), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_reports_greeter_serving(channel: grpc.aio.Channel) -> None:
    """Health says SERVING for the Greeter service and for the server as a whole."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("greeter.v1.Greeter", ""):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
