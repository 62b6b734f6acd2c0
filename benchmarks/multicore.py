"""Multi-core serving: one worker against two (``server.workers``) sharing the port.

The same trivial servicer (``echo.v1.Echo/Say``) is served by ``App.run()`` with tether's
default server chain, as one worker and as two; h2load drives each from outside Python, the
two alternating round by round. A server group is ``python -m benchmarks.multicore serve PORT
METRICS_PORT WORKERS GENERATED_DIR``; each worker prints ``ready PID`` once serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks._common import Bar, Section, cpu_seconds, free_port, median_spread
from benchmarks._echo import generated, h2load, request_body

ROOT = Path(__file__).resolve().parents[1]
#: Variant -> (workers, CPUs the group is pinned to, or None); "1/1 core" is the second figure.
VARIANTS: dict[str, tuple[int, str | None]] = {
    "1": (1, None),
    "2": (2, None),
    "1 on 1 core": (1, str((os.cpu_count() or 1) - 1)),
}
CONNECTIONS = 32  # SO_REUSEPORT spreads connections, not calls: enough for an even split
STREAMS = 4  # concurrent calls per connection


@dataclass
class _Group:
    """A running server group: its parent process, ports, and its workers' pids."""

    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    workers: int
    pids: list[int] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, workers: int, pin: str | None, code: Path) -> _Group:
        group = cls(
            await asyncio.create_subprocess_exec(
                *(["taskset", "-c", pin] if pin is not None else []),
                sys.executable,
                "-m",
                "benchmarks.multicore",
                "serve",
                str(port := free_port()),
                str(metrics_port := _free_ports(workers)),
                str(workers),
                str(code),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT,
            ),
            port,
            metrics_port,
            workers,
        )
        assert group.proc.stdout is not None
        try:
            async with asyncio.timeout(60):
                while len(group.pids) < workers:
                    line = (await group.proc.stdout.readline()).decode()
                    if not line:
                        raise RuntimeError(f"{workers}-worker server exited before serving")
                    if line.startswith("ready "):
                        group.pids.append(int(line.split()[1]))
        except BaseException:
            await group.stop()
            raise
        group.drain = asyncio.ensure_future(group.proc.stdout.read())  # never let it block
        return group

    async def ok_calls(self) -> tuple[float, ...]:
        """Each worker's tether_server_calls_total{code="OK"}: h2load cannot read trailers,
        so this is how every call is checked to have ended with grpc-status 0."""
        counts = []
        async with httpx.AsyncClient(timeout=10) as http:
            for k in range(self.workers):
                text = (await http.get(f"http://127.0.0.1:{self.metrics_port + k}/metrics")).text
                counts.append(
                    sum(
                        float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith("tether_server_calls_total{") and 'code="OK"' in line
                    )
                )
        return tuple(counts)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)  # the parent stops its workers
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.drain is not None:
            await self.drain


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (worker k serves metrics on it + k)."""
    for _ in range(100):
        first = free_port()
        if first + count - 1 > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for k in range(count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", first + k))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found")


@dataclass
class _Run:
    rate: float  # calls/s
    server_us: float  # the workers' CPU µs per call
    h2load_us: float  # h2load's CPU µs per call
    busiest: float  # the busiest worker's share of the calls


async def _drive(port: int, body: Path, calls: int) -> tuple[float, float]:
    return await h2load(port, body, calls, connections=CONNECTIONS, streams=STREAMS)


async def _run(group: _Group, body: Path, calls: int) -> _Run:
    before, cpu_before = await group.ok_calls(), group.cpu()
    rate, h2load_cpu = await h2load(
        group.port, body, calls, connections=CONNECTIONS, streams=STREAMS
    )
    cpu_used = group.cpu() - cpu_before
    served = [after - b for after, b in zip(await group.ok_calls(), before, strict=True)]
    if sum(served) != calls:
        raise RuntimeError(f"{group.workers} worker(s): {sum(served):.0f} of {calls} ended OK")
    return _Run(rate, cpu_used / calls * 1e6, h2load_cpu / calls * 1e6, max(served) / calls)


async def measure(quick: bool) -> Section:
    calls = 400 if quick else 25_000  # about 5 s per run here
    rounds = 1 if quick else 4
    runs: dict[str, list[_Run]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        code = generated()
        body = Path(tmp) / "request.bin"
        body.write_bytes(request_body())
        groups: dict[str, _Group] = {}
        try:
            for name, (workers, pin) in VARIANTS.items():
                groups[name] = await _Group.start(workers, pin, code)
                await h2load(
                    groups[name].port,
                    body,
                    min(4000, calls),
                    connections=CONNECTIONS,
                    streams=STREAMS,
                )  # warm-up
            for _ in range(rounds):
                for name in VARIANTS:
                    runs[name].append(await _run(groups[name], body, calls))
        finally:
            for group in groups.values():
                await group.stop()
    rates = {name: [run.rate for run in runs[name]] for name in VARIANTS}
    one = statistics.median(rates["1"])
    ratio = statistics.median(rates["2"]) / one
    per_round = [two / single for single, two in zip(rates["1"], rates["2"], strict=True)]
    pinned = VARIANTS["1 on 1 core"][1]
    cores = os.cpu_count()
    busy = {
        name: statistics.median(
            run.rate * (run.server_us + run.h2load_us) / 1e6 for run in runs[name]
        )
        for name in VARIANTS
    }
    return Section(
        title="Multi-core serving",
        method=(
            f"App.run() serves echo.v1.Echo/Say with tether's default server chain (metrics "
            f"on, tracing off, logging at warning) as 1 worker and as 2 (server.workers, "
            f"SO_REUSEPORT). h2load (-c {CONNECTIONS} -m {STREAMS} -t 1) sends {calls:,} unary "
            f"calls per run; {rounds} round(s), the variants alternating, every group started "
            "once and warmed up; median (min-max) of the rounds. Every call is checked to "
            "have ended OK: the workers' tether_server_calls_total{code=OK} must grow by "
            "exactly the calls sent (h2load cannot read trailers). CPU is the workers' "
            "user+system time, and h2load's. The load generator runs on the same "
            f"{cores} cores as the workers and takes CPU they would use, which caps the "
            f"ratio below 2x. A second figure: one worker pinned (taskset) to CPU {pinned}, "
            "that is one worker given exactly one core, h2load free to use the other."
        ),
        header=(
            "workers",
            "calls/s",
            "vs 1 worker",
            "server CPU µs/call",
            "h2load CPU µs/call",
            "cores busy",
        ),
        rows=[
            (
                name,
                median_spread(rates[name]),
                f"{statistics.median(rates[name]) / one:.2f}x",
                median_spread([run.server_us for run in runs[name]]),
                median_spread([run.h2load_us for run in runs[name]]),
                f"{busy[name]:.2f}",
            )
            for name in VARIANTS
        ],
        bars=[
            Bar(
                "2 workers on 2 cores >= 1.6x one worker's throughput",
                f"{ratio:.2f}x",
                ratio >= 1.6,
            )
        ],
        notes=[
            f"Ratio per round: {', '.join(f'{r:.2f}x' for r in per_round)}; against one "
            f"worker on one core: "
            f"{statistics.median(rates['2']) / statistics.median(rates['1 on 1 core']):.2f}x.",
            "One worker is not one core: gRPC's C-core threads (polling, I/O) run outside "
            "the GIL, so one worker alone already keeps more than a core busy ('cores busy' "
            "counts server and h2load CPU per second of the run).",
            "SO_REUSEPORT balances connections by a hash, not calls; with a fixed number of "
            "calls per connection the busier worker sets the run's length. The busier "
            "worker's share of calls per 2-worker round: "
            + ", ".join(f"{run.busiest:.0%}" for run in runs["2"])
            + " (50% is an even split).",
        ],
    )


def _serve(port: int, metrics_port: int, workers: int) -> None:
    from echo.v1 import echo_pb2_grpc

    import tether
    from benchmarks._echo import servicer
    from tether.testing import loopback_config

    config = loopback_config(
        "bench",
        server={"port": port, "workers": workers},
        metrics={"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        logging={"level": "warning", "format": "json"},
    )
    app = tether.App(config)
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer())

    @app.after_start
    async def say_ready(_: tether.App) -> None:
        print(f"ready {os.getpid()}", flush=True)

    app.run()


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit("usage: python -m benchmarks.multicore serve PORT METRICS WORKERS GEN")
    sys.path.insert(0, sys.argv[5])  # the generated echo protos
    _serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
