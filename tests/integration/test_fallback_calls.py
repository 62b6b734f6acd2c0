"""Fallbacks on real calls over loopback: typed answers, the degraded trailer, start-up checks."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.echo_service import EchoServicer, build_app

import tether
from tether.channel import Channel
from tether.config import ClientConfig
from tether.errors import BreakerOpen, ConfigError, RateLimited, StatusError
from tether.fallback import FALLBACK_TRAILER, Degradation, Fallbacks, degraded, fallback
from tether.middleware import Handler
from tether.testing import loopback_config, running

SERVICE = "echo.v1.Echo"
SAY = "echo.v1.Echo/Say"
Req = echo_pb2.SayRequest
Reply = echo_pb2.SayReply
WAIT = 20.0  # bound on the subprocess; a healthy run needs about a second


def cached(request: Req, error: StatusError) -> Reply:
    """Say's fallback: the request's text, marked as cached."""
    return Reply(text=f"cached {request.text}", seen={"source": "code"})


async def cached_async(request: Req, error: StatusError) -> Reply:
    """Say's fallback, async."""
    return Reply(text=f"async {request.text}")


@pytest.fixture
async def echo() -> AsyncIterator[tether.App]:
    """Echo on loopback as instance "a", so fail="unavailable:a" fails there."""
    async with running(build_app(loopback_config("echo"), EchoServicer("a"))) as app:
        yield app


def dial(
    app: tether.App,
    fallbacks: Fallbacks,
    *inner: Any,
    codes: tuple[str, ...] | None = None,
    listeners: tuple[Any, ...] = (),
) -> Channel:
    """A channel whose chain is the fallback middleware, then ``inner`` middleware."""
    cfg = ClientConfig() if codes is None else ClientConfig(fallback_codes=codes)
    outer = fallback(cfg.resolver(SERVICE), fallbacks, service=SERVICE, listeners=listeners)
    return tether.dial(app.target, config=cfg, middleware=[outer, *inner])


def refusing(error: StatusError) -> Any:
    """Inner middleware standing in for an open breaker or an empty limiter."""

    def middleware(handler: Handler) -> Handler:
        async def refuse(request: Any) -> Any:
            raise error

        return refuse

    return middleware


def say_fallbacks(fn: Any = cached) -> Fallbacks:
    fallbacks = Fallbacks()
    fallbacks.add(SAY, fn)
    fallbacks.check()
    return fallbacks


async def test_a_listed_status_from_the_peer_gets_the_fallback(echo: tether.App) -> None:
    """UNAVAILABLE (a default fallback code) answers with a real SayReply, marked degraded."""
    events: list[Degradation] = []
    async with dial(echo, say_fallbacks(), listeners=(events.append,)) as channel:
        call = echo_pb2_grpc.EchoStub(channel).Say(Req(text="hi", fail="unavailable:a"))
        reply = await call
        assert type(reply) is Reply
        assert reply.text == "cached hi"
        assert Reply.FromString(reply.SerializeToString()) == reply  # the declared wire type
        assert await call.code() == grpc.StatusCode.OK
        assert (FALLBACK_TRAILER, "UNAVAILABLE") in list(await call.trailing_metadata())
        assert await degraded(call) == "UNAVAILABLE"
    assert [(e.method, e.reason, e.source) for e in events] == [(SAY, "UNAVAILABLE", "code")]
    assert events[0].error.message == "instance a is unavailable"


async def test_configured_codes_decide_what_the_peer_status_replaces(echo: tether.App) -> None:
    """With fallback_codes=[INTERNAL] a crashing handler's INTERNAL gets the (async) fallback."""
    async with dial(echo, say_fallbacks(cached_async), codes=("INTERNAL",)) as channel:
        call = echo_pb2_grpc.EchoStub(channel).Say(Req(text="x", fail="boom"))
        assert (await call).text == "async x"
        assert await degraded(call) == "INTERNAL"


@pytest.mark.parametrize(
    ("error", "reason"),
    [(BreakerOpen("breaker open"), "UNAVAILABLE"), (RateLimited("limited"), "RESOURCE_EXHAUSTED")],
    ids=["breaker", "limiter"],
)
async def test_local_refusals_get_the_fallback(
    echo: tether.App, error: StatusError, reason: str
) -> None:
    """An open breaker or a limiter inside the chain refuses; the caller gets the fallback."""
    async with dial(echo, say_fallbacks(), refusing(error)) as channel:
        call = echo_pb2_grpc.EchoStub(channel).Say(Req(text="r"))
        reply = await call
        assert reply.text == "cached r"
        assert await degraded(call) == reason


