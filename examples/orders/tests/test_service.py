"""Orders over real gRPC on loopback, with users and inventory as small stand-in servers.

The stand-ins implement the same protos (vendored in proto/users and proto/inventory) and are
found through a shared in-memory registry; examples/demo.py runs the real services together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import tether
from tether.registry import MemoryRegistry
from tether.testing import loopback_config, running

from inventory.v1 import inventory_pb2, inventory_pb2_grpc
from orders.service import PRICES_CENTS, create_app
from orders.v1 import orders_pb2 as pb
from orders.v1 import orders_pb2_grpc as pb_grpc
from users.v1 import users_pb2, users_pb2_grpc

TIMEOUT = 5.0


class StandInUsers(users_pb2_grpc.UsersServicer):
    failing = False

    async def GetUser(self, request: users_pb2.GetUserRequest, context: object) -> users_pb2.User:  # noqa: N802
        if self.failing:
            raise tether.Unavailable("down")
        return users_pb2.User(id=request.id, name="Ada", tier="gold", served_by="users-test")


class StandInInventory(inventory_pb2_grpc.InventoryServicer):
    failing = False

    async def GetStock(  # noqa: N802
        self, request: inventory_pb2.GetStockRequest, context: object
    ) -> inventory_pb2.Stock:
        if self.failing:
            raise tether.Unavailable("down")
        return inventory_pb2.Stock(sku=request.sku, available=7, served_by="inventory-test")

    async def Reserve(  # noqa: N802
        self, request: inventory_pb2.ReserveRequest, context: object
    ) -> inventory_pb2.Reservation:
        if self.failing:
            raise tether.Unavailable("down")
        return inventory_pb2.Reservation(
            reservation_id=f"r-{request.order_id}",
            order_id=request.order_id,
            sku=request.sku,
            quantity=request.quantity,
            served_by="inventory-test",
        )


@dataclass
class Shop:
    orders: pb_grpc.OrdersAsyncStub  # what OrdersStub(channel) is on tether's aio channel
    users: StandInUsers
    inventory: StandInInventory


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    registry = MemoryRegistry()
    users, inventory = StandInUsers(), StandInInventory()
    users_app = tether.App(loopback_config("users"), registry=registry)
    users_app.add_servicer(users_pb2_grpc.add_UsersServicer_to_server, users)
    inventory_app = tether.App(loopback_config("inventory"), registry=registry)
    inventory_app.add_servicer(inventory_pb2_grpc.add_InventoryServicer_to_server, inventory)
    # No retries, so a failing stand-in fails each call once and the tests stay quick.
    orders_app = create_app(
        loopback_config("orders", client={"retry": {"max_attempts": 1}}), registry=registry
    )
    async with (
        running(users_app),
        running(inventory_app),
        running(orders_app),
        tether.dial(orders_app.target) as channel,
    ):
        yield Shop(pb_grpc.OrdersStub(channel), users, inventory)


async def test_a_quote_prices_with_the_users_tier_and_shows_the_stock(shop: Shop) -> None:
    quote = await shop.orders.GetQuote(
        pb.GetQuoteRequest(user_id="u1", sku="book", quantity=2), timeout=TIMEOUT
    )
    assert quote.price_cents == round(PRICES_CENTS["book"] * 2 * 0.9)  # gold: 10% off
    assert (quote.user_name, quote.available) == ("Ada", 7)
    assert (quote.user_served_by, quote.stock_served_by) == ("users-test", "inventory-test")
    assert list(quote.degraded_parts) == []


async def test_a_quote_survives_users_failing_with_the_declared_guest(shop: Shop) -> None:
    shop.users.failing = True
    quote = await shop.orders.GetQuote(
        pb.GetQuoteRequest(user_id="u1", sku="book", quantity=2), timeout=TIMEOUT
    )
    assert (quote.user_name, quote.tier) == ("guest", "standard")
    assert quote.price_cents == PRICES_CENTS["book"] * 2  # no discount for a guest
    assert list(quote.degraded_parts) == ["users"]


async def test_a_quote_survives_inventory_failing_with_the_code_fallback(shop: Shop) -> None:
    shop.inventory.failing = True
    quote = await shop.orders.GetQuote(pb.GetQuoteRequest(user_id="u1", sku="mug"), timeout=TIMEOUT)
    assert (quote.available, list(quote.degraded_parts)) == (0, ["inventory"])


async def test_an_order_reserves_stock(shop: Shop) -> None:
    order = await shop.orders.PlaceOrder(
        pb.PlaceOrderRequest(order_id="o1", user_id="u1", sku="lamp", quantity=1),
        timeout=TIMEOUT,
    )
    assert (order.reservation_id, order.reserved_by) == ("r-o1", "inventory-test")
    assert order.price_cents == round(PRICES_CENTS["lamp"] * 0.9)


async def test_an_order_is_never_placed_on_a_guess(shop: Shop) -> None:
    """Reserve has no fallback: inventory failing fails the order with its status."""
    shop.inventory.failing = True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await shop.orders.PlaceOrder(
            pb.PlaceOrderRequest(order_id="o2", user_id="u1", sku="lamp", quantity=1),
            timeout=TIMEOUT,
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_the_vendored_protos_match_the_services_own() -> None:
    """orders compiles copies of users' and inventory's protos: they must not drift."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[1]
    examples = here.parent
    for name in ("users", "inventory"):
        vendored = here / "proto" / name / "v1" / f"{name}.proto"
        own = examples / name / "proto" / name / "v1" / f"{name}.proto"
        if own.exists():  # inside the tether repository; a standalone copy has only its own
            assert vendored.read_text() == own.read_text(), f"{vendored} differs from {own}"
