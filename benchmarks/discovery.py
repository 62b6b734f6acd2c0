"""Discovery: how fast every client routes away from an instance that shuts down gracefully, and
how fast an instance is registered again once etcd is back after an outage."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog
from etcd3 import etcdrpc

from benchmarks._common import Bar, Section, percentile
from tether import App, configure_logging
from tether.channel import Channel
from tether.config import RegistryConfig
from tether.errors import RegistryUnavailable
from tether.registry import EtcdRegistry, Instance
from tether.registry.etcd_client import EtcdConnection
from tether.testing import EtcdServer, TcpProxy, loopback_config

#: Client processes watching the service, each with a registry of its own.
CLIENTS = 5
#: Instances that stay registered throughout, so the one that leaves is never the last.
STABLE_INSTANCES = 2
#: The stopping App's drain: it keeps serving this long after deregistering, as in production,
#: so its server's shutdown does not compete with the clients for the CPU while they are timed.
DRAIN_SECONDS = 0.15
ROUTE_AWAY_BAR = 0.100
REREGISTER_BAR = 2.0
#: How often the key of an instance that lost it is looked for in etcd.
KEY_POLL_SECONDS = 0.005
#: A trial that has not ended by then is a failure, not a wait.
GIVE_UP_SECONDS = 15.0


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Only errors, on stderr: 200 apps starting and stopping would bury the figures."""
    saved = structlog.get_config()
    configure_logging("error", "console", stream=sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**saved)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --------------------------------------------------------------------------- routing away


class _Routing:
    """Which clients route to an address, told by each channel's membership hook.

    ``Channel(on_members=...)`` is called inside the channel's membership update, right after
    the set its balancer picks from was replaced: the moment a client stops (or starts)
    routing to an instance, with no polling delay.
    """

    def __init__(self) -> None:
        self.channels: list[Channel] = []
        self._address: str | None = None
        self._present = False
        self._seen: dict[int, float] = {}
        self._done = asyncio.Event()

    def hook(self, index: int) -> Callable[[int], None]:
        def on_members(_count: int) -> None:
            self._check(index)

        return on_members

    def expect(self, address: str, *, present: bool) -> asyncio.Event:
        """Start timing until every client has ``address`` (or, not ``present``, lacks it)."""
        self._address, self._present = address, present
        self._seen, self._done = {}, asyncio.Event()
        for index in range(len(self.channels)):
            self._check(index)
        return self._done

    @property
    def seen(self) -> list[float]:
        """When each client got there (``time.perf_counter()``), in no particular order."""
        return list(self._seen.values())

    def _check(self, index: int) -> None:
        if self._address is None or index in self._seen:
            return
        if (self._address in self.channels[index].subchannels) is self._present:
            self._seen[index] = time.perf_counter()
            if len(self._seen) == len(self.channels):
                self._done.set()


@dataclass
class _RouteAway:
    """Per trial, seconds from ``App.stop()``: lease revoked, first client, last client."""

    revoked: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)


async def _measure_route_away(trials: int) -> _RouteAway:
    etcd = EtcdServer()
    try:
        await asyncio.to_thread(etcd.start)
        return await _route_away(etcd, trials)
    finally:
        await asyncio.to_thread(etcd.close)


