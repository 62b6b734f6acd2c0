"""App behaviour in-process: hooks, health, reflection, binding errors, idempotent stop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.echo_service import build_app

import tether
from tether.testing import loopback_config, running

WAIT = 10.0


async def test_hooks_run_in_lifecycle_order() -> None:
    """Hooks run: before_start, after_start (serving), before_stop (NOT_SERVING), after_stop."""
    app = build_app(loopback_config("echo"))
    events: list[str] = []

    def hook(name: str) -> tether.app.Hook:
        async def run(a: tether.App) -> None:
            events.append(
                f"{name}:{health_pb2.HealthCheckResponse.ServingStatus.Name(a.health.status())}"
            )

        return run

    app.before_start(hook("before_start"))
    app.after_start(hook("after_start"))
    app.before_stop(hook("before_stop"))
    app.after_stop(hook("after_stop"))
    async with running(app):
        events.append("running")
    assert events == [
        "before_start:SERVICE_UNKNOWN",
        "after_start:SERVING",
        "running",
        "before_stop:NOT_SERVING",
        "after_stop:NOT_SERVING",
    ]


async def test_health_serving_for_server_and_each_service() -> None:
    """Health answers SERVING for '' and for every added service; unknown names are NOT_FOUND."""
    app = build_app(loopback_config("echo"))
    async with running(app), tether.dial(app.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "echo.v1.Echo"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_stream_ends_at_shutdown_without_waiting_grace() -> None:
    """A health Watch sees NOT_SERVING at shutdown and then ends, so stop() need not wait."""
    app = build_app(loopback_config("echo", server={"grace_seconds": 60}))
    await app.start()
    async with tether.dial(app.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async with asyncio.timeout(WAIT):
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.ensure_future(app.stop(drain=0))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await watch.read() is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
            await stopping  # bounded by WAIT, far below the 60 s grace


async def _reflected_services(target: str) -> list[str]:
    async with tether.dial(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for reply in stub.ServerReflectionInfo(one()):
            return sorted(s.name for s in reply.list_services_response.service)
    return []


def _echo_config(
    monkeypatch: pytest.MonkeyPatch, environment: str | None, reflection: bool | None
) -> tether.TetherConfig:
    """Echo's test config in ``environment`` (None: unset), given as `tether dev` and the
    image give it, in TETHER_SERVICE__ENVIRONMENT; ``reflection`` None leaves it unset."""
    if environment is None:
        monkeypatch.delenv("TETHER_SERVICE__ENVIRONMENT", raising=False)
    else:
        monkeypatch.setenv("TETHER_SERVICE__ENVIRONMENT", environment)
    server = {} if reflection is None else {"reflection": reflection}
    return loopback_config("echo", server=server)


@pytest.mark.parametrize(
    ("environment", "reflection"),
    [("development", None), ("production", True), (None, True)],
    ids=["development-default", "production-switched-on", "unset-switched-on"],
)
async def test_reflection_lists_services(
    monkeypatch: pytest.MonkeyPatch, environment: str | None, reflection: bool | None
) -> None:
    """Reflection, on by default in development or switched on, lists the app's services,
    health and reflection."""
    async with running(build_app(_echo_config(monkeypatch, environment, reflection))) as app:
        names = await _reflected_services(app.target)
    assert "echo.v1.Echo" in names
    assert "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("environment", "reflection"),
    [("production", None), (None, None), ("development", False)],
    ids=["production-default", "unset-means-production", "development-switched-off"],
)
async def test_reflection_is_left_out(
    monkeypatch: pytest.MonkeyPatch, environment: str | None, reflection: bool | None
) -> None:
    """Off by default in production (the default environment), or switched off in development:
    reflection calls are UNIMPLEMENTED while the app's own service answers."""
    async with running(build_app(_echo_config(monkeypatch, environment, reflection))) as app:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _reflected_services(app.target)
        async with tether.dial(app.target) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Say(
                echo_pb2.SayRequest(text="hi"), timeout=WAIT
            )
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert reply.text == "hi"


async def test_port_in_use_is_refused_with_config_error() -> None:
    """A port another socket holds is refused at start-up naming server.port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        app = build_app(loopback_config("echo", server={"port": port}))
        with pytest.raises(tether.ConfigError) as err:
            await app.start()
    assert f"server.port={port}: cannot bind 127.0.0.1:{port}" in str(err.value)


async def test_stop_is_idempotent_and_concurrent() -> None:
    """stop() called twice at once runs the shutdown once; both calls return."""
    app = build_app(loopback_config("echo"))
    stops: list[int] = []

    async def count(_: tether.App) -> None:
        stops.append(1)

    app.after_stop(count)
    await app.start()
    await asyncio.gather(app.stop(drain=0), app.stop(drain=0))
    await app.wait_stopped()
    assert stops == [1]


async def test_add_servicer_after_start_is_refused() -> None:
    """Servicers are fixed once serving."""
    async with running(build_app(loopback_config("echo"))) as app:
        with pytest.raises(RuntimeError, match="before the app starts"):
            app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, object())
