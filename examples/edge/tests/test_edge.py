"""The edge over in-process HTTP (httpx's ASGI transport), calling a stand-in orders server on
loopback found through an in-memory registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import tether
from opentelemetry import trace
from tether.registry import MemoryRegistry
from tether.testing import loopback_config, running

from edge.app import create_edge
from orders.v1 import orders_pb2, orders_pb2_grpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class StandInOrders(orders_pb2_grpc.OrdersServicer):
    """Answers quotes; remembers the trace id each call arrived with."""

    trace_ids: list[str] = field(default_factory=list)

    async def GetQuote(  # noqa: N802
        self, request: orders_pb2.GetQuoteRequest, context: object
    ) -> orders_pb2.Quote:
        self.trace_ids.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        if request.sku == "piano":
            raise tether.NotFound("no SKU 'piano'")
        return orders_pb2.Quote(
            user_name="Ada", sku=request.sku, quantity=request.quantity, price_cents=1350
        )

    async def PlaceOrder(  # noqa: N802
        self, request: orders_pb2.PlaceOrderRequest, context: object
    ) -> orders_pb2.Order:
        raise tether.FailedPrecondition("only 0 of 'lamp' left")


@dataclass
class Edge:
    http: httpx.AsyncClient
    orders: StandInOrders


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    registry = MemoryRegistry()
    orders = StandInOrders()
    orders_app = tether.App(loopback_config("orders"), registry=registry)
    orders_app.add_servicer(orders_pb2_grpc.add_OrdersServicer_to_server, orders)
    app = create_edge(loopback_config("edge"), registry=registry)
    transport = httpx.ASGITransport(app=app)
    async with (
        running(orders_app),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://edge") as http,
    ):
        yield Edge(http, orders)


async def test_a_quote_comes_back_as_json(edge: Edge) -> None:
    response = await edge.http.get("/quote", params={"user": "u1", "sku": "book", "quantity": 2})
    assert response.status_code == 200
    body = response.json()
    assert (body["user_name"], body["sku"], body["quantity"]) == ("Ada", "book", "2")
    assert body["price_cents"] == "1350"  # int64 travels as a string in JSON, as proto3 says


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error"),
    [
        ("GET", "/quote", {"params": {"sku": "piano"}}, 404, "NOT_FOUND"),
        ("GET", "/quote", {"params": {"quantity": "two"}}, 400, "INVALID_ARGUMENT"),
        ("POST", "/orders", {"content": b"not json"}, 400, "INVALID_ARGUMENT"),
        (
            "POST",
            "/orders",
            {"json": {"order_id": "o1", "user_id": "u1", "sku": "lamp"}},
            409,
            "FAILED_PRECONDITION",
        ),
    ],
    ids=["not-found", "bad-quantity", "bad-json", "no-stock"],
)
async def test_errors_map_to_http_statuses(
    edge: Edge, method: str, path: str, kwargs: dict[str, object], status: int, error: str
) -> None:
    response = await edge.http.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert (response.status_code, response.json()["error"]) == (status, error)


async def test_the_callers_traceparent_reaches_orders(edge: Edge) -> None:
    """HTTP headers and gRPC metadata agree: the trace the HTTP caller started continues."""
    response = await edge.http.get(
        "/quote", params={"sku": "mug"}, headers={"traceparent": TRACEPARENT}
    )
    assert response.status_code == 200
    assert edge.orders.trace_ids == [TRACE_ID]


async def test_without_a_traceparent_the_edge_starts_a_trace(edge: Edge) -> None:
    await edge.http.get("/quote", params={"sku": "mug"})
    [trace_id] = edge.orders.trace_ids
    assert trace_id not in ("0" * 32, TRACE_ID)
