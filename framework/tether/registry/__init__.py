"""Service registration and discovery: the protocols, an etcd backend and an in-memory one."""

from __future__ import annotations

from tether.config import RegistryConfig
from tether.registry.base import (
    Discovery,
    Instance,
    InstanceWatch,
    Registrar,
    Registry,
    WatchClosed,
    Watcher,
)
from tether.registry.etcd import EtcdRegistry
from tether.registry.memory import MemoryRegistry

__all__ = [
    "Discovery",
    "EtcdRegistry",
    "Instance",
    "InstanceWatch",
    "MemoryRegistry",
    "Registrar",
    "Registry",
    "WatchClosed",
    "Watcher",
    "registry_from_config",
]


def registry_from_config(config: RegistryConfig) -> Registry | None:
    """The registry ``config.backend`` names: etcd, a new in-memory one, or None for ``none``."""
    if config.backend == "etcd":
        return EtcdRegistry(config)
    if config.backend == "memory":
        return MemoryRegistry()
    return None
