"""The edge's Starlette app: HTTP requests become calls to orders through a tether client.

``TraceMiddleware`` reads the caller's ``traceparent`` from the HTTP headers and makes the
request's span current; the tether client chain then writes that context into the gRPC
metadata, so one trace runs from the HTTP caller through every gRPC hop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import tether
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tether.asgi import TraceMiddleware
from tether.registry import Registry, registry_from_config

from orders.v1 import orders_pb2, orders_pb2_grpc

__all__ = ["HTTP_STATUS", "create_edge"]

log = tether.get_logger("edge")

#: How a gRPC status reaches an HTTP caller.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _json(message: Any) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _error(exc: grpc.aio.AioRpcError) -> JSONResponse:
    status = HTTP_STATUS.get(exc.code(), 502)
    log.warning("orders call failed", code=exc.code().name, http_status=status)
    return JSONResponse({"error": exc.code().name, "message": exc.details()}, status_code=status)


def create_edge(config: tether.TetherConfig, *, registry: Registry | None = None) -> Starlette:
    """Build the edge: ``GET /quote``, ``POST /orders`` and ``GET /healthz``.

    Args:
        config: the edge's configuration (``service.name``, ``registry``, ``client``,
            ``tracing``); orders is found in the registry it names.
        registry: a registry to use instead (tests share a MemoryRegistry).
    """
    owned = registry is None
    found = registry if registry is not None else registry_from_config(config.registry)
    if found is None:
        raise tether.ConfigError(
            [
                tether.errors.ConfigProblem(
                    "registry.backend", "'none'", "the edge finds orders in a registry"
                )
            ]
        )
    tracing = tether.Tracing.for_service(
        config.tracing,
        service=config.service.name,
        version=config.service.version,
        instance_id=config.service.instance_id or config.service.name,
    )
    channel = tether.dial(
        "discovery:///orders", discovery=found, config=config.client, tracing=tracing
    )
    orders = orders_pb2_grpc.OrdersStub(channel)

    async def quote(request: Request) -> JSONResponse:
        params = request.query_params
        try:
            quantity = int(params.get("quantity", "1"))
        except ValueError:
            return JSONResponse(
                {"error": "INVALID_ARGUMENT", "message": "quantity must be an integer"},
                status_code=400,
            )
        try:
            reply = await orders.GetQuote(
                orders_pb2.GetQuoteRequest(
                    user_id=params.get("user", ""), sku=params.get("sku", ""), quantity=quantity
                )
            )
        except grpc.aio.AioRpcError as exc:
            return _error(exc)
        log.info("quote served", sku=reply.sku, degraded=list(reply.degraded_parts))
        return JSONResponse(_json(reply))

    async def place_order(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            order = orders_pb2.PlaceOrderRequest(
                order_id=str(body["order_id"]),
                user_id=str(body["user_id"]),
                sku=str(body["sku"]),
                quantity=int(body.get("quantity", 1)),
            )
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {
                    "error": "INVALID_ARGUMENT",
                    "message": "expected JSON with order_id, user_id, sku",
                },
                status_code=400,
            )
        try:
            reply = await orders.PlaceOrder(order)
        except grpc.aio.AioRpcError as exc:
            return _error(exc)
        log.info("order placed", order_id=reply.order_id)
        return JSONResponse(_json(reply), status_code=201)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await channel.close()
            if owned:
                await found.close()
            await tracing.shutdown()

    return Starlette(
        routes=[
            Route("/quote", quote, methods=["GET"]),
            Route("/orders", place_order, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        middleware=[Middleware(TraceMiddleware, tracing=tracing)],
        lifespan=lifespan,
    )
