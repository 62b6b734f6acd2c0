"""Registration of real service processes in a real etcd: start, stop, and the CLI.

Faults under load (kill -9, pause, rolling restart) are scenarios of tests/reliability/.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.processes import EchoProcess

from tether.config import RegistryConfig
from tether.registry import EtcdRegistry
from tether.testing import EtcdServer

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
