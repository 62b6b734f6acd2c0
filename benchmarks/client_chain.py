"""Client chain overhead: CPU per call through a tether channel (discovery, balancing, deadline,
breaker, limiter, retry budget, tracing at 1%) against a bare grpc.aio stub, same server."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Bar, Section, free_port, median_spread
from benchmarks._echo import NullExporter, generated

CONCURRENCY = 16


async def _calls(stub: Any, request: Any, count: int) -> float:
    """CPU seconds this process spends making ``count`` calls, ``CONCURRENCY`` at a time."""

    async def caller(n: int) -> None:
        for _ in range(n):
            await stub.Say(request, timeout=5)

    started = time.process_time()
    await asyncio.gather(*(caller(count // CONCURRENCY) for _ in range(CONCURRENCY)))
    return time.process_time() - started


async def measure(quick: bool) -> Section:
    import grpc

    import tether
    from tether.config import ClientConfig
    from tether.registry import Instance, MemoryRegistry

    calls = 320 if quick else 16_000
    rounds = 1 if quick else 5
    per_call: dict[str, list[float]] = {"bare": [], "tether": []}
    code = generated()
    from echo.v1 import echo_pb2, echo_pb2_grpc

    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._echo",
        "bare",
        str(port),
        "0",
        str(code),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert server.stdout is not None
        async with asyncio.timeout(60):
            while (await server.stdout.readline()).strip() != b"ready":
                pass
        target = f"127.0.0.1:{port}"
        registry = MemoryRegistry()
        await registry.register(Instance(id="echo-1", service="echo", address=target))
        config = ClientConfig.model_validate(
            {"services": {"echo": {"limiter": {"rate": 1_000_000, "burst": 1_000_000}}}}
        )
        tracing = tether.Tracing(
            tether.TetherConfig(
                service={"name": "bench"}, tracing={"enabled": True, "sample_ratio": 0.01}
            ).tracing,
            exporter=NullExporter(),
            batch=True,
        )
        request = echo_pb2.SayRequest(text="hello")
        async with (
            grpc.aio.insecure_channel(target) as bare,
            tether.dial(
                "discovery:///echo", discovery=registry, config=config, tracing=tracing
            ) as governed,
        ):
            stubs = {
                "bare": echo_pb2_grpc.EchoStub(bare),
                "tether": echo_pb2_grpc.EchoStub(governed),
            }
            for stub in stubs.values():
                await _calls(stub, request, CONCURRENCY * 20)  # warm-up
            for _ in range(rounds):
                for name, stub in stubs.items():
                    used = await _calls(stub, request, calls)
                    per_call[name].append(used / calls * 1e6)
        await tracing.shutdown()
    finally:
        server.terminate()
        await server.wait()
    ratio = statistics.median(per_call["tether"]) / statistics.median(per_call["bare"])
    return Section(
        title="Client chain overhead",
        method=(
            f"{calls:,} unary calls per round, {CONCURRENCY} at a time, from this process to a "
            "bare grpc.aio echo server in another; CPU is this process's user+system time "
            f"(time.process_time, all its threads) per call; {rounds} round(s), bare and tether "
            "alternating. The tether channel finds the server through a MemoryRegistry "
            "(discovery:///echo), balances, and runs the default client chain: deadline, "
            "fallback lookup, breaker, limiter (set far above the load), retry budget, and "
            "tracing at 1% to a batch processor that drops the spans."
        ),
        header=("client", "CPU µs/call", "of bare"),
        rows=[
            ("bare grpc.aio stub", median_spread(per_call["bare"]), "1.00"),
            ("tether channel", median_spread(per_call["tether"]), f"{ratio:.2f}"),
        ],
        bars=[Bar("tether client <= 1.3x bare CPU per call", f"{ratio:.2f}x", ratio <= 1.3)],
    )