async def _route_away(etcd: EtcdServer, trials: int) -> _RouteAway:
    registry_section = {"backend": "etcd", "endpoints": [etcd.endpoint], "ttl_seconds": 10}

    def new_app() -> App:
        return App(
            loopback_config(
                "svc", registry=registry_section, server={"drain_seconds": DRAIN_SECONDS}
            )
        )

    routing = _Routing()
    registries = [EtcdRegistry(RegistryConfig(endpoints=(etcd.endpoint,))) for _ in range(CLIENTS)]
    stable: list[App] = []
    result = _RouteAway()
    try:
        for index, registry in enumerate(registries):
            channel = Channel(
                "discovery:///svc", discovery=registry, on_members=routing.hook(index)
            )
            routing.channels.append(channel)
            channel.get_state(try_to_connect=True)  # start following the membership now
        for _ in range(STABLE_INSTANCES):
            stable.append(new_app())
            await stable[-1].start()
        rng = random.Random(8)
        for _ in range(trials):
            await _route_away_trial(new_app(), routing, result)
            # Unsynchronised with anything periodic in the registry or the channels.
            await asyncio.sleep(rng.uniform(0.01, 0.05))
    finally:
        for channel in routing.channels:
            await channel.close()
        for registry in registries:
            await registry.close()
        for app in stable:
            await app.stop(drain=0, grace=0)
    return result


async def _route_away_trial(app: App, routing: _Routing, result: _RouteAway) -> None:
    revoked: list[float] = []

    async def note_revoked(_: App) -> None:
        revoked.append(time.perf_counter())  # before_stop runs right after deregister()

    app.before_stop(note_revoked)
    await app.start()
    assert app.instance is not None
    address = app.instance.address
    try:
        async with asyncio.timeout(GIVE_UP_SECONDS):
            await routing.expect(address, present=True).wait()
    except TimeoutError:
        await app.stop(drain=0, grace=0)
        raise RuntimeError(f"not every client discovered {address}") from None
    left = routing.expect(address, present=False)
    started = time.perf_counter()
    stopping = asyncio.ensure_future(app.stop())
    try:
        async with asyncio.timeout(GIVE_UP_SECONDS):
            await left.wait()
    except TimeoutError:
        raise RuntimeError(f"a client still routes to {address} after shutdown") from None
    finally:
        await stopping
    seen = routing.seen
    result.revoked.append(revoked[0] - started)
    result.first.append(min(seen) - started)
    result.last.append(max(seen) - started)


# --------------------------------------------------------------------------- registered again


@dataclass(frozen=True)
class _Outage:
    """One way etcd goes away from an instance and comes back.

    ``stop``: etcd is stopped, then started with its data; ``wipe``: started again empty;
    ``partition``: etcd stays up and the instance's connections to it are cut.
    """

    label: str
    how: Literal["stop", "wipe", "partition"]
    down: float


@dataclass
class _Reregistered:
    """Per trial, seconds from etcd back to the instance registered again, and what happened."""

    outage: _Outage
    seconds: list[float] = field(default_factory=list)
    key_survived: int = 0  # trials in which the key was still in etcd when it came back
    key_gone_before_return: int = 0  # partition trials in which the lease had expired


class _States:
    """The registration's state changes (the ``on_state`` hook), with their times."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, state: str) -> None:
        self.log.append((time.perf_counter(), state))
        self._changed.set()

    async def settled(self) -> None:
        """Until the registration is ``registered``."""
        while not self.log or self.log[-1][1] != "registered":
            self._changed.clear()
            await self._changed.wait()

    async def registered_after(self, mark: int) -> float:
        """When the registration next became ``registered`` after it left that state."""
        while True:
            left = False
            for at, state in self.log[mark:]:
                if state != "registered":
                    left = True
                elif left:
                    return at
            self._changed.clear()
            await self._changed.wait()


async def _key_present(conn: EtcdConnection, key: bytes) -> bool:
    response = await conn.call("KV", "Range", etcdrpc.RangeRequest(key=key, keys_only=True))
    return bool(response.kvs)


async def _key_back(conn: EtcdConnection, key: bytes) -> tuple[float, bool]:
    """When the key was first seen in etcd (polled), and whether etcd's first answer had it."""
    first = True
    while True:
        with contextlib.suppress(RegistryUnavailable):
            if await _key_present(conn, key):
                return time.perf_counter(), first
            first = False
        await asyncio.sleep(KEY_POLL_SECONDS)


