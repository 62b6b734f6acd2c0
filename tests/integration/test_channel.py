"""tether.channel on real servers over loopback: balancing, membership, failures, clean closing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.echo_service import EchoServicer, build_app

import tether
from tether.balancer import Endpoint, RoundRobinBalancer, candidates
from tether.channel import Channel
from tether.config import ClientConfig
from tether.interceptors import ChainServerInterceptor
from tether.registry.base import Instance, InstanceWatch, Watcher
from tether.registry.memory import MemoryRegistry
from tether.testing import eventually, loopback_config, running

Req = echo_pb2.SayRequest
WAIT = 10.0  # bound on every wait here; a healthy run needs a fraction of it
E = TypeVar("E", bound=Endpoint)


@dataclass
class Node:
    """One Echo instance: its app, its servicer (to release holds) and its registration."""

    label: str
    app: tether.App
    servicer: EchoServicer
    instance: Instance

    @property
    def address(self) -> str:
        return self.app.target


@contextlib.asynccontextmanager
async def node(label: str, registry: MemoryRegistry | None = None) -> AsyncIterator[Node]:
    """Serve Echo labelled ``label`` on loopback; registered in ``registry`` while it runs."""
    servicer = EchoServicer(label)
    async with running(build_app(loopback_config("echo"), servicer), grace=1) as app:
        instance = Instance(id=label, service="echo", address=app.target)
        if registry is not None:
            await registry.register(instance)
        try:
            yield Node(label, app, servicer, instance)
        finally:
            servicer.release.set()  # never leave a held call behind


@contextlib.asynccontextmanager
async def cluster(registry: MemoryRegistry, *labels: str) -> AsyncIterator[list[Node]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(node(label, registry)) for label in labels]


@pytest.fixture
async def registry() -> AsyncIterator[MemoryRegistry]:
    registry = MemoryRegistry()
    yield registry
    await registry.close()


async def all_ready(channel: Channel, count: int) -> None:
    channel.get_state(try_to_connect=True)  # a channel, like grpc's, connects when first used
    await eventually(
        lambda: (
            len(channel.subchannels) == count
            and all(sub.ready for sub in channel.subchannels.values())
        ),
        within=WAIT,
        message=f"{count} connected instances, have {list(channel.subchannels.values())}",
    )


async def answered_by(stub: Any, calls: int) -> Counter[str]:
    seen = Counter[str]()
    for i in range(calls):
        reply = await stub.Say(Req(text=str(i)))
        seen[reply.seen["instance"]] += 1
    return seen


class Recording:
    """A balancer that remembers what it picked; the picking is another balancer's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.picked: list[str] = []

    def pick(self, endpoints: Sequence[E], exclude: Collection[str] = ()) -> E | None:
        chosen: E | None = self.inner.pick(endpoints, exclude)
        if chosen is not None:
            self.picked.append(chosen.address)
        return chosen


class First:
    """A balancer that prefers ``address`` among the usual candidates."""

    def __init__(self, address: str) -> None:
        self.address = address

    def pick(self, endpoints: Sequence[E], exclude: Collection[str] = ()) -> E | None:
        group = candidates(endpoints, exclude)
        preferred = [e for e in group if e.address == self.address]
        return (preferred or list(group) or [None])[0]


