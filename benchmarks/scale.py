"""Scale: many instances in one etcd and many clients caching them: how fast a change reaches
every cache, what a cached instance costs in memory, and what renewals cost etcd.

The figures feed the 10,000-instance plan in docs/scale.md.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import structlog
from etcd3 import etcdrpc

from benchmarks._common import Section, cpu_seconds, percentile
from tether import configure_logging
from tether.config import RegistryConfig
from tether.registry import EtcdRegistry, Instance, Watcher
from tether.testing import EtcdServer

PREFIX = "/tether/services"
#: The simulated instances' leases: long enough that one renewal round per TTL/3 is plenty.
LEASE_TTL = 300
#: A change not seen by every cache by then is a failure, not a wait.
GIVE_UP_SECONDS = 15.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class _Shape:
    instances: int
    services: int
    clients: int
    changes: int
    syncs: int  # fresh clients timed reading everything
    renewers: int  # real tether registrations timed renewing
    renew_ttl: int
    renew_window: float


FULL = _Shape(1000, 50, 50, 200, 5, 300, 3, 6.0)
QUICK = _Shape(100, 10, 5, 6, 2, 20, 3, 2.0)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _settled_rss() -> int:
    gc.collect()
    return _rss_bytes()


def _instance(service: str, n: int) -> Instance:
    """A realistic registry value: about 230 bytes of JSON."""
    return Instance(
        id=f"{service}-7f9c{n:05d}-a1b2c3",
        service=service,
        address=f"10.{n // 250 % 256}.{n % 250}.{7 + n % 3}:50051",
        version="1.4.2",
        zone=f"zone-{'abc'[n % 3]}",
        started_at=1.8e9 + n,
    )


def _deep_size(instance: Instance) -> int:
    """Bytes of one cached Instance's Python objects (strings, metadata, float), without keys."""
    parts: list[object] = [
        instance,
        instance.id,
        instance.service,
        instance.address,
        instance.version,
        instance.zone,
        instance.metadata,
        dict(instance.metadata),
        instance.started_at,
    ]
    return sum(sys.getsizeof(part) for part in parts)


class _Registrar:
    """Writes the simulated instances straight to etcd, one lease each, as their processes would.

    One keepalive stream renews every lease, as etcd's own Go client does for a process with
    many leases; it runs every ``LEASE_TTL / 3`` and can be timed on demand.
    """

    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.aio.insecure_channel(endpoint)
        self._kv = etcdrpc.KVStub(self._channel)
        self._lease = etcdrpc.LeaseStub(self._channel)
        self.leases: list[int] = []
        self._renewer: asyncio.Task[None] | None = None

    def key(self, instance: Instance) -> bytes:
        return f"{PREFIX}/{instance.service}/{instance.id}".encode()

    async def register(self, instances: Sequence[Instance], batch: int = 100) -> None:
        for start in range(0, len(instances), batch):
            await asyncio.gather(*(self._register(i) for i in instances[start : start + batch]))
        self._renewer = asyncio.ensure_future(self._renew_forever())

    async def _register(self, instance: Instance) -> None:
        # A starved etcd on a busy 2-core machine may time a write out: try again, off the clock.
        for attempt in range(3):
            try:
                grant = await self._lease.LeaseGrant(
                    etcdrpc.LeaseGrantRequest(TTL=LEASE_TTL), timeout=10
                )
                await self.put(instance, lease=grant.ID)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or attempt == 2:
                    raise
            else:
                self.leases.append(grant.ID)
                return

    async def put(self, instance: Instance, lease: int = 0) -> None:
        request = etcdrpc.PutRequest(key=self.key(instance), value=instance.to_json(), lease=lease)
        await self._kv.Put(request, timeout=10)

    async def delete(self, instance: Instance) -> None:
        await self._kv.DeleteRange(etcdrpc.DeleteRangeRequest(key=self.key(instance)), timeout=10)

    async def prefix_bytes(self) -> tuple[int, int]:
        """Keys and the bytes of keys plus values under the prefix: what a full read moves."""
        start = PREFIX.encode() + b"/"
        end = start[:-1] + bytes([start[-1] + 1])
        response = await self._kv.Range(etcdrpc.RangeRequest(key=start, range_end=end), timeout=10)
        return len(response.kvs), sum(len(kv.key) + len(kv.value) for kv in response.kvs)

    async def renew_all(self) -> float:
        """Renew every lease once over one stream; seconds it took."""
        started = time.perf_counter()
        call = self._lease.LeaseKeepAlive()
        try:
            for lease in self.leases:
                await call.write(etcdrpc.LeaseKeepAliveRequest(ID=lease))
            for _ in self.leases:
                response = await call.read()
                if not isinstance(response, etcdrpc.LeaseKeepAliveResponse) or response.TTL <= 0:
                    raise RuntimeError("a simulated instance's lease was lost")
        finally:
            call.cancel()
        return time.perf_counter() - started

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            await self.renew_all()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        await self._channel.close(grace=None)