async def _measure_reregistration(outage: _Outage, ttl: int, trials: int) -> _Reregistered:
    """One etcd, one registered instance, ``trials`` outages of one kind."""
    result = _Reregistered(outage)
    etcd = EtcdServer()
    try:
        await asyncio.to_thread(etcd.start)
        proxy = TcpProxy(etcd.endpoint)
        try:
            await asyncio.to_thread(proxy.start)
            await _outages(etcd, proxy, outage, ttl, trials, result)
        finally:
            await asyncio.to_thread(proxy.close)
    finally:
        await asyncio.to_thread(etcd.close)
    return result


async def _outages(
    etcd: EtcdServer, proxy: TcpProxy, outage: _Outage, ttl: int, trials: int, result: _Reregistered
) -> None:
    via = proxy.address if outage.how == "partition" else etcd.endpoint
    registry = EtcdRegistry(RegistryConfig(endpoints=(via,), ttl_seconds=ttl))
    checker = EtcdConnection([(etcd.host, etcd.port)], timeout=0.5)
    # Registration only: nothing dials this address.
    instance = Instance(
        id=f"svc-{outage.how}-{outage.down:g}", service="svc", address="127.0.0.1:9"
    )
    key = registry.key(instance)
    states = _States()
    rng = random.Random(outage.label)
    try:
        await registry.register(instance, on_state=states)
        for _ in range(trials):
            async with asyncio.timeout(GIVE_UP_SECONDS):
                await states.settled()
            # Any point of the renewal period: how long the instance takes to notice differs.
            await asyncio.sleep(rng.uniform(0, ttl / 3))
            mark = len(states.log)
            if outage.how == "partition":
                await asyncio.to_thread(proxy.cut)
            else:
                await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(outage.down)
            if outage.how == "partition":
                if not await _key_present(checker, key):
                    result.key_gone_before_return += 1
                await asyncio.to_thread(proxy.heal)
            else:
                await asyncio.to_thread(etcd.restart, outage.how == "wipe")
            back = time.perf_counter()  # start() returns once etcd's /health says true
            try:
                async with asyncio.timeout(GIVE_UP_SECONDS):
                    renewed, (key_seen, survived) = await asyncio.gather(
                        states.registered_after(mark), _key_back(checker, key)
                    )
            except TimeoutError:
                result.seconds.append(float("inf"))
                continue
            result.key_survived += survived
            # Registered again: the key is in etcd and the instance renews its lease again.
            result.seconds.append(max(0.0, max(renewed, key_seen) - back))
    finally:
        await registry.close()
        await checker.close()


# --------------------------------------------------------------------------- the section


async def measure(quick: bool) -> Section:
    route_trials = 5 if quick else 200
    outage_trials = 2 if quick else 20
    ttl = 2 if quick else 5
    short, long = (1.0, ttl + 1.5) if quick else (2.0, ttl + 1.5)
    outages = [
        _Outage(f"etcd stopped {short:g} s (< TTL), started again with its data", "stop", short),
        _Outage(f"etcd stopped {long:g} s (> TTL), started again with its data", "stop", long),
        _Outage(f"etcd stopped {short:g} s, started again empty (data lost)", "wipe", short),
        _Outage(
            f"instance cut off from etcd {long:g} s (> TTL, its lease expired)", "partition", long
        ),
    ]
    with _quiet_logs():
        route = await _measure_route_away(route_trials)
        # Independent set-ups (an etcd each): run side by side, the run stays a few minutes.
        rereg = await asyncio.gather(
            *(_measure_reregistration(outage, ttl, outage_trials) for outage in outages)
        )
    return _section(route, rereg, ttl=ttl, route_trials=route_trials, outage_trials=outage_trials)


