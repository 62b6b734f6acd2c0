"""The registry's value type, the in-memory backend, backoff and key helpers."""

from __future__ import annotations

import asyncio

import pytest

from tether.registry import Instance, MemoryRegistry, WatchClosed
from tether.registry.base import InstanceWatch
from tether.registry.etcd import Backoff, _parse
from tether.registry.etcd_client import prefix_end


def users(n: int, **fields: object) -> Instance:
    fields.setdefault("started_at", 1_800_000_000.0)
    return Instance(id=f"users-{n}", service="users", address=f"127.0.0.1:{5000 + n}", **fields)  # type: ignore[arg-type]


def test_instance_round_trips_through_json() -> None:
    """Every field survives to_json / from_json."""
    instance = users(1, version="1.2.3", zone="eu-1", weight=50, metadata={"k": "v"})
    assert Instance.from_json(instance.to_json()) == instance


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", ":50051", "host", "h:0", "h:x"])
def test_instance_refuses_unreachable_address(address: str) -> None:
    """A wildcard host, a missing host or a bad port is refused."""
    with pytest.raises(ValueError, match="address must be a reachable host:port"):
        Instance(id="a", service="users", address=address)


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[]",
        b'{"id": "a"}',
        b'{"id": "a", "service": "s", "address": 5}',
        b'{"id": "a", "service": "s", "address": "h:1", "weight": -1}',
    ],
)
def test_from_json_refuses_malformed_values(value: bytes) -> None:
    """Malformed registry values raise ValueError, never anything else."""
    with pytest.raises(ValueError, match=r"JSON|missing field|must be"):
        Instance.from_json(value)


def test_parse_ignores_values_whose_key_disagrees() -> None:
    """A value registered under another service's key is ignored, not trusted."""
    prefix = b"/tether/services/"
    value = users(1).to_json()
    assert _parse(prefix + b"users/users-1", value, prefix) == users(1)
    assert _parse(prefix + b"orders/users-1", value, prefix) is None
    assert _parse(prefix + b"users/users-1", b"{", prefix) is None


def test_prefix_end() -> None:
    """range_end is the prefix with its last byte incremented, carrying over 0xff."""
    assert prefix_end(b"/tether/services/") == b"/tether/services0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    """Each delay lies in [d/2, d], d doubling up to the cap; reset starts over."""
    backoff = Backoff(0.1, 1.0, rand=lambda low, high: high)
    assert [round(backoff.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.1
    low = Backoff(0.1, 1.0, rand=lambda low, high: low)
    assert low.next() == 0.05


def test_backoff_refuses_bad_bounds() -> None:
    """initial must be positive and not above maximum."""
    with pytest.raises(ValueError, match="need 0 < initial"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="need 0 < initial"):
        Backoff(2, 1)


async def test_memory_registry_register_watch_deregister() -> None:
    """A watch sees registrations and deregistrations at once, in a stable order."""
    registry = MemoryRegistry()
    watch = registry.watch("users")
    assert await watch.next() == []
    await registry.register(users(2))
    await registry.register(users(1))
    assert await watch.next() == [users(1), users(2)]
    assert await registry.get("users") == [users(1), users(2)]
    await registry.deregister(users(2))
    assert await watch.next() == [users(1)]
    await registry.close()
    with pytest.raises(WatchClosed):
        await watch.next()


async def test_watch_wakes_a_reader_with_the_newest_snapshot_only() -> None:
    """A slow reader skips intermediate snapshots instead of queueing them."""
    watch = InstanceWatch("users")
    watch.publish([users(1)])
    watch.publish([users(1), users(2)])
    assert await watch.next() == [users(1), users(2)]
    watch.publish([users(2), users(1)])  # the same set in another order is no change
    waiter = asyncio.ensure_future(watch.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    watch.close()
    with pytest.raises(WatchClosed):
        await waiter


async def test_closed_watch_ends_async_iteration() -> None:
    """`async for` over a watch stops when it is closed."""
    registry = MemoryRegistry()
    watch = registry.watch("users")
    seen = []
    async for snapshot in watch:  # type: ignore[attr-defined]
        seen.append(snapshot)
        watch.close()
    assert seen == [[]]


async def test_memory_registry_reports_registration_state() -> None:
    """on_state hears registered at once and deregistered when withdrawn."""
    registry = MemoryRegistry()
    states: list[str] = []
    await registry.register(users(1), on_state=states.append)
    assert states == ["registered"]
    await registry.deregister(users(1))
    assert states == ["registered", "deregistered"]
