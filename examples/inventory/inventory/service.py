"""The Inventory servicer (stock and reservations, in memory) and the App that serves it.

Each instance keeps its own stock: the example is about governance, not about a shared store.
"""

from __future__ import annotations

import grpc
import tether

from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

__all__ = ["STARTING_STOCK", "InventoryServicer", "create_app"]

log = tether.get_logger("inventory")

_Context = grpc.aio.ServicerContext[object, object]

#: Units per SKU each instance starts with.
STARTING_STOCK: dict[str, int] = {"book": 1000, "lamp": 500, "mug": 2000}


class InventoryServicer(pb_grpc.InventoryServicer):
    """Counts stock down as orders reserve it; one reservation per order id."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._stock = dict(STARTING_STOCK)
        self._reservations: dict[str, pb.Reservation] = {}

    def _available(self, sku: str) -> int:
        available = self._stock.get(sku)
        if available is None:
            raise tether.NotFound(f"no SKU {sku!r}")
        return available

    async def GetStock(  # noqa: N802 - the name is the RPC's
        self, request: pb.GetStockRequest, context: _Context
    ) -> pb.Stock:
        available = self._available(request.sku)
        log.info("stock read", sku=request.sku, available=available)
        return pb.Stock(sku=request.sku, available=available, served_by=self.instance)

    async def Reserve(  # noqa: N802 - the name is the RPC's
        self, request: pb.ReserveRequest, context: _Context
    ) -> pb.Reservation:
        if not request.order_id or request.quantity <= 0:
            raise tether.InvalidArgument("order_id and a positive quantity are required")
        earlier = self._reservations.get(request.order_id)
        if earlier is not None:
            return earlier  # a retry of a reservation already made
        available = self._available(request.sku)
        if available < request.quantity:
            raise tether.FailedPrecondition(
                f"only {available} of {request.sku!r} left, {request.quantity} asked"
            )
        self._stock[request.sku] = available - request.quantity
        reservation = pb.Reservation(
            reservation_id=f"r-{request.order_id}",
            order_id=request.order_id,
            sku=request.sku,
            quantity=request.quantity,
            served_by=self.instance,
        )
        self._reservations[request.order_id] = reservation
        log.info("reserved", order_id=request.order_id, sku=request.sku, quantity=request.quantity)
        return reservation


def create_app(config: tether.TetherConfig | None = None) -> tether.App:
    """Build the App serving ``inventory.v1.Inventory``."""
    app = tether.App(config)
    app.add_servicer(pb_grpc.add_InventoryServicer_to_server, InventoryServicer(app.instance_id))
    return app