def _section(
    route: _RouteAway,
    rereg: list[_Reregistered],
    *,
    ttl: int,
    route_trials: int,
    outage_trials: int,
) -> Section:
    def p(samples: list[float], share: float) -> str:
        return _ms(percentile(samples, share))

    rows: list[Sequence[str]] = [
        (
            f"{label} ({route_trials} shutdowns)",
            p(samples, 0.5),
            p(samples, 0.99),
            _ms(max(samples)),
        )
        for label, samples in (
            ("stop() to deregister() returned (lease revoked)", route.revoked),
            ("stop() to the first client routing away", route.first),
            ("stop() to the last client routing away", route.last),
        )
    ]
    rows += [
        (
            f"etcd back to registered again: {r.outage.label} ({outage_trials} outages)",
            _ms(statistics.median(r.seconds)),
            "-",
            _ms(max(r.seconds)),
        )
        for r in rereg
    ]
    last_p99 = percentile(route.last, 0.99)
    bars = [
        Bar(
            f"graceful shutdown to the last of {CLIENTS} clients routing away, p99 <= 100 ms",
            _ms(last_p99),
            last_p99 <= ROUTE_AWAY_BAR,
        )
    ]
    bars += [
        Bar(
            f"etcd back to instance registered again <= 2 s (max; {r.outage.label})",
            _ms(max(r.seconds)),
            max(r.seconds) <= REREGISTER_BAR,
        )
        for r in rereg
    ]
    notes = [
        "The machine has 2 cores shared with other work while this ran: the figures are noisy; "
        "p99 and max figures especially.",
        f"Route away: {CLIENTS} tether channels (`discovery:///svc`), each on its own "
        f"EtcdRegistry (its own etcd connection and prefix watch, as separate client "
        f"processes would have), {STABLE_INSTANCES} stable instances plus one that starts, is "
        "seen by every client, and is stopped, per trial. All in one process and one event "
        "loop, so the five clients' updates run one after another: the spread between first "
        "and last client is that serialisation, not etcd.",
    ]
    stops = [r for r in rereg if r.outage.how == "stop"]
    if stops:
        survived = sum(r.key_survived for r in stops)
        total = sum(len(r.seconds) for r in stops)
        notes.append(
            f"etcd stopped and started with its data kept the instance's key in {survived} of "
            f"{total} outages, however long: etcd renews every lease's TTL when its leader is "
            "elected, so a lease never expires for etcd's own downtime. There 'registered "
            "again' is the first renewal that succeeds after etcd is back."
        )
    for r in rereg:
        if r.outage.how == "partition":
            notes.append(
                f"Partition: the instance's lease had expired (its key was gone) before the "
                f"cut healed in {r.key_gone_before_return} of {len(r.seconds)} trials; it "
                "registers under a new lease."
            )
        failed = sum(1 for s in r.seconds if s == float("inf"))
        if failed:
            notes.append(
                f"{r.outage.label}: {failed} trials not registered again within "
                f"{GIVE_UP_SECONDS:g} s."
            )
    return Section(
        title="Discovery: routing away from a stopping instance, registering again after etcd",
        method=(
            "Route away: per trial an App (serving health only) registers in a real etcd and "
            "is seen by every client; then `App.stop()` (health NOT_SERVING, lease revoked, "
            f"{DRAIN_SECONDS:g} s drain, server stopped) is timed to the moment the last "
            "client's channel drops the instance from the set its balancer picks from "
            "(`Channel(on_members=...)`, a hook inside the membership update: no polling). "
            f"Registered again: one instance registers with a {ttl} s TTL (renewed every "
            f"TTL/3); each outage kind runs {outage_trials} times at a random point of the "
            "renewal period, and is timed from etcd answering again (`EtcdServer.start()` "
            "returned: /health said true; or the proxy healed) to the instance registered "
            "again: the later of its registration turning `registered` (the `on_state` hook) "
            f"and its key being in etcd (polled every {KEY_POLL_SECONDS * 1000:g} ms). The four "
            "outage kinds run side by side, each on its own etcd."
        ),
        header=("measure", "p50", "p99", "max"),
        rows=rows,
        bars=bars,
        notes=notes,
    )
