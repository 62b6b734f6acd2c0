"""The App lifecycle in a real process: serve, SIGTERM with a call in flight, drain, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tether

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT = 20.0  # bound on every wait in this module; a healthy run needs well under a second each


class ServiceProcess:
    """The Echo service run with ``python -m support.echo_service``; its JSON log lines are read."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.target = ""  # known once the service logs "serving"
        self.lines: list[dict[str, Any]] = []

    async def hold(self, echo: Any, text: str) -> asyncio.Future[Any]:
        """Start a Hold call and return it once the service says the call is in its handler."""
        held = asyncio.ensure_future(echo.Hold(echo_pb2.SayRequest(text=text), timeout=WAIT))
        await self.wait_for_log("hold started")
        return held

    async def wait_for_log(self, event: str) -> dict[str, Any]:
        """Read log lines until one has ``event``; fail with what was seen if it never comes."""
        for line in self.lines:
            if line.get("event") == event:
                return line
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        break
                    line = json.loads(raw)
                    self.lines.append(line)
                    if line.get("event") == event:
                        return line
        except TimeoutError:
            pass
        seen = [entry.get("event") for entry in self.lines]
        pytest.fail(f"service never logged {event!r}; it logged {seen}")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    config = tmp_path / "tether.yaml"
    config.write_text(
        "service: {name: echo}\n"
        "server: {host: 127.0.0.1, port: 0, drain_seconds: 0.3, grace_seconds: 10}\n"
        "registry: {backend: none}\n"
        "metrics: {enabled: false}\n"
        "logging: {format: json}\n"
    )
    env = {**os.environ, "TETHER_CONFIG": str(config)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "support.echo_service",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    service = ServiceProcess(proc)
    try:
        service.target = (await service.wait_for_log("serving"))["address"]
        yield service
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _next_status(watch: Any) -> int:
    async with asyncio.timeout(WAIT):
        reply = await watch.read()
    assert reply is not grpc.aio.EOF, "health watch ended before the expected status"
    return int(reply.status)


async def test_sigterm_drains_in_flight_call_and_exits_zero(service: ServiceProcess) -> None:
    """SIGTERM: health NOT_SERVING, in-flight call completes, new calls refused, exit 0."""
    async with tether.dial(service.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="echo.v1.Echo"))
        assert await _next_status(watch) == SERVING

        echo = echo_pb2_grpc.EchoStub(channel)
        held = await service.hold(echo, "in flight")

        service.proc.send_signal(signal.SIGTERM)
        assert await _next_status(watch) == NOT_SERVING

        await service.wait_for_log("refusing new calls")
        assert not held.done(), "the held call ended before it was released"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await echo.Say(echo_pb2.SayRequest(text="too late"), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == "server is shutting down"

        service.proc.send_signal(signal.SIGUSR1)  # release the held call
        reply = await held
        assert reply.text == "in flight"

    async with asyncio.timeout(WAIT):
        code = await service.proc.wait()
    assert code == 0
    await service.wait_for_log("stopped")
    events = [line["event"] for line in service.lines]
    order = ["stopping", "draining", "refusing new calls", "stopping server", "stopped"]
    assert [e for e in events if e in order] == order
    assert service.lines[events.index("stopping server")]["in_flight"] == 0


async def test_repeated_sigterm_does_not_skip_the_drain(service: ServiceProcess) -> None:
    """SIGTERM delivered twice (process and group) still drains and waits for calls in flight."""
    async with tether.dial(service.target) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        held = await service.hold(echo, "kept")
        service.proc.send_signal(signal.SIGTERM)
        service.proc.send_signal(signal.SIGTERM)
        await service.wait_for_log("refusing new calls")
        assert not held.done()
        service.proc.send_signal(signal.SIGUSR1)
        assert (await held).text == "kept"
    async with asyncio.timeout(WAIT):
        assert await service.proc.wait() == 0
    events = [line["event"] for line in service.lines]
    assert "second signal: stopping now" not in events
    assert "draining" in events


async def test_log_lines_carry_service_and_call_context(service: ServiceProcess) -> None:
    """Lines written while serving carry the service, instance, method and trace without the
    handler, tracing off: the caller's trace id comes through."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with tether.dial(service.target) as channel:
        await echo_pb2_grpc.EchoStub(channel).Say(
            echo_pb2.SayRequest(text="hello"), metadata=(("traceparent", traceparent),)
        )
    line = await service.wait_for_log("say")
    assert line["service"] == "echo"
    assert line["instance_id"].startswith("echo-")
    assert line["method"] == "echo.v1.Echo/Say"
    assert line["side"] == "server"
    assert line["trace_id"] == trace_id
    service.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(WAIT):
        assert await service.proc.wait() == 0


async def test_second_sigint_skips_drain_and_grace(service: ServiceProcess) -> None:
    """A second Ctrl-C (SIGINT) cancels the held call instead of waiting out the grace period."""
    async with tether.dial(service.target) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        held = await service.hold(echo, "x")
        service.proc.send_signal(signal.SIGINT)
        await service.wait_for_log("stopping")
        service.proc.send_signal(signal.SIGINT)
        await service.wait_for_log("second signal: stopping now")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await held
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    async with asyncio.timeout(WAIT):
        assert await service.proc.wait() == 0


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "tether.cli", "run", "support.echo_service:build_app"],
        ["-m", "support.echo_service"],
    ],
    ids=["tether-run", "app-main"],
)
async def test_bad_config_refused_at_start(tmp_path: Path, command: list[str]) -> None:
    """A bad value in the file stops start-up with field, value and rule, exit status 2."""
    config = tmp_path / "tether.yaml"
    config.write_text("service: {name: echo}\nregistry: {ttl_seconds: -1}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        env={**os.environ, "TETHER_CONFIG": str(config)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "registry.ttl_seconds=-1: must be >= 2" in err.decode()
    assert "Traceback" not in err.decode()
