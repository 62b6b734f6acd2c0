"""The Orders servicer (quotes and orders made from users and inventory) and its App.

Every outbound call goes through ``app.client``: discovered in the registry, balanced over the
instances, and governed by the client chain (deadline, fallback, breaker, limiter, retries).
``GetUser`` has a fallback declared in users' proto (a guest); ``GetStock`` has the code
fallback below (no stock known). ``Reserve`` has none: an order is never placed on a guess.
"""

from __future__ import annotations

import grpc
import tether
from tether.registry import Registry

from inventory.v1 import inventory_pb2, inventory_pb2_grpc
from orders.v1 import orders_pb2 as pb
from orders.v1 import orders_pb2_grpc as pb_grpc
from users.v1 import users_pb2, users_pb2_grpc

__all__ = ["PRICES_CENTS", "OrdersServicer", "create_app"]

log = tether.get_logger("orders")

_Context = grpc.aio.ServicerContext[object, object]

#: Unit prices; gold-tier users pay 10% less.
PRICES_CENTS: dict[str, int] = {"book": 1500, "lamp": 4200, "mug": 800}
GOLD_DISCOUNT = 0.9


def _price(sku: str, quantity: int, tier: str) -> int:
    unit = PRICES_CENTS.get(sku)
    if unit is None:
        raise tether.NotFound(f"no SKU {sku!r}")
    total = unit * quantity
    return round(total * GOLD_DISCOUNT) if tier == "gold" else total


class OrdersServicer(pb_grpc.OrdersServicer):
    """Quotes and places orders; holds no state of its own."""

    def __init__(
        self,
        # What app.client() makes of the *Stub classes: the async stubs, which exist only in
        # the generated .pyi (annotations are not evaluated at run time).
        users: users_pb2_grpc.UsersAsyncStub,
        inventory: inventory_pb2_grpc.InventoryAsyncStub,
    ) -> None:
        self._users = users
        self._inventory = inventory

    async def GetQuote(  # noqa: N802 - the name is the RPC's
        self, request: pb.GetQuoteRequest, context: _Context
    ) -> pb.Quote:
        quantity = request.quantity or 1
        user = await self._users.GetUser(users_pb2.GetUserRequest(id=request.user_id))
        stock = await self._inventory.GetStock(inventory_pb2.GetStockRequest(sku=request.sku))
        degraded = [name for name, part in (("users", user), ("inventory", stock)) if part.degraded]
        log.info("quoted", sku=request.sku, quantity=quantity, degraded=degraded)
        return pb.Quote(
            user_name=user.name,
            tier=user.tier,
            sku=request.sku,
            quantity=quantity,
            price_cents=_price(request.sku, quantity, user.tier),
            available=stock.available,
            degraded_parts=degraded,
            user_served_by=user.served_by,
            stock_served_by=stock.served_by,
        )

    async def PlaceOrder(  # noqa: N802 - the name is the RPC's
        self, request: pb.PlaceOrderRequest, context: _Context
    ) -> pb.Order:
        if not request.order_id or request.quantity <= 0:
            raise tether.InvalidArgument("order_id and a positive quantity are required")
        user = await self._users.GetUser(users_pb2.GetUserRequest(id=request.user_id))
        price = _price(request.sku, request.quantity, user.tier)
        reservation = await self._inventory.Reserve(
            inventory_pb2.ReserveRequest(
                order_id=request.order_id, sku=request.sku, quantity=request.quantity
            )
        )
        log.info("order placed", order_id=request.order_id, reserved_by=reservation.served_by)
        return pb.Order(
            order_id=request.order_id,
            user_name=user.name,
            sku=request.sku,
            quantity=request.quantity,
            price_cents=price,
            reservation_id=reservation.reservation_id,
            reserved_by=reservation.served_by,
        )


def create_app(
    config: tether.TetherConfig | None = None, *, registry: Registry | None = None
) -> tether.App:
    """Build the App serving ``orders.v1.Orders``, with clients of users and inventory.

    Args:
        config: the configuration; when None it is loaded from ``$TETHER_CONFIG``, else
            ``./tether.yaml``, with ``TETHER_*`` environment variables on top.
        registry: where to find users and inventory (tests share a MemoryRegistry); by default
            the one ``registry.backend`` names.
    """
    app = tether.App(config, registry=registry)

    @app.fallback("inventory.v1.Inventory/GetStock")
    def stock_unknown(
        request: inventory_pb2.GetStockRequest, error: tether.StatusError
    ) -> inventory_pb2.Stock:
        # Inventory cannot answer: quote without promising stock.
        return inventory_pb2.Stock(sku=request.sku, available=0, degraded=True)

    servicer = OrdersServicer(
        app.client("users", users_pb2_grpc.UsersStub),
        app.client("inventory", inventory_pb2_grpc.InventoryStub),
    )
    app.add_servicer(pb_grpc.add_OrdersServicer_to_server, servicer)
    return app
