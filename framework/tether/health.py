"""``grpc.health.v1`` for asyncio servers, whose Watch streams end when the server shuts down.

The reference ``grpc_health.v1.health.aio.HealthServicer`` keeps every Watch stream open
forever, so ``server.stop(grace)`` waits out the whole grace period whenever a client watches
health. Here a shutdown sends NOT_SERVING to every watcher and then ends their streams with OK.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthService"]

#: A ``HealthCheckResponse.ServingStatus`` value.
_Status = int
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Serving status per service name; ``""`` is the whole server."""

    def __init__(self) -> None:
        self._status: dict[str, _Status] = {}
        self._changed = asyncio.Event()
        self._shutting_down = False

    def set(self, service: str, status: _Status) -> None:
        """Set one service's status and wake its watchers; ignored once shutting down."""
        if self._shutting_down:
            return
        self._status[service] = status
        self._notify()

    def set_all(self, status: _Status) -> None:
        """Set every known service, and the server as a whole, to ``status``."""
        for service in (*self._status, ""):
            self.set(service, status)

    def shutdown(self) -> None:
        """Mark everything NOT_SERVING for good and end every Watch stream."""
        self.set_all(NOT_SERVING)
        self._shutting_down = True
        self._notify()

    def status(self, service: str = "") -> _Status:
        """The current status of ``service`` (SERVICE_UNKNOWN if never set)."""
        status: _Status = self._status.get(service, SERVICE_UNKNOWN)
        return status

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(  # noqa: N802 - the name is the RPC's
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 - the name is the RPC's
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> None:
        last: _Status | None = None
        while True:
            changed = self._changed
            status = self.status(request.service)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._shutting_down:
                return
            await changed.wait()