@dataclass
class _Change:
    """One put or delete of an instance, and when each client's watch of its service saw it."""

    service: int
    instance_id: str
    present: bool
    clients: int  # clients 0 .. clients - 1 must see it
    seen: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, client: int, snapshot: list[Instance]) -> None:
        if client in self.seen or client >= self.clients:
            return
        if any(i.id == self.instance_id for i in snapshot) is self.present:
            self.seen[client] = time.perf_counter()
            if len(self.seen) == self.clients:
                self.done.set()


class _Caches:
    """Every client's watch of every service, read by one task each."""

    def __init__(self, clients: int, services: int) -> None:
        self.totals = [0] * clients  # instances each client's watches show, all services
        self._sizes = [[0] * services for _ in range(clients)]
        self._started = [[False] * services for _ in range(clients)]
        self._progress = asyncio.Event()
        self.change: _Change | None = None

    async def follow(self, client: int, service: int, watch: Watcher) -> None:
        while True:
            snapshot = await watch.next()
            self.totals[client] += len(snapshot) - self._sizes[client][service]
            self._sizes[client][service] = len(snapshot)
            self._started[client][service] = True
            change = self.change
            if change is not None and change.service == service:
                change.offer(client, snapshot)
            self._progress.set()

    async def wait_for(self, instances: int) -> None:
        """Until every watch has answered and every client shows ``instances`` in all."""
        while not all(all(row) for row in self._started) or any(
            total != instances for total in self.totals
        ):
            self._progress.clear()
            await self._progress.wait()


def _etcd_counters(etcd: EtcdServer) -> dict[str, float]:
    """etcd's gRPC calls started so far, by method (its /metrics)."""
    with _DIRECT.open(f"{etcd.client_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_started_total{"):
            labels, _, value = line.rpartition(" ")
            method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0.0) + float(value)
    return counts


@dataclass
class _Figures:
    shape: _Shape
    fill_seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    object_bytes: int = 0
    last: list[float] = field(default_factory=list)
    alone: list[float] = field(default_factory=list)
    client_cpu_per_event: float = 0.0
    change_seconds: float = 0.0
    change_etcd_cpu: float = 0.0
    sync_seconds: list[float] = field(default_factory=list)
    prefix_keys: int = 0
    prefix_bytes: int = 0
    bulk_round_seconds: list[float] = field(default_factory=list)
    bulk_etcd_cpu: list[float] = field(default_factory=list)
    idle_etcd_cpu_per_second: float = 0.0
    renew_etcd_cpu_per_second: float = 0.0
    renew_calls: dict[str, float] = field(default_factory=dict)
    renew_client_cpu_per_second: float = 0.0

    @property
    def bytes_per_instance(self) -> float:
        cached = self.shape.clients * self.shape.instances
        return (self.rss_after - self.rss_before) / cached

    @property
    def renewals_per_second(self) -> float:
        return self.renew_calls.get("LeaseKeepAlive", 0.0) / self.shape.renew_window