def unused_address() -> str:
    """A loopback address nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --------------------------------------------------------------------------- balancing


async def test_round_robin_spreads_calls_over_instances(registry: MemoryRegistry) -> None:
    """Round robin answers from every instance in equal turns."""
    async with (
        cluster(registry, "a", "b", "c"),
        tether.dial("discovery:///echo", discovery=registry) as channel,
    ):
        await channel.channel_ready()
        await all_ready(channel, 3)
        seen = await answered_by(echo_pb2_grpc.EchoStub(channel), 30)
    assert seen == {"a": 10, "b": 10, "c": 10}


async def test_p2c_spreads_calls_over_instances(registry: MemoryRegistry) -> None:
    """Power of two choices reaches every instance too."""
    config = ClientConfig(balancer="p2c")
    async with (
        cluster(registry, "a", "b", "c"),
        tether.dial("discovery:///echo", discovery=registry, config=config) as channel,
    ):
        await all_ready(channel, 3)
        seen = await answered_by(echo_pb2_grpc.EchoStub(channel), 90)
    assert set(seen) == {"a", "b", "c"}
    assert min(seen.values()) >= 10, seen


async def test_p2c_steers_away_from_busy_instances(registry: MemoryRegistry) -> None:
    """p2c sends new calls to the instance with fewer calls in flight."""
    config = ClientConfig(balancer="p2c")
    async with (
        cluster(registry, "slow", "fast") as (slow, fast),
        tether.dial("discovery:///echo", discovery=registry, config=config) as channel,
    ):
        await all_ready(channel, 2)
        stub = echo_pb2_grpc.EchoStub(channel)
        fast.servicer.release.set()  # Hold answers at once on "fast", stays open on "slow"
        calls = []
        for i in range(20):
            call = asyncio.ensure_future(stub.Hold(Req(text=str(i))))
            calls.append(call)
            held = slow.servicer.holding
            await eventually(
                lambda call=call, held=held: call.done() or slow.servicer.holding > held,  # type: ignore[misc]
                within=WAIT,
                message="the call to be answered or held",
            )
        on_slow = slow.servicer.holding
        slow.servicer.release.set()
        await asyncio.gather(*calls)
    # Round robin would leave 10 calls on "slow"; p2c stops at the first one held there.
    assert on_slow <= 1


async def test_static_comma_target() -> None:
    """host:port,host:port needs no discovery and balances over both."""
    async with node("a") as a, node("b") as b, tether.dial(f"{a.address},{b.address}") as channel:
        await all_ready(channel, 2)
        seen = await answered_by(echo_pb2_grpc.EchoStub(channel), 10)
    assert seen == {"a": 5, "b": 5}


# --------------------------------------------------------------------------- membership


async def test_membership_changes_keep_calls_and_connections(registry: MemoryRegistry) -> None:
    """Adding and removing instances fails no call in flight and reuses unchanged connections."""
    async with (
        cluster(registry, "a", "b") as (a, b),
        tether.dial("discovery:///echo", discovery=registry) as channel,
    ):
        await all_ready(channel, 2)
        before = dict(channel.subchannels)
        stub = echo_pb2_grpc.EchoStub(channel)
        held = [asyncio.ensure_future(stub.Hold(Req(text=f"h{i}"))) for i in range(2)]
        await eventually(
            lambda: a.servicer.holding == 1 and b.servicer.holding == 1,
            within=WAIT,
            message="one held call on each instance",
        )
        async with node("c", registry):
            await all_ready(channel, 3)
            assert channel.subchannels[a.address] is before[a.address]
            assert channel.subchannels[b.address] is before[b.address]

            await registry.deregister(a.instance)
            await eventually(
                lambda: a.address not in channel.subchannels, within=WAIT, message="a to leave"
            )
            assert not before[a.address].closed, "a's call in flight must be allowed to finish"
            seen = await answered_by(stub, 10)
            assert seen == {"b": 5, "c": 5}

            a.servicer.release.set()
            b.servicer.release.set()
            replies = await asyncio.gather(*held)
            assert sorted(r.text for r in replies) == ["h0", "h1"]
            await eventually(
                lambda: before[a.address].closed, within=WAIT, message="a's subchannel to close"
            )
            assert channel.subchannels[b.address] is before[b.address]


async def test_first_call_waits_for_discovery(registry: MemoryRegistry) -> None:
    """A call made before discovery answered waits for it, within its deadline."""

    class Slow:
        def __init__(self) -> None:
            self.watches: list[InstanceWatch] = []

        async def get(self, service: str) -> list[Instance]:
            return await registry.get(service)

        def watch(self, service: str) -> Watcher:
            watch = InstanceWatch(service)
            self.watches.append(watch)
            return watch

    slow = Slow()
    async with node("a", registry) as a, tether.dial("discovery:///echo", discovery=slow) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(text="early"), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no instances of 'echo' were discovered" in (err.value.details() or "")
        pending = asyncio.ensure_future(stub.Say(Req(text="waits"), timeout=WAIT))
        await asyncio.sleep(0)  # let the call start waiting before discovery answers
        assert not pending.done()
        slow.watches[0].publish([a.instance])
        reply = await pending
    assert reply.seen["instance"] == "a"


async def test_empty_instance_set_fails_locally(registry: MemoryRegistry) -> None:
    """No instances: UNAVAILABLE at once, naming the service; nothing is dialled."""
    async with tether.dial("discovery:///users", discovery=registry) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo_pb2_grpc.EchoStub(channel).Say(Req(text="x"), timeout=WAIT)
        assert channel.subchannels == {}
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "no instances of 'users'"


def test_discovery_target_needs_discovery() -> None:
    """discovery:///name without a discovery is refused when dialling."""
    with pytest.raises(ValueError, match="needs a discovery"):
        tether.dial("discovery:///users")
    with pytest.raises(ValueError, match="host:port"):
        tether.dial("a:1,,b:2")


