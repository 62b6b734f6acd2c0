"""The breaker open: how fast a call fails locally, and how many calls a fallback answers."""

from __future__ import annotations

import contextlib
import time

from benchmarks._common import Bar, Section, free_port, percentile
from benchmarks._echo import generated


async def measure(quick: bool) -> Section:
    import grpc

    import tether
    from tether.config import ClientConfig

    calls = 500 if quick else 20_000
    generated()
    from echo.v1 import echo_pb2, echo_pb2_grpc

    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every call fails UNAVAILABLE
    config = ClientConfig.model_validate(
        {"retry": {"max_attempts": 1}, "breaker": {"fail_max": 3, "reset_timeout_seconds": 600}}
    )
    async with tether.dial(dead, service="echo", config=config) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        request = echo_pb2.SayRequest(text="x")
        for _ in range(3):  # open Say's breaker
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Say(request, timeout=2)
        latencies = []
        refused = 0
        for _ in range(calls):
            started = time.perf_counter()
            try:
                await stub.Say(request, timeout=2)
            except grpc.aio.AioRpcError as exc:
                refused += exc.code() is grpc.StatusCode.UNAVAILABLE
            latencies.append(time.perf_counter() - started)
        if refused != calls:
            raise RuntimeError(f"only {refused} of {calls} calls failed fast")
        # Lookup declares a fallback in the proto: with its breaker open, every call gets
        # the fallback's answer.
        for _ in range(3):
            await stub.Lookup(request, timeout=2)
        started = time.perf_counter()
        for _ in range(calls):
            reply = await stub.Lookup(request, timeout=2)
        fallback_rate = calls / (time.perf_counter() - started)
        if reply.text != "static":
            raise RuntimeError(f"the fallback answered {reply.text!r}")
    p50, p99 = percentile(latencies, 0.5) * 1e6, percentile(latencies, 0.99) * 1e6
    return Section(
        title="Breaker: fast failure and fallback",
        method=(
            f"A tether channel to an address nothing listens on; three failures open Say's "
            f"breaker, then {calls:,} calls are timed one by one as the caller sees them "
            "(await stub.Say ... AioRpcError UNAVAILABLE): the whole client chain, the breaker "
            f"refusing, the error mapped back. Then {calls:,} calls of Lookup, whose proto "
            "declares a fallback, answered by it with the breaker open. One process, one "
            "caller at a time."
        ),
        header=("measure", "value"),
        rows=[
            ("fast-fail latency p50", f"{p50:.0f} µs"),
            ("fast-fail latency p99", f"{p99:.0f} µs"),
            ("fallback answers per second (one caller)", f"{fallback_rate:,.0f}"),
        ],
        bars=[Bar("fast-fail p99 <= 100 µs with the breaker open", f"{p99:.0f} µs", p99 <= 100)],
    )
