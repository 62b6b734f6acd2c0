"""An in-process registry: for one process running several services, and for tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from tether.registry.base import Instance, InstanceWatch, Watcher, sorted_instances

__all__ = ["MemoryRegistry"]


class MemoryRegistry:
    """A :class:`~tether.registry.Registry` held in memory; share one object between apps.

    Nothing outlives the process and nothing is seen by other processes. Changes reach
    watchers at once.
    """

    def __init__(self) -> None:
        self._instances: dict[str, dict[str, Instance]] = defaultdict(dict)
        self._watches: dict[str, set[InstanceWatch]] = defaultdict(set)
        self._on_state: dict[str, Callable[[str], None]] = {}

    async def register(
        self, instance: Instance, *, on_state: Callable[[str], None] | None = None
    ) -> None:
        """Publish ``instance``, replacing an earlier registration with the same id.

        In memory a registration cannot be lost: ``on_state`` hears ``registered`` now and
        ``deregistered`` when it is withdrawn.
        """
        self._instances[instance.service][instance.id] = instance
        self._publish(instance.service)
        if on_state is not None:
            self._on_state[instance.id] = on_state
            on_state("registered")

    async def deregister(self, instance: Instance) -> None:
        """Withdraw ``instance``; withdrawing an unknown instance does nothing."""
        if self._instances[instance.service].pop(instance.id, None) is not None:
            self._publish(instance.service)
        on_state = self._on_state.pop(instance.id, None)
        if on_state is not None:
            on_state("deregistered")

    async def get(self, service: str) -> list[Instance]:
        """The instances of ``service`` registered now."""
        return sorted_instances(self._instances.get(service, {}).values())

    def watch(self, service: str) -> Watcher:
        """Follow ``service``; the first :meth:`~Watcher.next` returns at once."""
        watch = InstanceWatch(service, on_close=self._forget)
        watch.publish(self._instances.get(service, {}).values())
        self._watches[service].add(watch)
        return watch

    async def close(self) -> None:
        """End every watch; registrations are dropped."""
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.close()
        self._instances.clear()

    def _publish(self, service: str) -> None:
        instances = self._instances[service].values()
        for watch in self._watches.get(service, ()):
            watch.publish(instances)

    def _forget(self, watch: InstanceWatch) -> None:
        self._watches[watch.service].discard(watch)
