"""Registration of real service processes in a real etcd: start, stop, pause, and the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.processes import EchoProcess

import tether
from tether.config import RegistryConfig
from tether.registry import EtcdRegistry
from tether.testing import EtcdServer, eventually

TTL = 2


@pytest.fixture
async def discovery(etcd: EtcdServer) -> AsyncIterator[EtcdRegistry]:
    registry = EtcdRegistry(RegistryConfig(endpoints=(etcd.endpoint,)))
    try:
        yield registry
    finally:
        await registry.close()


async def ids_seen(watch: object, within: float) -> list[str]:
    snapshot = await asyncio.wait_for(watch.next(), within)  # type: ignore[attr-defined]
    return [instance.id for instance in snapshot]


async def test_service_registers_with_its_address_and_leaves_on_sigterm(
    tmp_path: Path, etcd: EtcdServer, discovery: EtcdRegistry
) -> None:
    """A started service is discoverable at the address it serves; SIGTERM removes it at once."""
    watch = discovery.watch("echo")
    assert await ids_seen(watch, 5) == []
    service = await EchoProcess.start(
        tmp_path, "echo-a", etcd_endpoints=(etcd.endpoint,), drain_seconds=1.0
    )
    try:
        [instance] = await asyncio.wait_for(watch.next(), 5)
        assert instance.id == "echo-a"
        assert instance.address == service.target
        started = time.monotonic()
        service.send(signal.SIGTERM)
        # Deregistration precedes the 1 s drain: watchers see it while the server still serves.
        assert await ids_seen(watch, 1.0) == []
        print(f"deregistration seen {1000 * (time.monotonic() - started):.1f} ms after SIGTERM")
        assert await asyncio.wait_for(service.proc.wait(), 20) == 0
    finally:
        await service.kill()


async def test_paused_service_expires_then_registers_again(
    tmp_path: Path, etcd: EtcdServer, discovery: EtcdRegistry
) -> None:
    """SIGSTOP longer than the TTL removes the instance; after SIGCONT it is back, new lease."""
    watch = discovery.watch("echo")
    assert await ids_seen(watch, 5) == []
    service = await EchoProcess.start(tmp_path, "echo-p", etcd_endpoints=(etcd.endpoint,))
    try:
        assert await ids_seen(watch, 5) == ["echo-p"]
        lines_before = len(service.lines())
        service.send(signal.SIGSTOP)
        assert await ids_seen(watch, TTL + 3) == [], "paused instance still discovered"
        service.send(signal.SIGCONT)
        assert await ids_seen(watch, 5) == ["echo-p"], "resumed instance did not come back"
        lost = await service.wait_for_log("lease lost; registering again", after=lines_before)
        assert lost["instance_id"] == "echo-p"
    finally:
        await service.kill()


async def test_tether_instances_lists_live_instances(tmp_path: Path, etcd: EtcdServer) -> None:
    """`tether instances` prints each instance's address, version and lease time left."""
    service = await EchoProcess.start(tmp_path, "echo-cli", etcd_endpoints=(etcd.endpoint,))
    try:
        command = [sys.executable, "-m", "tether.cli", "instances", "--endpoints", etcd.endpoint]
        table = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=30, check=True
        )
        header, row = table.stdout.splitlines()
        assert header.split() == [
            "SERVICE",
            "INSTANCE",
            "ADDRESS",
            "VERSION",
            "ZONE",
            "TTL",
            "LEFT",
        ]
        assert row.split()[:4] == ["echo", "echo-cli", service.target, "0.0.0"]
        assert row.split()[-1].endswith("s")
        as_json = await asyncio.to_thread(
            subprocess.run,
            [*command, "--json", "echo"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        [record] = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert record["address"] == service.target
        assert 0 < record["ttl_left_seconds"] <= TTL
        none = await asyncio.to_thread(
            subprocess.run,
            [*command, "orders"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert none.stdout.strip() == "no instances registered under service 'orders'"
    finally:
        await service.kill()


async def test_tether_instances_reports_unreachable_etcd(etcd: EtcdServer) -> None:
    """An unreachable etcd is one line on stderr and exit status 1, no traceback."""
    endpoint = etcd.endpoint
    etcd.stop()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tether.cli", "instances", "--endpoints", endpoint],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"tether instances: etcd unreachable at {endpoint}")
    assert "Traceback" not in result.stderr


class Load:
    """Steady idempotent calls from several concurrent callers, counted by outcome and instance."""

    def __init__(self, channel: object, callers: int = 4) -> None:
        self.echo = echo_pb2_grpc.EchoStub(channel)
        self.outcomes: Counter[str] = Counter()
        self.by_instance: Counter[str] = Counter()
        self._callers = callers
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self) -> None:
        while not self._stop.is_set():
            try:
                reply = await self.echo.Say(echo_pb2.SayRequest(text="hi"), timeout=5)
                self.outcomes["ok"] += 1
                self.by_instance[reply.seen["instance"]] += 1
            except grpc.aio.AioRpcError as exc:
                self.outcomes[exc.code().name] += 1
            except grpc.aio.UsageError:
                return  # the channel closed under a failing test

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._caller()) for _ in range(self._callers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    async def calls(self, count: int, *, within: float = 30) -> None:
        """Wait until ``count`` more calls have been answered."""
        target = self.outcomes.total() + count
        await eventually(
            lambda: self.outcomes.total() >= target, within=within, message=f"{count} more calls"
        )


async def start_three(tmp_path: Path, etcd: EtcdServer, ttl: int) -> list[EchoProcess]:
    return list(
        await asyncio.gather(
            *(
                EchoProcess.start(
                    tmp_path, f"echo-{n}", etcd_endpoints=(etcd.endpoint,), ttl_seconds=ttl
                )
                for n in (1, 2, 3)
            )
        )
    )


async def test_kill_9_under_load_fails_no_idempotent_call(
    tmp_path: Path, etcd: EtcdServer, discovery: EtcdRegistry
) -> None:
    """Three instances, steady load, one SIGKILLed: zero failed calls, no lease wait needed."""
    # A 10 s lease outlives the test: traffic moves because the connection failed, not
    # because etcd forgot the instance.
    services = await start_three(tmp_path, etcd, ttl=10)
    try:
        async with tether.dial("discovery:///echo", discovery=discovery) as channel:
            load = Load(channel)
            load.start()
            await load.calls(300)
            assert set(load.by_instance) == {"echo-1", "echo-2", "echo-3"}
            victim = services[1]
            await victim.kill()
            before = Counter(load.by_instance)
            await load.calls(600)
            await load.stop()
        after = load.by_instance - before
        print(f"calls: {dict(load.outcomes)}; after the kill: {dict(after)}")
        assert set(load.outcomes) == {"ok"}, f"failed calls: {dict(load.outcomes)}"
        assert "echo-2" not in after
        assert after["echo-1"] > 100 and after["echo-3"] > 100
        assert "echo-2" in [i.id for i in await discovery.get("echo")], "lease should still live"
    finally:
        for service in services:
            await service.kill()


async def test_rolling_restart_under_load_fails_no_call(
    tmp_path: Path, etcd: EtcdServer, discovery: EtcdRegistry
) -> None:
    """Each of three instances stopped gracefully and replaced in turn: zero failed calls."""
    services = await start_three(tmp_path, etcd, ttl=2)
    try:
        async with tether.dial("discovery:///echo", discovery=discovery) as channel:
            load = Load(channel)
            load.start()
            await load.calls(100)
            for n in range(3):
                assert await services[n].stop() == 0
                services[n] = await EchoProcess.start(
                    tmp_path / "next",
                    f"echo-{n + 1}b",
                    etcd_endpoints=(etcd.endpoint,),
                    ttl_seconds=2,
                )
                await load.calls(100)
            await load.stop()
        print(f"calls: {dict(load.outcomes)}; by instance: {dict(load.by_instance)}")
        assert set(load.outcomes) == {"ok"}, f"failed calls: {dict(load.outcomes)}"
    finally:
        for service in services:
            await service.kill()
