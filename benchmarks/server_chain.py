"""Server chain overhead: the same servicer served bare, by tether's default chain (tracing at
100%, 1% and off), and with only opentelemetry-instrumentation-grpc's interceptor.

h2load drives unary calls from outside Python. Each variant runs in its own process; variants
alternate round by round, so slow and fast moments of this shared machine fall on all of them.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from benchmarks._common import Bar, Section, cpu_seconds, free_port, median_spread
from benchmarks._echo import SERVER_VARIANTS, generated, h2load, request_body

ORDER = ["bare", "tether-100", "tether-1", "tether-off", "instrumented"]


async def _start(variant: str, generated: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    port, metrics_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._echo",
        variant,
        str(port),
        str(metrics_port),
        str(generated),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise RuntimeError(f"{variant} server exited before serving")
            if line.strip() == "ready":
                break
    return proc, port, metrics_port


async def _ok_calls(metrics_port: int) -> float:
    """tether_server_calls_total{code="OK"} of a tether variant: checks grpc-status, which
    h2load (an HTTP/2 client) cannot read from the trailers."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tether_server_calls_total{") and 'code="OK"' in line
    )


async def measure(quick: bool) -> Section:
    calls = 400 if quick else 30_000
    rounds = 1 if quick else 5
    rates: dict[str, list[float]] = {v: [] for v in ORDER}
    cpu_us: dict[str, list[float]] = {v: [] for v in ORDER}
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        code = generated()
        body = Path(tmp) / "request.bin"
        body.write_bytes(request_body())
        for _ in range(rounds):
            for variant in ORDER:
                proc, port, metrics_port = await _start(variant, code)
                try:
                    await h2load(port, body, min(2000, calls))  # warm-up
                    before = cpu_seconds(proc.pid)
                    ok_before = await _ok_calls(metrics_port) if variant.startswith("tether") else 0
                    rate, _ = await h2load(port, body, calls)
                    used = cpu_seconds(proc.pid) - before
                    if variant.startswith("tether"):
                        ok = await _ok_calls(metrics_port) - ok_before
                        if ok != calls:
                            raise RuntimeError(f"{variant}: {ok:.0f} of {calls} ended OK")
                    rates[variant].append(rate)
                    cpu_us[variant].append(used / calls * 1e6)
                finally:
                    proc.terminate()
                    await proc.wait()
    bare = statistics.median(rates["bare"])
    ratio = {v: statistics.median(rates[v]) / bare for v in ORDER}
    rows = [
        (
            SERVER_VARIANTS[v],
            median_spread(rates[v]),
            f"{ratio[v]:.2f}",
            median_spread(cpu_us[v]),
        )
        for v in ORDER
    ]
    versus_instrumented = statistics.median(rates["tether-100"]) / statistics.median(
        rates["instrumented"]
    )
    return Section(
        title="Server chain overhead",
        method=(
            f"h2load (-c 4 -m 8 -t 1) sends {calls:,} unary echo.v1.Echo/Say calls per run to "
            f"a server process; {rounds} round(s), variants alternating; median (min-max) of "
            "the rounds. Tracing variants export through a batch processor to an exporter "
            "that drops the spans, the instrumentation's and tether's alike. h2load cannot "
            "read gRPC trailers: for tether's variants the server's own "
            "tether_server_calls_total{code=OK} must grow by exactly the calls sent. CPU is "
            "the server process's user+system time over the run. The load generator shares "
            "the machine's cores with the server."
        ),
        header=("server", "calls/s", "of bare", "CPU µs/call"),
        rows=rows,
        bars=[
            Bar(
                "tether at 100% tracing >= 0.75 of bare",
                f"{ratio['tether-100']:.2f}",
                ratio["tether-100"] >= 0.75,
            ),
            Bar(
                "tether at 1% tracing >= 0.90 of bare",
                f"{ratio['tether-1']:.2f}",
                ratio["tether-1"] >= 0.90,
            ),
            Bar(
                "tether at 100% >= 1.3x the instrumentation-only server",
                f"{versus_instrumented:.2f}x",
                versus_instrumented >= 1.3,
            ),
        ],
    )
