"""The Greeter servicer and the App that serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

import tether
from greeter.v1 import greeter_pb2, greeter_pb2_grpc

__all__ = ["GREETINGS", "GreeterServicer", "create_app"]

log = tether.get_logger("greeter")

#: One greeting per language, in the order SayHelloStream sends them.
GREETINGS: tuple[tuple[str, str], ...] = (("en", "Hello"), ("fr", "Bonjour"), ("es", "Hola"))

_Context = grpc.aio.ServicerContext[greeter_pb2.HelloRequest, greeter_pb2.HelloReply]


def _required_name(request: greeter_pb2.HelloRequest) -> str:
    name = request.name.strip()
    if not name:
        # The framework turns this into status INVALID_ARGUMENT with this message, at the edge.
        raise tether.InvalidArgument("name is required")
    return name


class GreeterServicer(greeter_pb2_grpc.GreeterServicer):
    """Greets people; nothing here knows about health, shutdown or logging set-up."""

    async def SayHello(  # noqa: N802 - the name is the RPC's
        self, request: greeter_pb2.HelloRequest, context: _Context
    ) -> greeter_pb2.HelloReply:
        name = _required_name(request)
        log.info("said hello", name=name)
        return greeter_pb2.HelloReply(message=f"Hello, {name}!")

    async def SayHelloStream(  # noqa: N802 - the name is the RPC's
        self, request: greeter_pb2.HelloRequest, context: _Context
    ) -> AsyncIterator[greeter_pb2.HelloReply]:
        name = _required_name(request)
        for language, greeting in GREETINGS:
            log.info("said hello", name=name, language=language)
            yield greeter_pb2.HelloReply(message=f"{greeting}, {name}!")


def create_app(config: tether.TetherConfig | None = None) -> tether.App:
    """Build the Greeter App.

    Args:
        config: the configuration; when None it is loaded from ``$TETHER_CONFIG``, else
            ``./tether.yaml``, with ``TETHER_*`` environment variables on top.

    Returns:
        An App serving ``greeter.v1.Greeter`` (plus health and reflection), not yet started.

    Raises:
        tether.ConfigError: the loaded configuration is invalid.
    """
    app = tether.App(config)
    app.add_servicer(greeter_pb2_grpc.add_GreeterServicer_to_server, GreeterServicer())
    return app
