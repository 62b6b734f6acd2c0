"""One connection per instance address, followed for connectivity, for the balancing channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import grpc

from tether.calls import MethodSpec
from tether.context import detached_task
from tether.log import get_logger
from tether.registry.base import DEFAULT_WEIGHT

__all__ = ["EJECTION_SECONDS", "RETIRE_GRACE_SECONDS", "SUBCHANNEL_OPTIONS", "Subchannel"]

_log = get_logger("tether.subchannel")

#: Longest time a subchannel stays out of rotation after a call on it failed with UNAVAILABLE
#: while its connection stayed up (a server answering UNAVAILABLE is not a dead connection).
EJECTION_SECONDS = 1.0
#: Longest wait for the in-flight calls of an instance that left the membership.
RETIRE_GRACE_SECONDS = 30.0

#: grpc options of every subchannel; options given to the channel override them. The reconnect
#: backoff is short, so an instance that comes back is used again within about a second.
#: grpcio's retries are off so that attempts never multiply: tether's retry middleware is the
#: one retry loop, and it sends each attempt to a fresh instance. (With them on, grpc-core's
#: retry filter also drops the grpc-previous-rpc-attempts header tether sets on retries.)
SUBCHANNEL_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.min_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 1000,
        "grpc.enable_retries": 0,
    }
)

_READY = grpc.ChannelConnectivity.READY
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


class Subchannel:
    """One instance address and the ``grpc.aio`` channel to it, followed for connectivity.

    A background task follows the connectivity state (and asks grpc to reconnect when idle).
    A call failing with UNAVAILABLE ejects the subchannel at once, so a dead instance stops
    receiving calls as soon as its connection fails rather than when its lease expires; it
    returns when it is READY again, or after :data:`EJECTION_SECONDS` if it never left READY.

    Args:
        address: ``host:port`` (or any single grpc target) of the instance.
        weight: relative share of traffic for weighted balancers.
        options: extra grpc channel options; they override tether's subchannel defaults.
        credentials: TLS credentials; an insecure channel if None.
        on_change: called after every connectivity change.
    """

    def __init__(
        self,
        address: str,
        *,
        weight: int = DEFAULT_WEIGHT,
        options: Iterable[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self.weight = weight
        self.in_flight = 0
        merged = {**SUBCHANNEL_OPTIONS, **dict(options)}
        self.channel: grpc.aio.Channel = (
            grpc.aio.insecure_channel(address, options=list(merged.items()))
            if credentials is None
            else grpc.aio.secure_channel(address, credentials, options=list(merged.items()))
        )
        self._state = grpc.ChannelConnectivity.IDLE
        self._ejected_at: float | None = None
        self._on_change = on_change
        self._callables: dict[MethodSpec, Any] = {}
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._follower = detached_task(self._follow(), name=f"tether subchannel {address}")

    @property
    def state(self) -> grpc.ChannelConnectivity:
        """The connectivity state last observed."""
        return self._state

    @property
    def ready(self) -> bool:
        """Connected: the last observed state is READY."""
        return self._state is _READY

    @property
    def ejected(self) -> bool:
        """Out of rotation after an UNAVAILABLE failure (see the class docstring)."""
        at = self._ejected_at
        if at is None:
            return False
        if time.monotonic() - at < EJECTION_SECONDS:
            return True
        self._ejected_at = None
        return False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began."""
        return self._closed

    def eject(self) -> None:
        """Take the subchannel out of rotation until it is READY again."""
        self._ejected_at = time.monotonic()

    def multicallable(self, spec: MethodSpec) -> Any:
        """The ``grpc.aio`` multicallable for ``spec`` on this subchannel, made once."""
        found = self._callables.get(spec)
        if found is None:
            factory = getattr(self.channel, spec.kind)
            found = factory(
                spec.method,
                request_serializer=spec.request_serializer,
                response_deserializer=spec.response_deserializer,
                _registered_method=spec.registered,
            )
            self._callables[spec] = found
        return found

    def finished_one(self) -> None:
        """Count the end of a call sent on this subchannel."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def retire(self, grace: float = RETIRE_GRACE_SECONDS) -> None:
        """Close once the calls in flight have finished, or after ``grace`` seconds."""
        if self.in_flight and not self._closed:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                _log.warning("retired instance still busy", address=self.address, grace=grace)
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Stop following the connection and close the channel.

        Args:
            grace: seconds in-flight calls may take to finish; None cancels them at once.
        """
        if self._closed:
            return
        self._closed = True
        self._follower.cancel()
        await self.channel.close(grace)
        await asyncio.wait([self._follower])

    async def _follow(self) -> None:
        channel = self.channel
        state = channel.get_state(try_to_connect=True)
        while True:
            if state is _READY and self._state is not _READY:
                self._ejected_at = None  # a new connection: whatever failed is behind it
            self._state = state
            if self._on_change is not None:
                self._on_change()
            if state is _SHUTDOWN:
                return
            await channel.wait_for_state_change(state)
            # try_to_connect: an IDLE channel (the connection dropped) reconnects at once.
            state = channel.get_state(try_to_connect=True)

    def __repr__(self) -> str:
        return (
            f"Subchannel({self.address!r}, state={self._state.name}, "
            f"in_flight={self.in_flight}, ejected={self.ejected})"
        )