# --------------------------------------------------------------------------- failures


@contextlib.asynccontextmanager
async def spawned(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Echo in its own process (so it can be killed with SIGKILL); yields it and its address."""
    config = tmp_path / "victim.yaml"
    config.write_text(
        "service: {name: echo, instance_id: victim}\n"
        "server: {host: 127.0.0.1, port: 0, drain_seconds: 0}\n"
        "registry: {backend: none}\n"
        "metrics: {enabled: false}\n"
        "logging: {format: json}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "support.echo_service",
        env={**os.environ, "TETHER_CONFIG": str(config)},
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    stdout = proc.stdout

    async def serving_address() -> str:
        while raw := await stdout.readline():
            line = json.loads(raw)
            if line.get("event") == "serving":
                return str(line["address"])
        pytest.fail("the Echo process exited before serving")

    async def drain() -> None:  # a full pipe would block the process's logging
        while await stdout.readline():
            pass

    drainer: asyncio.Future[None] | None = None
    try:
        async with asyncio.timeout(WAIT):
            address = await serving_address()
        drainer = asyncio.ensure_future(drain())
        yield proc, address
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drainer is not None:
            await drainer


@pytest.mark.slow
async def test_killed_instance_costs_no_idempotent_call(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    """kill -9 of a registered instance under steady load: zero failed idempotent calls."""
    async with cluster(registry, "a", "b"), spawned(tmp_path) as (victim, address):
        await registry.register(Instance(id="victim", service="echo", address=address))
        config = ClientConfig()
        picks = Recording(RoundRobinBalancer())
        async with Channel(
            "discovery:///echo",
            discovery=registry,
            config=config,
            middleware=tether.default_client_middleware(config),
            balancer=picks,
        ) as channel:
            await all_ready(channel, 3)
            stub = echo_pb2_grpc.EchoStub(channel)
            failures: list[grpc.aio.AioRpcError] = []
            answered = Counter[str]()
            stop = asyncio.Event()

            async def call_in_a_loop() -> None:  # one sequential caller
                while not stop.is_set():
                    try:
                        reply = await stub.Say(Req(text="x"))
                        answered[reply.seen.get("instance", "victim")] += 1
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc)

            # A few callers, so that calls are in flight on the victim when it dies.
            callers = [asyncio.ensure_future(call_in_a_loop()) for _ in range(4)]
            await eventually(
                lambda: answered["victim"] >= 20,
                within=WAIT,
                message="calls answered by the victim",
            )
            victim.send_signal(signal.SIGKILL)
            killed_at = len(picks.picked)
            await victim.wait()
            await eventually(
                lambda: not channel.subchannels[address].ready,
                within=WAIT,
                message="victim not ready",
            )
            after = answered.total()
            await eventually(
                lambda: answered.total() >= after + 300,
                within=WAIT,
                message="300 calls after the kill",
            )
            stop.set()
            await asyncio.gather(*callers)
    assert failures == []
    victim_picks = picks.picked[killed_at:].count(address)
    assert victim_picks <= 8, f"the dead instance got {victim_picks} picks after the kill"


async def test_unsent_non_idempotent_call_is_retried_elsewhere() -> None:
    """A call that could not connect is sent again to another instance, idempotent or not."""
    dead = unused_address()
    async with node("live") as live:
        live.servicer.release.set()  # Hold answers at once
        config = ClientConfig()
        async with Channel(
            f"{dead},{live.address}",
            config=config,
            middleware=tether.default_client_middleware(config),
            balancer=First(dead),
        ) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Hold(Req(text="once"), timeout=WAIT)
            dead_sub = channel.subchannels[dead]
            assert dead_sub.ejected or not dead_sub.ready
    assert reply.text == "once"
    assert reply.seen["instance"] == "live"
    assert reply.seen["grpc-previous-rpc-attempts"] == "1"


async def test_call_refused_by_a_stopping_server_is_retried_elsewhere() -> None:
    """A call a server shutting down refused before any handler ran goes to another instance,
    idempotent or not."""
    refusing = ChainServerInterceptor([])
    refusing.refuse_new_calls()  # as App.stop() does once the drain is over
    stopping = grpc.aio.server(interceptors=[refusing])
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("stopping"), stopping)
    address = f"127.0.0.1:{stopping.add_insecure_port('127.0.0.1:0')}"
    await stopping.start()
    try:
        async with node("live") as live:
            live.servicer.release.set()  # Hold answers at once
            config = ClientConfig()
            async with Channel(
                f"{address},{live.address}",
                config=config,
                middleware=tether.default_client_middleware(config),
                balancer=First(address),
            ) as channel:
                reply = await echo_pb2_grpc.EchoStub(channel).Hold(Req(text="once"), timeout=WAIT)
                assert channel.subchannels[address].ejected
    finally:
        await stopping.stop(None)
    assert reply.seen["instance"] == "live"
    assert reply.seen["grpc-previous-rpc-attempts"] == "1"


async def test_an_instance_stopping_unseen_costs_no_call() -> None:
    """A client that cannot see an instance leave (a fixed address list) keeps calling it while
    it stops: no call fails, idempotent or not.

    Before server.stop(), the stopping server refuses new calls for a moment; the client sends
    each refused call again elsewhere and stops picking the instance, so no call races grpc's
    own shutdown (which cancels them, ran or not). Two rounds: one race rarely goes unseen.
    """
    for _ in range(2):
        outcomes = await _outcomes_while_one_of_two_stops()
        assert set(outcomes) == {"ok"}, dict(outcomes)


async def _outcomes_while_one_of_two_stops() -> Counter[str]:
    outcomes: Counter[str] = Counter()
    finished = asyncio.Event()
    async with node("stays") as stays, node("stops") as stops:
        stays.servicer.release.set()  # Hold answers at once
        stops.servicer.release.set()
        async with tether.dial(f"{stays.address},{stops.address}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)

            async def caller(method: Any) -> None:
                while not finished.is_set():
                    try:
                        await method(Req(text="x"), timeout=WAIT)
                        outcomes["ok"] += 1
                    except grpc.aio.AioRpcError as exc:
                        outcomes[f"{exc.code().name}: {exc.details()}"] += 1

            callers = [asyncio.ensure_future(caller(m)) for m in [stub.Say, stub.Hold] * 4]
            await eventually(lambda: stops.servicer.says > 50, within=WAIT, message="calls")
            await stops.app.stop(drain=0, grace=WAIT)
            done = outcomes.total() + 200
            await eventually(
                lambda: outcomes.total() >= done, within=WAIT, message="200 more calls"
            )
            finished.set()
            await asyncio.gather(*callers)
    return outcomes


async def test_idempotent_call_is_retried_on_another_instance() -> None:
    """An idempotent call answered UNAVAILABLE by one instance is answered by another."""
    async with node("a") as a, node("b") as b:
        config = ClientConfig()
        async with Channel(
            f"{a.address},{b.address}",
            config=config,
            middleware=tether.default_client_middleware(config),
            balancer=First(a.address),
        ) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            reply = await stub.Say(Req(text="x", fail="unavailable:a"), timeout=WAIT)
            assert channel.subchannels[a.address].ejected
            with pytest.raises(grpc.aio.AioRpcError) as err:  # Hold is not idempotent
                await stub.Hold(Req(text="x", fail="unavailable:b"), timeout=WAIT)
    assert reply.seen["instance"] == "b"
    assert reply.seen["grpc-previous-rpc-attempts"] == "1"
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "instance b is unavailable"


async def test_sent_non_idempotent_call_is_not_retried() -> None:
    """A non-idempotent call cut off after it reached a server fails; it is not repeated."""
    async with node("other") as other, node("doomed") as doomed:
        config = ClientConfig()
        async with Channel(
            f"{doomed.address},{other.address}",
            config=config,
            middleware=tether.default_client_middleware(config),
            balancer=First(doomed.address),
        ) as channel:
            held = asyncio.ensure_future(
                echo_pb2_grpc.EchoStub(channel).Hold(Req(text="x"), timeout=WAIT)
            )
            await eventually(
                lambda: doomed.servicer.holding == 1, within=WAIT, message="the call to be held"
            )
            await doomed.app.stop(drain=0, grace=0)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await held
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert other.servicer.holding == 0


async def test_streams_are_balanced_but_not_retried() -> None:
    """A streamed call goes through the balancer; a failed connection is not retried."""
    dead = unused_address()
    async with node("live") as live:
        config = ClientConfig()
        async with Channel(
            f"{dead},{live.address}",
            config=config,
            middleware=tether.default_client_middleware(config),
            balancer=First(dead),
        ) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [r async for r in stub.Split(Req(text="a b"), timeout=WAIT)]
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            words = [r.text async for r in stub.Split(Req(text="a b"), timeout=WAIT)]
    assert words == ["a", "b"]  # the failed instance is ejected: the next pick is the live one


async def test_instance_that_comes_back_is_used_again() -> None:
    """A restarted instance on the same address is connected again within about a second."""
    async with node("first") as first:
        address, port = first.address, first.app.port
        channel = tether.dial(address)
        stub = echo_pb2_grpc.EchoStub(channel)
        assert (await stub.Say(Req(text="x"))).seen["instance"] == "first"
    try:
        await eventually(
            lambda: not channel.subchannels[address].ready,
            within=WAIT,
            message="the connection to drop",
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Say(Req(text="x"), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        second = build_app(loopback_config("echo", server={"port": port}), EchoServicer("second"))
        async with running(second, grace=1):
            loop = asyncio.get_running_loop()
            started = loop.time()
            await eventually(
                lambda: channel.subchannels[address].ready, within=WAIT, message="a new connection"
            )
            took = loop.time() - started
            assert (await stub.Say(Req(text="x"))).seen["instance"] == "second"
    finally:
        await channel.close()
    assert took < 2.5, f"reconnecting took {took:.2f} s; the backoff should cap it near 1 s"


# --------------------------------------------------------------------------- the stub API


async def _requests(*texts: str) -> AsyncIterator[Any]:
    for text in texts:
        yield Req(text=text)


async def test_every_call_shape_through_generated_stubs(registry: MemoryRegistry) -> None:
    """Unary, server, client and bidi streaming work through a discovered Channel."""
    async with (
        cluster(registry, "a", "b"),
        tether.dial("discovery:///echo", discovery=registry) as channel,
    ):
        stub = echo_pb2_grpc.EchoStub(channel)
        assert (await stub.Say(Req(text="hi"))).text == "hi"
        assert [r.text async for r in stub.Split(Req(text="a b c"))] == ["a", "b", "c"]
        assert (await stub.Join(_requests("x", "y"))).text == "x y"
        assert [r.text async for r in stub.Chat(_requests("p", "q"))] == ["p", "q"]

        join = stub.Join()
        await join.write(Req(text="w1"))
        await join.write(Req(text="w2"))
        await join.done_writing()
        assert (await join).text == "w1 w2"

        chat = stub.Chat()
        await chat.write(Req(text="r1"))
        assert (await chat.read()).text == "r1"
        await chat.done_writing()
        assert await chat.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await chat.code() == grpc.StatusCode.OK

        call = stub.Say(Req(text="meta"))
        await call
        assert await call.code() == grpc.StatusCode.OK
        assert call.done() and not call.cancelled()
        assert await call.details() == ""


async def test_closing_leaves_no_tasks(registry: MemoryRegistry) -> None:
    """close() ends every task the channel started and every call, retiring instances included."""
    before = asyncio.all_tasks()
    async with cluster(registry, "a", "b") as (a, b):
        channel = tether.dial("discovery:///echo", discovery=registry)
        await all_ready(channel, 2)
        stub = echo_pb2_grpc.EchoStub(channel)
        await answered_by(stub, 4)
        held = asyncio.ensure_future(stub.Hold(Req(text="h"), timeout=WAIT))
        await eventually(
            lambda: a.servicer.holding + b.servicer.holding == 1, within=WAIT, message="a held call"
        )
        holder = a if a.servicer.holding else b
        await registry.deregister(holder.instance)  # its subchannel retires, a call in flight
        await eventually(
            lambda: len(channel.subchannels) == 1, within=WAIT, message="one instance left"
        )
        await channel.close()
        with pytest.raises(asyncio.CancelledError):  # as grpc.aio does for a closed channel
            await held
        ours = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("tether")]
        assert ours == []
    await eventually(
        lambda: asyncio.all_tasks() <= before,
        within=WAIT,
        message=f"every task to end; left: {asyncio.all_tasks() - before}",
    )
