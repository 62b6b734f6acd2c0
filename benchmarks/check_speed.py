"""How long `tether check` takes on a 10,000-line service (the bar: under a second).

Writes a service package of realistic modules (servicers, helpers, outbound calls, logging,
threads; one seeded finding in every tenth module) into a temporary directory, then measures:

- the static check in this process (``check_paths``);
- the whole command as a user runs it (``python -m tether.cli check``), interpreter start-up
  and imports included, and that start-up alone (``tether --version``).

Run alone: ``.venv/bin/python benchmarks/check_speed.py [LINES]`` prints the figures. As part of
the suite it is ``measure(quick)`` like the other benchmarks. It asserts nothing about time
(performance is measured here, not in tests); ``tests/unit/test_check_cli.py`` checks the same
corpus for correctness.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LINES = 10_000
BAR_SECONDS = 1.0

_MODULE = '''"""Service module {n}: the Orders{n} servicer and its helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import tether

from shop.v1 import orders_pb2 as pb
from shop.v1 import orders_pb2_grpc as pb_grpc
from shop.v1 import users_pb2, users_pb2_grpc

log = tether.get_logger("orders{n}")

_Context = grpc.aio.ServicerContext[object, object]

PRICES: dict[str, int] = {{"book": 1500, "lamp": 4200, "mug": 800}}


def _price(sku: str, quantity: int) -> int:
    unit = PRICES.get(sku)
    if unit is None:
        raise tether.NotFound(f"no SKU {{sku!r}}")
    return unit * quantity


def _checksum(items: list[str]) -> int:
    # Pure CPU work: runs on a worker thread, in the call's context.
    total = 0
    for item in items:
        for char in item:
            total = (total * 31 + ord(char)) % 1_000_003
    return total


class Orders{n}Servicer(pb_grpc.OrdersServicer):
    """Quotes and places orders."""

    def __init__(self, users: users_pb2_grpc.UsersStub) -> None:
        self._users = users
        self._orders: dict[str, pb.Order] = {{}}

    async def GetQuote(self, request: pb.GetQuoteRequest, context: _Context) -> pb.Quote:
        quantity = request.quantity or 1
        user = await self._users.GetUser(users_pb2.GetUserRequest(id=request.user_id))
        price = _price(request.sku, quantity)
        log.info("quoted", sku=request.sku, quantity=quantity, user_id=request.user_id)
        return pb.Quote(user_name=user.name, sku=request.sku, price_cents=price)

    async def PlaceOrder(self, request: pb.PlaceOrderRequest, context: _Context) -> pb.Order:
        if not request.order_id or request.quantity <= 0:
            raise tether.InvalidArgument("order_id and a positive quantity are required")
        earlier = self._orders.get(request.order_id)
        if earlier is not None:
            return earlier
        checksum = await tether.to_thread(_checksum, [request.order_id, request.sku])
        order = pb.Order(
            order_id=request.order_id,
            sku=request.sku,
            quantity=request.quantity,
            price_cents=_price(request.sku, request.quantity),
            checksum=checksum,
        )
        self._orders[request.order_id] = order
        log.info("order placed", order_id=request.order_id, checksum=checksum)
        return order

    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: _Context
    ) -> AsyncIterator[pb.Order]:
        for order_id in sorted(self._orders):
            await asyncio.sleep(0)
            yield self._orders[order_id]

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: _Context) -> pb.Order:
        order = self._orders.pop(request.order_id, None)
        if order is None:
            raise tether.NotFound(f"no order {{request.order_id!r}}")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, tether.in_context(_checksum), [order.order_id])
        log.warning("order cancelled", order_id=request.order_id)
        return order


def create_app(config: tether.TetherConfig | None = None) -> tether.App:
    """Build the App serving Orders{n}."""
    app = tether.App(config)
    users = app.client("users", users_pb2_grpc.UsersStub)
    app.add_servicer(pb_grpc.add_OrdersServicer_to_server, Orders{n}Servicer(users))
    return app
'''

_SEEDED = """

def debug_dump(orders: dict[str, object]) -> None:
    print(len(orders))
"""


def write_corpus(root: Path, lines: int = 10_000) -> tuple[int, int]:
    """Write a service package of about ``lines`` lines under ``root``.

    Returns:
        The lines written and the findings seeded (one TTH003 in every tenth module).
    """
    package = root / "shop"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""The shop."""\n')
    written = seeded = n = 0
    while written < lines:
        text = _MODULE.format(n=n)
        if n % 10 == 0:
            text += _SEEDED
            seeded += 1
        (package / f"orders_{n}.py").write_text(text)
        written += text.count("\n")
        n += 1
    return written, seeded


def _rounds(count: int, fn: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def figures(lines: int = LINES, rounds: int = 5) -> dict[str, Any]:
    """Seconds per round of the static check in process, of the whole command, and of start-up.

    Raises:
        AssertionError: the check did not find exactly the seeded findings.
    """
    from tether.check import check_paths

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        written, seeded = write_corpus(root, lines)
        found = check_paths([root])
        assert len(found) == seeded, f"expected {seeded} findings, got {len(found)}"
        command = [sys.executable, "-m", "tether.cli", "check", str(root)]
        version = [sys.executable, "-m", "tether.cli", "--version"]
        return {
            "lines": written,
            "findings": len(found),
            "in_process": _rounds(rounds + 2, lambda: check_paths([root])),
            "command": _rounds(rounds, lambda: subprocess.run(command, capture_output=True)),
            "startup": _rounds(rounds, lambda: subprocess.run(version, capture_output=True)),
        }


def _ms(samples: list[float]) -> str:
    median, low, high = (1000 * x for x in (statistics.median(samples), min(samples), max(samples)))
    return f"{median:.0f} ({low:.0f}-{high:.0f})"


async def measure(quick: bool) -> Any:
    """The suite's entry point: a ``benchmarks._common.Section`` with the one-second bar."""
    from benchmarks._common import Bar, Section

    got = await asyncio.to_thread(figures, 2_000 if quick else LINES, 1 if quick else 5)
    whole = statistics.median(got["command"])
    return Section(
        title="tether check",
        method=(
            f"`tether check` on a generated service of {got['lines']} lines ({got['findings']} "
            "seeded findings): the static check in process, the whole command in a new "
            "process (start-up and imports included), and that start-up alone "
            "(`tether --version`). Milliseconds, median (min-max) of the rounds."
        ),
        header=["what", "ms"],
        rows=[
            ["static check, in process", _ms(got["in_process"])],
            ["whole command", _ms(got["command"])],
            ["start-up alone", _ms(got["startup"])],
        ],
        bars=[
            Bar(
                text=f"tether check on {got['lines']} lines < {BAR_SECONDS:.0f} s (whole command)",
                measured=f"{whole:.2f} s",
                met=whole < BAR_SECONDS,
            )
        ],
    )


def main() -> None:
    got = figures(int(sys.argv[1]) if len(sys.argv) > 1 else LINES)
    print(
        f"tether check on {got['lines']} lines ({got['findings']} findings), ms median (min-max):"
    )
    print(f"  static check, in process:  {_ms(got['in_process'])}")
    print(f"  whole command:             {_ms(got['command'])}")
    print(f"  of which start-up:         {_ms(got['startup'])}  (`tether --version`)")


if __name__ == "__main__":
    main()
