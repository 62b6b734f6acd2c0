"""Inventory over real gRPC on loopback, and two instances found through a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
import pytest
import tether
from tether.testing import EtcdServer, eventually, loopback_config, running

from inventory.service import STARTING_STOCK, create_app
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

SERVICE = "inventory"
TIMEOUT = 5.0

Stub = pb_grpc.InventoryStub
# What Stub(channel) is on an asyncio channel, as tether's are: its methods are awaited. The
# class exists only in the generated .pyi, for type checkers, so it is named in quotes.
AsyncStub: TypeAlias = "pb_grpc.InventoryAsyncStub"


@pytest.fixture
async def stub() -> AsyncIterator[AsyncStub]:
    app = create_app(loopback_config(SERVICE))
    async with running(app), tether.dial(app.target) as channel:
        yield Stub(channel)


async def test_stock_is_counted_down_by_reservations(stub: AsyncStub) -> None:
    before = await stub.GetStock(pb.GetStockRequest(sku="book"), timeout=TIMEOUT)
    assert before.available == STARTING_STOCK["book"]
    reservation = await stub.Reserve(
        pb.ReserveRequest(order_id="o1", sku="book", quantity=3), timeout=TIMEOUT
    )
    assert (reservation.reservation_id, reservation.quantity) == ("r-o1", 3)
    after = await stub.GetStock(pb.GetStockRequest(sku="book"), timeout=TIMEOUT)
    assert after.available == STARTING_STOCK["book"] - 3


async def test_reserving_again_for_an_order_reserves_nothing_more(
    stub: AsyncStub,
) -> None:
    """Reserve is idempotent by order id, which is what makes retrying it safe."""
    request = pb.ReserveRequest(order_id="o2", sku="lamp", quantity=5)
    first = await stub.Reserve(request, timeout=TIMEOUT)
    again = await stub.Reserve(request, timeout=TIMEOUT)
    assert first == again
    stock = await stub.GetStock(pb.GetStockRequest(sku="lamp"), timeout=TIMEOUT)
    assert stock.available == STARTING_STOCK["lamp"] - 5


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.ReserveRequest(order_id="o3", sku="book", quantity=10**6), "FAILED_PRECONDITION"),
        (pb.ReserveRequest(order_id="o4", sku="piano", quantity=1), "NOT_FOUND"),
        (pb.ReserveRequest(order_id="", sku="book", quantity=1), "INVALID_ARGUMENT"),
    ],
    ids=["too-many", "unknown-sku", "no-order-id"],
)
async def test_bad_reservations_are_refused(
    stub: AsyncStub, request_: pb.ReserveRequest, code: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Reserve(request_, timeout=TIMEOUT)
    assert caught.value.code().name == code


async def test_calls_spread_over_two_instances_found_in_etcd(etcd: EtcdServer) -> None:
    registry = {"backend": "etcd", "endpoints": [etcd.endpoint], "ttl_seconds": 2}
    first = create_app(loopback_config(SERVICE, registry=registry))
    second = create_app(loopback_config(SERVICE, registry=registry))
    caller = tether.App(loopback_config("caller", registry=registry))
    async with running(first), running(second), running(caller):
        stub = caller.client(SERVICE, Stub)
        served: set[str] = set()

        async def both_answered() -> bool:
            stock = await stub.GetStock(pb.GetStockRequest(sku="mug"), timeout=TIMEOUT)
            served.add(stock.served_by)
            return len(served) == 2

        # Round robin alternates once the caller has seen both registrations.
        await eventually(both_answered, within=10, message="both instances answered")
    assert served == {first.instance_id, second.instance_id}
