"""The etcd registry against a real etcd: register, discover, and survive etcd's faults.

The faults with real service processes under load (etcd down, wiped, its leader killed, a
partition, compaction while cut off) are scenarios of tests/reliability/test_etcd_faults.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from etcd3 import etcdrpc
from support.echo_service import build_app

import tether
from tether.config import RegistryConfig
from tether.errors import RegistryUnavailable
from tether.registry import EtcdRegistry, Instance, MemoryRegistry, Registry
from tether.testing import (
    EtcdServer,
    eventually,
    loopback_config,
    running,
)

# Generous bounds for a loaded 2-core CI machine; benchmarks report the real figures.
SEEN_WITHIN = 2.0


def users(n: int) -> Instance:
    return Instance(
        id=f"users-{n}", service="users", address=f"127.0.0.1:{6000 + n}", started_at=1.8e9
    )


def config_for(etcd: EtcdServer, **fields: object) -> RegistryConfig:
    return RegistryConfig(endpoints=(etcd.endpoint,), **fields)  # type: ignore[arg-type]


@pytest.fixture
async def registries(etcd: EtcdServer) -> AsyncIterator[tuple[EtcdRegistry, EtcdRegistry]]:
    """Two registries on one etcd: one registers (the service), one watches (a client)."""
    service = EtcdRegistry(config_for(etcd, ttl_seconds=2))
    client = EtcdRegistry(config_for(etcd, ttl_seconds=2))
    try:
        yield service, client
    finally:
        await service.close()
        await client.close()


def registered_ids(etcd: EtcdServer) -> set[str]:
    client = etcd.client(timeout=1.0)
    try:
        return {meta.key.decode().rsplit("/", 1)[1] for _, meta in client.get_prefix("/tether/")}
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["memory", "etcd"])
async def test_register_discover_deregister(backend: str, etcd: EtcdServer) -> None:
    """Both backends keep the Registry contract: get, watch, deregister."""
    registry: Registry = MemoryRegistry() if backend == "memory" else EtcdRegistry(config_for(etcd))
    try:
        watch = registry.watch("users")
        assert await asyncio.wait_for(watch.next(), 5) == []
        await registry.register(users(1))
        await registry.register(users(2))
        assert [i.id for i in await asyncio.wait_for(watch.next(), 5)] in (
            ["users-1"],
            ["users-1", "users-2"],
        )

        async def both_listed() -> bool:
            return [i.id for i in await registry.get("users")] == ["users-1", "users-2"]

        # register() returns once the registration loop runs; the put may land a moment later.
        await eventually(both_listed, within=5, message="both instances listed")
        assert await registry.get("orders") == []
        await registry.deregister(users(1))
        await eventually(
            lambda: [i.id for i in watch._snapshot or []] == ["users-2"],  # type: ignore[attr-defined]
            within=5,
            message="deregistered instance gone from the watch",
        )
    finally:
        await registry.close()


async def test_value_has_every_field(
    etcd: EtcdServer, registries: tuple[EtcdRegistry, EtcdRegistry]
) -> None:
    """The key is {prefix}/{service}/{id} and the value is the instance's JSON, under a lease."""
    service, _ = registries
    instance = Instance(
        id="users-9",
        service="users",
        address="10.1.2.3:50051",
        version="2.0.0",
        zone="eu-1",
        weight=30,
        metadata={"team": "id"},
    )
    await service.register(instance)
    client = etcd.client()
    try:
        value, meta = client.get("/tether/services/users/users-9")
    finally:
        client.close()
    assert value is not None and Instance.from_json(value) == instance
    assert meta.lease_id != 0


async def test_graceful_deregistration_is_seen_at_once(
    registries: tuple[EtcdRegistry, EtcdRegistry],
) -> None:
    """Revoking the lease deletes the key: a watching client sees it well within 100 ms."""
    service, client = registries
    watch = client.watch("users")
    await asyncio.wait_for(watch.next(), 5)
    await service.register(users(1))
    assert await asyncio.wait_for(watch.next(), 5) == [users(1)]
    started = time.monotonic()
    await service.deregister(users(1))
    assert await asyncio.wait_for(watch.next(), SEEN_WITHIN) == []
    elapsed = time.monotonic() - started
    print(f"deregistration seen after {elapsed * 1000:.1f} ms")


async def test_deleted_key_is_put_back(
    etcd: EtcdServer, registries: tuple[EtcdRegistry, EtcdRegistry]
) -> None:
    """Someone deleting the instance's key from outside does not unregister it for long."""
    service, _ = registries
    await service.register(users(1))
    client = etcd.client()
    try:
        client.delete("/tether/services/users/users-1")
    finally:
        client.close()
    await eventually(lambda: "users-1" in registered_ids(etcd), within=5, message="key put back")


async def test_malformed_values_are_ignored(
    etcd: EtcdServer, registries: tuple[EtcdRegistry, EtcdRegistry]
) -> None:
    """Junk under the prefix is skipped; real instances around it are still discovered."""
    service, discovery = registries
    client = etcd.client()
    try:
        client.put("/tether/services/users/junk", "{not json")
        client.put("/tether/services/users/wrong", users(7).to_json())
    finally:
        client.close()
    watch = discovery.watch("users")
    assert await asyncio.wait_for(watch.next(), 5) == []
    await service.register(users(1))
    assert await asyncio.wait_for(watch.next(), 5) == [users(1)]