async def _time_changes(
    registrar: _Registrar, caches: _Caches, *, clients: int, shape: _Shape, seed: int
) -> list[float]:
    """Put, then delete, one instance at a time in a random service; per change, the seconds
    from before the write until the watches of clients ``0 .. clients - 1`` all delivered it."""
    rng = random.Random(seed)
    latencies: list[float] = []
    for n in range(shape.changes // 2):
        service = rng.randrange(shape.services)
        probe = _instance(f"svc-{service:02d}", 100_000 * seed + n)
        for present in (True, False):
            change = _Change(service, probe.id, present, clients)
            caches.change = change
            started = time.perf_counter()
            await (registrar.put(probe) if present else registrar.delete(probe))
            try:
                async with asyncio.timeout(GIVE_UP_SECONDS):
                    await change.done.wait()
            except TimeoutError:
                raise RuntimeError(
                    f"{len(change.seen)} of {clients} caches saw a change in {GIVE_UP_SECONDS:g} s"
                ) from None
            latencies.append(max(change.seen.values()) - started)
            caches.change = None
            await asyncio.sleep(rng.uniform(0.005, 0.02))  # unsynchronised with anything
    return latencies


async def _measure_sync(etcd: EtcdServer, shape: _Shape, figures: _Figures) -> None:
    """A fresh client (a process starting): connect, read every instance, answer a watch."""
    for _ in range(shape.syncs):
        registry = EtcdRegistry(RegistryConfig(endpoints=(etcd.endpoint,), prefix=PREFIX))
        try:
            started = time.perf_counter()
            await registry.watch("svc-00").next()
            figures.sync_seconds.append(time.perf_counter() - started)
        finally:
            await registry.close()


async def _measure_renewals(etcd: EtcdServer, shape: _Shape, figures: _Figures) -> None:
    """What tether's own renewal loop costs etcd: real registrations with a short TTL."""
    window = shape.renew_window
    before = cpu_seconds(etcd.pid)
    await asyncio.sleep(window)
    figures.idle_etcd_cpu_per_second = (cpu_seconds(etcd.pid) - before) / window
    # Under another prefix, so the watching clients do not see them.
    config = RegistryConfig(
        endpoints=(etcd.endpoint,), prefix="/bench/renewals", ttl_seconds=shape.renew_ttl
    )
    registry = EtcdRegistry(config)
    try:
        for n in range(shape.renewers):
            await registry.register(_instance("renewing", n))
        await asyncio.sleep(shape.renew_ttl / 3)  # every loop in its steady renewal period
        calls_before = _etcd_counters(etcd)
        etcd_before, client_before = cpu_seconds(etcd.pid), time.process_time()
        await asyncio.sleep(window)
        etcd_after, client_after = cpu_seconds(etcd.pid), time.process_time()
        calls_after = _etcd_counters(etcd)
    finally:
        await registry.close()
    figures.renew_etcd_cpu_per_second = (etcd_after - etcd_before) / window
    figures.renew_client_cpu_per_second = (client_after - client_before) / window
    figures.renew_calls = {
        method: calls_after.get(method, 0.0) - count
        for method, count in calls_before.items()
        if calls_after.get(method, 0.0) - count > 0
    }


async def _run(shape: _Shape) -> _Figures:
    etcd = EtcdServer()
    try:
        await asyncio.to_thread(etcd.start)
        return await _run_on(etcd, shape)
    finally:
        await asyncio.to_thread(etcd.close)


async def _run_on(etcd: EtcdServer, shape: _Shape) -> _Figures:
    figures = _Figures(shape)
    registrar = _Registrar(etcd.endpoint)
    clients = [
        EtcdRegistry(RegistryConfig(endpoints=(etcd.endpoint,), prefix=PREFIX))
        for _ in range(shape.clients)
    ]
    caches = _Caches(shape.clients, shape.services)
    followers: list[list[asyncio.Task[None]]] = []
    try:
        for client, registry in enumerate(clients):
            followers.append(
                [
                    asyncio.ensure_future(
                        caches.follow(client, service, registry.watch(f"svc-{service:02d}"))
                    )
                    for service in range(shape.services)
                ]
            )
        async with asyncio.timeout(60):
            await caches.wait_for(0)
        figures.rss_before = _settled_rss()
        instances = [_instance(f"svc-{n % shape.services:02d}", n) for n in range(shape.instances)]
        started = time.perf_counter()
        await registrar.register(instances)
        async with asyncio.timeout(120):
            await caches.wait_for(shape.instances)
        figures.fill_seconds = time.perf_counter() - started
        figures.rss_after = _settled_rss()
        del instances
        key_bytes = sys.getsizeof(f"{PREFIX}/svc-00/{_instance('svc-00', 0).id}".encode())
        figures.object_bytes = _deep_size(_instance("svc-00", 0)) + key_bytes

        cpu_started, etcd_started = time.process_time(), cpu_seconds(etcd.pid)
        wall_started = time.perf_counter()
        figures.last = await _time_changes(
            registrar, caches, clients=shape.clients, shape=shape, seed=1
        )
        events = len(figures.last) * shape.clients
        figures.client_cpu_per_event = (time.process_time() - cpu_started) / events
        figures.change_seconds = time.perf_counter() - wall_started
        figures.change_etcd_cpu = cpu_seconds(etcd.pid) - etcd_started
        # One client left, as if each ran in a process of its own: its latency without the
        # other caches' work queued in the same event loop.
        for client in range(1, shape.clients):
            for task in followers[client]:
                task.cancel()
            await clients[client].close()
        figures.alone = await _time_changes(registrar, caches, clients=1, shape=shape, seed=2)

        await _measure_sync(etcd, shape, figures)
        figures.prefix_keys, figures.prefix_bytes = await registrar.prefix_bytes()
        for _ in range(3):
            before = cpu_seconds(etcd.pid)
            figures.bulk_round_seconds.append(await registrar.renew_all())
            figures.bulk_etcd_cpu.append(cpu_seconds(etcd.pid) - before)
        await _measure_renewals(etcd, shape, figures)
    finally:
        for tasks in followers:
            for task in tasks:
                task.cancel()
        for registry in clients:
            await registry.close()
        await registrar.close()
    return figures


async def measure(quick: bool) -> Section:
    shape = QUICK if quick else FULL
    saved = structlog.get_config()
    configure_logging("error", "console", stream=sys.stderr)
    try:
        figures = await _run(shape)
    finally:
        structlog.configure(**saved)
    return _section(figures)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _section(f: _Figures) -> Section:
    s = f.shape
    last_p99 = percentile(f.last, 0.99)
    renewals = f.renewals_per_second
    renew_cpu = f.renew_etcd_cpu_per_second - f.idle_etcd_cpu_per_second
    bulk_renewals = s.instances
    sync = statistics.median(f.sync_seconds)
    change_etcd = max(0.0, f.change_etcd_cpu - f.idle_etcd_cpu_per_second * f.change_seconds)
    rows: list[Sequence[str]] = [
        (
            f"change to every one of {s.clients} caches (p50 / p99 / max of {len(f.last)})",
            f"{_ms(percentile(f.last, 0.5))} / {_ms(last_p99)} / {_ms(max(f.last))}",
        ),
        (
            f"change to one client's cache, the other {s.clients - 1} closed (p50 / p99 / max)",
            f"{_ms(percentile(f.alone, 0.5))} / {_ms(percentile(f.alone, 0.99))} / "
            f"{_ms(max(f.alone))}",
        ),
        (
            "client CPU per change per cache (decode, apply, publish to the watch)",
            f"{f.client_cpu_per_event * 1e6:.0f} µs",
        ),
        (
            "etcd CPU per change per watching client (above idle)",
            f"{change_etcd / (len(f.last) * s.clients) * 1e6:.0f} µs",
        ),
        (
            f"{s.instances:,} instances put, until every cache held them all",
            f"{f.fill_seconds:.2f} s",
        ),
        (
            "memory per cached instance (RSS growth / cached copies)",
            f"{f.bytes_per_instance:,.0f} B ({(f.rss_after - f.rss_before) / 2**20:.1f} MiB for "
            f"{s.clients} x {s.instances:,})",
        ),
        ("the same, counting the Python objects of one entry", f"{f.object_bytes:,} B"),
        (
            f"a new client's first full read of {f.prefix_keys:,} instances (median of "
            f"{len(f.sync_seconds)})",
            f"{_ms(sync)} ({sync / max(f.prefix_keys, 1) * 1e6:.0f} µs per instance; "
            f"{f.prefix_bytes / max(f.prefix_keys, 1):.0f} B per key and value)",
        ),
        (
            f"{bulk_renewals:,} leases renewed over one keepalive stream (median of 3)",
            f"{_ms(statistics.median(f.bulk_round_seconds))}, etcd CPU "
            f"{statistics.median(f.bulk_etcd_cpu) / bulk_renewals * 1e6:.0f} µs per renewal",
        ),
        (
            f"tether's renewal loop: {s.renewers} registrations, TTL {s.renew_ttl} s",
            f"{renewals:,.0f} renewals/s; etcd calls/s: "
            + ", ".join(
                f"{method} {count / s.renew_window:,.0f}"
                for method, count in sorted(f.renew_calls.items())
            ),
        ),
        (
            "etcd CPU per tether renewal (above idle)",
            f"{renew_cpu / renewals * 1e6:.0f} µs" if renewals else "-",
        ),
        (
            "registering process CPU per tether renewal",
            f"{f.renew_client_cpu_per_second / renewals * 1e6:.0f} µs" if renewals else "-",
        ),
    ]
    return Section(
        title="Scale: many instances, many caches",
        method=(
            f"One etcd; {s.instances:,} instances across {s.services} services, each key under a "
            f"lease of its own (written straight to etcd, leases renewed over one stream); "
            f"{s.clients} clients, each an EtcdRegistry of its own (its own connection and one "
            f"watch of the whole prefix, as tether keeps per process) subscribed to all "
            f"{s.services} services, every subscription read by a task. {s.changes} changes "
            "(a put, then the delete of the same instance, in a random service) are timed "
            "from before the write to the moment every client's watch of that service "
            f"delivered it; then {s.clients - 1} clients close and the same is timed for "
            "the one left. Memory: this process's RSS after garbage collection, with the "
            "clients connected and synced on an empty prefix, then with every instance "
            "cached. All clients share this one process and event loop."
        ),
        header=("measure", "value"),
        rows=rows,
        # The benchmark issue sets no bar here: the figures feed docs/scale.md's plan.
        bars=[],
        notes=[
            "The machine has 2 cores shared with other work while this ran: the figures are "
            "noisy, the p99 and max especially.",
            f"The {s.clients} clients run in one process, so every change is decoded "
            f"{s.clients} times one after another on one core: the time to the last cache is "
            "that serial work (about the client CPU per change times the clients) plus etcd's "
            "fan-out. Clients in processes of their own work in parallel: each sees a change "
            "about as fast as the one client left alone here, plus etcd's fan-out.",
            "Each client subscribes to every service, though a real client would watch a "
            "few dependencies: tether keeps one watch of the whole prefix per process and "
            "caches every instance whatever is subscribed, so subscriptions only decide which "
            "watchers wake; subscribing to all makes every cache observable and is the most "
            "wake-ups a change can cause.",
            "The issue asks for no figure here; the bar is the graceful-shutdown one. See "
            "docs/scale.md for the 10,000-instance plan built on these figures.",
        ],
    )