async def test_methods_without_fallback_keep_the_original_status(echo: tether.App) -> None:
    """No fallback declared: the peer's status and details reach the caller unchanged."""
    async with dial(echo, Fallbacks()) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(fail="unavailable:a"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "instance a is unavailable"


async def test_local_refusal_without_fallback_keeps_its_status(echo: tether.App) -> None:
    """An open breaker with no fallback for the method reaches the caller as UNAVAILABLE."""
    async with dial(echo, say_fallbacks(), refusing(BreakerOpen("breaker open"))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Hold(Req())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "breaker open"


async def test_unlisted_status_keeps_the_original_status(echo: tether.App) -> None:
    """INTERNAL is not a default fallback code: the call fails as it did, fallback or not."""
    async with dial(echo, say_fallbacks()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Say(Req(fail="boom"))
    assert err.value.code() == grpc.StatusCode.INTERNAL


async def test_a_successful_call_is_not_marked(echo: tether.App) -> None:
    """A real answer carries no fallback trailer."""
    async with dial(echo, say_fallbacks()) as channel:
        call = echo_pb2_grpc.EchoStub(channel).Say(Req(text="real"))
        assert (await call).text == "real"
        assert await degraded(call) is None


async def test_the_proto_option_is_served(echo: tether.App) -> None:
    """Lookup declares (tether.v1.fallback) in echo.proto; with no code, that answer serves."""
    async with dial(echo, Fallbacks(), codes=("UNIMPLEMENTED",)) as channel:
        call = echo_pb2_grpc.EchoStub(channel).Lookup(Req(text="q"))
        reply = await call
        assert type(reply) is Reply
        assert reply.text == "static"
        assert dict(reply.seen) == {"source": "proto"}
        assert await degraded(call) == "UNIMPLEMENTED"


async def test_app_fallbacks_serve_through_a_channel() -> None:
    """Fallbacks declared on the App (decorator and response=) pass start-up and answer."""
    app = build_app(loopback_config("echo"), EchoServicer("a"))

    @app.fallback(SAY)
    def say(request: Req, error: StatusError) -> Reply:
        return Reply(text="from app")

    app.fallback("echo.v1.Echo/Hold", response='text: "held"')
    async with running(app), dial(app, app.fallbacks, refusing(BreakerOpen())) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert (await stub.Say(Req())).text == "from app"
        assert (await stub.Hold(Req())).text == "held"


async def test_app_start_refuses_a_mismatched_fallback() -> None:
    """start() raises ConfigError naming the method, the expected and the given types."""
    app = build_app(loopback_config("echo"))

    @app.fallback(SAY)
    def wrong(request: Req, error: StatusError) -> Req:
        return request

    with pytest.raises(ConfigError) as err:
        await app.start()
    (problem,) = err.value.problems
    assert problem.field == "fallback[echo.v1.Echo/Say]"
    assert problem.value.endswith("wrong")
    assert problem.rule == "must return echo.v1.SayReply, got echo.v1.SayRequest"


MISMATCHED = textwrap.dedent(
    """
    from echo.v1 import echo_pb2
    from support.echo_service import build_app

    import tether

    def factory():
        app = build_app()

        @app.fallback("echo.v1.Echo/Say")
        def wrong(request, error) -> echo_pb2.SayRequest:
            return request

        return app

    tether.App.main(factory)
    """
)


async def test_a_mismatched_fallback_exits_2(tmp_path: Path) -> None:
    """A service whose fallback has the wrong type exits 2 at start-up, problem on stderr."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "service: {name: echo}\n"
        "server: {host: 127.0.0.1, port: 0}\n"
        "registry: {backend: none}\n"
        "metrics: {enabled: false}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MISMATCHED,
        env={**os.environ, "TETHER_CONFIG": str(config)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 2, text
    assert "fallback[echo.v1.Echo/Say]=" in text
    assert "must return echo.v1.SayReply, got echo.v1.SayRequest" in text
    assert "Traceback" not in text
