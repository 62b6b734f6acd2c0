"""The servers the chain benchmarks measure, one variant per process (``python -m
benchmarks._echo VARIANT PORT GENERATED_DIR``), and the code they share.

Every variant serves the same trivial servicer (``echo.v1.Echo/Say`` answers with the text),
so the only difference is what wraps it. It prints ``ready`` once serving.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

ROOT = Path(__file__).resolve().parents[1]
ECHO_PROTOS = ROOT / "tests" / "protos"

#: Variant name -> what it is, for the report.
SERVER_VARIANTS = {
    "bare": "bare grpc.aio server",
    "instrumented": "grpc.aio + opentelemetry-instrumentation-grpc's aio server interceptor, 100%",
    "tether-100": "tether default server chain, tracing 100%",
    "tether-1": "tether default server chain, tracing 1%",
    "tether-off": "tether default server chain, tracing off",
}


class NullExporter(SpanExporter):
    """Takes spans and drops them: the pipeline's cost without a collector's."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


_generated: Path | None = None


def generated() -> Path:
    """The echo protos (tests/protos) compiled once per process into a temporary directory
    (removed at exit), importable as ``echo.v1``; server processes are given the path."""
    global _generated
    if _generated is None:
        from tether.codegen import compile_protos

        out = Path(tempfile.mkdtemp(prefix="tether-bench-gen-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        compile_protos(sorted(ECHO_PROTOS.rglob("*.proto")), out, proto_path=ECHO_PROTOS)
        sys.path.insert(0, str(out))
        _generated = out
    return _generated


def request_body() -> bytes:
    """One framed gRPC message (SayRequest text="hello") for h2load's -d."""
    from echo.v1 import echo_pb2

    body = echo_pb2.SayRequest(text="hello").SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


async def h2load(
    port: int, body: Path, calls: int, *, connections: int = 4, streams: int = 8
) -> tuple[float, float]:
    """Send ``calls`` unary ``echo.v1.Echo/Say`` calls with h2load (one thread) from outside
    Python; return the calls/s and the CPU seconds h2load used. Fails when h2load reports a
    failed call (it cannot read gRPC trailers: callers check grpc-status their own way)."""
    used = _children_cpu()
    proc = await asyncio.create_subprocess_exec(
        "h2load",
        *("-n", str(calls), "-c", str(connections), "-m", str(streams), "-t", "1"),
        *("-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"),
        f"http://127.0.0.1:{port}/echo.v1.Echo/Say",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await proc.communicate())[0].decode()
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    done = re.search(r"(\d+) succeeded", out)
    if rate is None or done is None:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    if int(done.group(1)) != calls:
        raise RuntimeError(f"h2load: {calls - int(done.group(1))} of {calls} calls failed")
    return float(rate.group(1)), _children_cpu() - used


def _children_cpu() -> float:
    """CPU time of this process's children that have exited (the h2load runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def servicer() -> Any:
    from echo.v1 import echo_pb2, echo_pb2_grpc

    class Echo(echo_pb2_grpc.EchoServicer):
        async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
            return echo_pb2.SayReply(text=request.text)

    return Echo()


async def serve(variant: str, port: int, metrics_port: int) -> None:
    import grpc
    from echo.v1 import echo_pb2_grpc

    import tether
    from tether.testing import loopback_config

    if variant in ("bare", "instrumented"):
        interceptors = []
        if variant == "instrumented":
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(NullExporter()))
            interceptors.append(aio_server_interceptor(tracer_provider=provider))
        server = grpc.aio.server(interceptors=interceptors)
        echo_pb2_grpc.add_EchoServicer_to_server(servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
        return
    ratio = {"tether-100": 1.0, "tether-1": 0.01, "tether-off": None}[variant]
    config = loopback_config(
        "bench",
        server={"port": port},
        metrics={"enabled": True, "port": metrics_port},  # the default chain has metrics
        tracing={"enabled": ratio is not None, "sample_ratio": ratio or 1.0},
        logging={"level": "warning"},
    )
    tether.configure_logging("warning")
    tracing = tether.Tracing(
        config.tracing, resource={"service.name": "bench"}, exporter=NullExporter(), batch=True
    )
    app = tether.App(config, tracing=tracing)
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer())
    await app.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[4])  # the parent's generated code
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
