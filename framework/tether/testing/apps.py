"""Run an App in-process for a test and reach it over loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from tether.app import App
from tether.config import TetherConfig

__all__ = ["loopback_config", "running"]

_LOOPBACK: dict[str, dict[str, Any]] = {
    "server": {"host": "127.0.0.1", "port": 0, "drain_seconds": 0, "grace_seconds": 5},
    "registry": {"backend": "none"},
    "metrics": {"enabled": False},
    "logging": {"format": "console"},
}


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def loopback_config(service: str = "test", **sections: Mapping[str, Any]) -> TetherConfig:
    """A config for tests: 127.0.0.1 on an ephemeral port, no drain, no registry, no metrics.

    Args:
        service: the service name.
        sections: overrides per section, merged over the test defaults, e.g.
            ``loopback_config("orders", server={"drain_seconds": 1})``.
    """
    data = _merge(_LOOPBACK, {"service": {"name": service}, **sections})
    return TetherConfig(**data)


@contextlib.asynccontextmanager
async def running(app: App, *, grace: float = 5.0) -> AsyncIterator[App]:
    """Start ``app``, yield it (``app.target`` is dialable), and stop it on exit without drain.

    Example::

        async with running(build_app(loopback_config("echo"))) as app:
            async with tether.dial(app.target) as channel:
                ...
    """
    await app.start()
    try:
        yield app
    finally:
        await app.stop(drain=0, grace=grace)