async def test_lease_expires_when_renewal_stops(
    etcd: EtcdServer, registries: tuple[EtcdRegistry, EtcdRegistry]
) -> None:
    """A crashed instance (no more keepalives) disappears after its TTL."""
    service, client = registries
    await service.register(users(1))
    registration = service._registrations["users-1"]
    assert registration._task is not None
    registration._task.cancel()  # a crash: the loop stops without revoking
    watch = client.watch("users")
    assert await asyncio.wait_for(watch.next(), 5) == [users(1)]
    assert await asyncio.wait_for(watch.next(), 2 + 2) == []


async def test_etcd_down_at_start_up_registers_when_it_answers(etcd: EtcdServer) -> None:
    """A service starts while etcd is down, and registers once it comes up."""
    endpoint = etcd.endpoint
    etcd.stop()
    registry = EtcdRegistry(RegistryConfig(endpoints=(endpoint,), ttl_seconds=2))
    try:
        await asyncio.wait_for(registry.register(users(1)), 5)  # returns: not required
        etcd.start()
        await eventually(lambda: "users-1" in registered_ids(etcd), within=3, message="registered")
    finally:
        await registry.close()


async def test_required_registration_fails_start_up(etcd: EtcdServer) -> None:
    """With registry.required, an unreachable etcd is an error naming the endpoints."""
    endpoint = etcd.endpoint
    etcd.stop()
    registry = EtcdRegistry(RegistryConfig(endpoints=(endpoint,), ttl_seconds=2, required=True))
    try:
        with pytest.raises(RegistryUnavailable, match=f"within 2 s at {endpoint}"):
            await registry.register(users(1))
    finally:
        await registry.close()


async def test_get_without_etcd_raises_registry_unavailable(etcd: EtcdServer) -> None:
    """Before any successful read, an unreachable etcd is an error, not an empty list."""
    endpoint = etcd.endpoint
    etcd.stop()
    registry = EtcdRegistry(RegistryConfig(endpoints=(endpoint,)))
    try:
        with pytest.raises(RegistryUnavailable, match="etcd unreachable"):
            await registry.get("users")
    finally:
        await registry.close()


async def test_username_and_password_are_used(etcd: EtcdServer) -> None:
    """With auth enabled in etcd, the registry authenticates; a wrong password registers nothing."""
    async with grpc.aio.insecure_channel(etcd.endpoint) as channel:
        auth = etcdrpc.AuthStub(channel)
        await auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password="s3cret"))
        await auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.AuthEnable(etcdrpc.AuthEnableRequest())
    good = EtcdRegistry(config_for(etcd, username="root", password="s3cret"))
    bad = EtcdRegistry(config_for(etcd, username="root", password="wrong"))
    try:
        await good.register(users(1))
        assert [i.id for i in await good.get("users")] == ["users-1"]
        await bad.register(users(2))
        with pytest.raises(Exception, match="authentication failed"):
            await bad.get("users")
        assert [i.id for i in await good.get("users")] == ["users-1"]
    finally:
        await good.close()
        await bad.close()


async def test_watch_from_a_compacted_revision_reads_everything_again(
    etcd: EtcdServer, registries: tuple[EtcdRegistry, EtcdRegistry]
) -> None:
    """A watch refused for compaction ends quietly, so the follower re-lists instead of failing."""
    service, discovery = registries
    await service.register(users(1))
    await service.deregister(users(1))
    client = etcd.client()
    try:
        client.compact(client.put("/unrelated", "x").header.revision)
    finally:
        client.close()
    discovery.watch("users")
    follower = discovery._follower
    assert follower is not None
    await asyncio.wait_for(follower._follow(start_revision=1), 5)  # returns: compacted


async def test_instances_etcd_forgot_are_held_then_dropped_if_not_back(
    etcd: EtcdServer, registries: tuple[EtcdRegistry, EtcdRegistry]
) -> None:
    """After a wipe, a vanished instance is held (callers keep it), then dropped if not back."""
    service, client = registries  # ttl 2 s: held for 4 s
    await service.register(users(1))
    watch = client.watch("users")
    assert await asyncio.wait_for(watch.next(), 5) == [users(1)]
    registration = service._registrations.pop("users-1")
    assert registration._task is not None
    registration._task.cancel()  # it will not register again
    etcd.restart(wipe=True)
    wiped = time.monotonic()
    assert await asyncio.wait_for(watch.next(), 2 * 2 + 3) == [], "never dropped"
    held_for = time.monotonic() - wiped
    assert held_for >= 2 * 2 - 0.5, f"dropped after {held_for:.2f} s, before the hold ended"


async def test_app_client_reaches_a_peer_through_the_registry(etcd: EtcdServer) -> None:
    """app.client(name) is a governed channel to the instances registered under that name."""
    registry = {"backend": "etcd", "endpoints": [etcd.endpoint], "ttl_seconds": 2}
    async with (
        running(build_app(loopback_config("echo", registry=registry))) as peer,
        running(build_app(loopback_config("caller", registry=registry))) as caller,
    ):
        echo = echo_pb2_grpc.EchoStub(caller.client("echo"))
        reply = await echo.Say(echo_pb2.SayRequest(text="hi"), timeout=5)
        assert reply.seen["instance"] == peer.instance_id
        assert caller.client("echo") is caller.client("echo")


async def test_app_client_without_registry_is_a_config_error() -> None:
    """With registry.backend none, asking for a discovered client names the setting."""
    app = build_app(loopback_config("caller"))
    with pytest.raises(
        tether.ConfigError, match=r"registry.backend='none': cannot discover 'echo'"
    ):
        app.client("echo")
