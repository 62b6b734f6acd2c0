"""What discovery showed during a scenario: every published set of instances, with its time."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence

from etcd3 import etcdrpc

from tether.registry import EtcdRegistry, Instance
from tether.registry.etcd_client import EtcdConnection, prefix_end
from tether.testing import eventually

PREFIX = b"/tether/services/"


class MembershipLog:
    """Follows one service in a discovery and keeps every set of instance ids it publishes.

    A reader of a watch wakes to the newest set only, so a drop and return between two reads
    would go unseen; this log wraps the watch's ``publish`` and so records every set the
    discovery publishes, at the moment it does. Make it with :meth:`follow`.
    """

    def __init__(self, watch: object) -> None:
        self._watch = watch
        #: ``(time.monotonic(), ids)`` of each published set that differs from the one before.
        self.snapshots: list[tuple[float, frozenset[str]]] = []
        publish = watch.publish  # type: ignore[attr-defined]

        def record(instances: Iterable[Instance]) -> None:
            listed = list(instances)
            self._add({instance.id for instance in listed})
            publish(listed)

        watch.publish = record  # type: ignore[attr-defined]

    @classmethod
    async def follow(
        cls, discovery: EtcdRegistry, service: str, *, within: float = 10
    ) -> MembershipLog:
        """Start following ``service``; returns once discovery has read etcd."""
        watch = discovery.watch(service)
        log = cls(watch)
        # The first set may have been published before the wrap (the cache was loaded).
        log._add({i.id for i in await asyncio.wait_for(watch.next(), within)})
        return log

    def close(self) -> None:
        self._watch.close()  # type: ignore[attr-defined]

    @property
    def current(self) -> frozenset[str]:
        """The ids discovery shows now."""
        return self.snapshots[-1][1] if self.snapshots else frozenset()

    async def wait(
        self, predicate: Callable[[frozenset[str]], bool], *, within: float, message: str
    ) -> float:
        """Wait for a set of ids for which ``predicate`` holds.

        Returns:
            When that set was published (``time.monotonic()``); now, if it is the current one.
        """
        began = time.monotonic()
        first = max(len(self.snapshots) - 1, 0)

        def found() -> float | None:
            for index, (at, ids) in enumerate(self.snapshots[first:]):
                if predicate(ids):
                    return began if index == 0 else at
            return None

        at: float = await eventually(
            found, within=within, message=f"{message} (discovery shows {sorted(self.current)})"
        )
        return at

    def missing(
        self, ids: Collection[str], since: float = 0.0, until: float = math.inf
    ) -> set[str]:
        """The ``ids`` absent from at least one set discovery showed between the two times."""
        shown = [ids_ for at, ids_ in self.snapshots if since < at <= until]
        before = [ids_ for at, ids_ in self.snapshots if at <= since]
        if before:
            shown.append(before[-1])  # the set in effect at ``since``
        return {i for i in ids for snapshot in shown if i not in snapshot}

    def _add(self, ids: set[str]) -> None:
        snapshot = frozenset(ids)
        if snapshot != self.current or not self.snapshots:
            self.snapshots.append((time.monotonic(), snapshot))


async def leases(endpoints: Sequence[str], service: str) -> dict[str, int]:
    """A fresh read from etcd: each registered instance id of ``service`` and its lease id."""
    hosts = [endpoint.rpartition(":") for endpoint in endpoints]
    connection = EtcdConnection([(host, int(port)) for host, _, port in hosts])
    prefix = PREFIX + service.encode() + b"/"
    try:
        response = await connection.call(
            "KV", "Range", etcdrpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        )
    finally:
        await connection.close()
    return {kv.key[len(prefix) :].decode(): int(kv.lease) for kv in response.kvs}
