"""What a registry stores and the two small roles it plays: registering and discovering."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, Self, runtime_checkable

import orjson

__all__ = [
    "Discovery",
    "Instance",
    "InstanceWatch",
    "Registrar",
    "Registry",
    "WatchClosed",
    "Watcher",
    "sorted_instances",
]

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
#: Default weight of an instance; balancers treat weights relative to each other.
DEFAULT_WEIGHT = 100


class WatchClosed(Exception):
    """Raised by :meth:`Watcher.next` once the watch is closed."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One running copy of a service, as registered and discovered.

    Attributes:
        id: unique per process, stable for its life (``service.instance_id``).
        service: the service name clients dial, e.g. ``users``.
        address: ``host:port`` a peer can reach; never a wildcard such as ``0.0.0.0``.
        version: the service's version.
        zone: zone or region, for zone-aware balancing.
        weight: relative share of traffic, > 0.
        metadata: free-form string pairs.
        started_at: Unix time the instance started serving.
    """

    id: str
    service: str
    address: str
    version: str = ""
    zone: str = ""
    weight: int = DEFAULT_WEIGHT
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in ("id", "service"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or "/" in value:
                raise ValueError(f"{name} must be a non-empty string without '/', got {value!r}")
        for name in ("address", "version", "zone"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        host, sep, port = self.address.rpartition(":")
        if not sep or host in _WILDCARD_HOSTS or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"address must be a reachable host:port (not a wildcard host), got {self.address!r}"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight <= 0:
            raise ValueError(f"weight must be a positive integer, got {self.weight!r}")
        if not isinstance(self.started_at, int | float) or not math.isfinite(self.started_at):
            raise ValueError(f"started_at must be a finite number, got {self.started_at!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("metadata must map strings to strings")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def to_json(self) -> bytes:
        """The registry value: a JSON object with every field."""
        return orjson.dumps(
            {
                "id": self.id,
                "service": self.service,
                "address": self.address,
                "version": self.version,
                "zone": self.zone,
                "weight": self.weight,
                "metadata": dict(self.metadata),
                "started_at": self.started_at,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a registry value written by :meth:`to_json` (unknown fields are ignored).

        Raises:
            ValueError: the value is not JSON, or a field is missing or invalid.
        """
        try:
            raw: Any = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            return cls(
                id=raw["id"],
                service=raw["service"],
                address=raw["address"],
                version=str(raw.get("version", "")),
                zone=str(raw.get("zone", "")),
                weight=raw.get("weight", DEFAULT_WEIGHT),
                metadata=raw.get("metadata") or {},
                started_at=raw.get("started_at", 0.0),
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(str(exc)) from None


@runtime_checkable
class Watcher(Protocol):
    """A subscription to one service's instances."""

    async def next(self) -> list[Instance]:
        """The current instances: at once on the first call, then after each change."""
        ...

    def close(self) -> None:
        """End the subscription; a pending or later :meth:`next` raises :class:`WatchClosed`."""
        ...


@runtime_checkable
class Registrar(Protocol):
    """Makes an instance findable for as long as it runs."""

    async def register(
        self, instance: Instance, *, on_state: Callable[[str], None] | None = None
    ) -> None:
        """Publish ``instance`` and keep it published until :meth:`deregister`.

        ``on_state`` is told each change of the registration's state (``registered``, and for
        backends that can lose it after this returns, ``unreachable`` / ``lost`` / ...), e.g.
        for a metric; ``deregistered`` once it is withdrawn.
        """
        ...

    async def deregister(self, instance: Instance) -> None:
        """Withdraw ``instance`` at once, so watchers see it leave."""
        ...


@runtime_checkable
class Discovery(Protocol):
    """Finds the instances of a service and follows their changes."""

    async def get(self, service: str) -> list[Instance]:
        """The instances of ``service`` known now."""
        ...

    def watch(self, service: str) -> Watcher:
        """Follow the instances of ``service``."""
        ...


@runtime_checkable
class Registry(Registrar, Discovery, Protocol):
    """A backend that both registers and discovers, and owns resources to release."""

    async def close(self) -> None:
        """Stop background work and release connections; registrations are withdrawn."""
        ...


def sorted_instances(instances: Iterable[Instance]) -> list[Instance]:
    """Instances in a stable order (by id), so snapshots compare and print predictably."""
    return sorted(instances, key=lambda instance: instance.id)


class InstanceWatch:
    """A :class:`Watcher` fed by a backend: it keeps only the latest snapshot.

    A slow reader never builds a queue: it wakes to the newest set of instances.
    """

    def __init__(
        self, service: str, on_close: Callable[[InstanceWatch], None] | None = None
    ) -> None:
        self.service = service
        self._snapshot: list[Instance] | None = None
        self._version = 0
        self._seen = 0
        self._changed = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def publish(self, instances: Iterable[Instance]) -> None:
        """Offer a new snapshot; readers wake only if it differs from the last one."""
        snapshot = sorted_instances(instances)
        if snapshot == self._snapshot:
            return
        self._snapshot = snapshot
        self._version += 1
        self._changed.set()

    async def next(self) -> list[Instance]:
        """See :meth:`Watcher.next`."""
        while not self._closed:
            if self._version != self._seen and self._snapshot is not None:
                self._seen = self._version
                return list(self._snapshot)
            self._changed.clear()
            await self._changed.wait()
        raise WatchClosed(f"the watch of {self.service!r} is closed")

    def close(self) -> None:
        """See :meth:`Watcher.close`."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        if self._on_close is not None:
            self._on_close(self)

    def __aiter__(self) -> InstanceWatch:
        return self

    async def __anext__(self) -> list[Instance]:
        try:
            return await self.next()
        except WatchClosed:
            raise StopAsyncIteration from None
