"""Steady load on the Echo service through a tether channel, counted by outcome and instance."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
from echo.v1 import echo_pb2, echo_pb2_grpc

import tether
from support.figures import Figures
from support.membership import MembershipLog
from tether.channel import Channel
from tether.config import RegistryConfig
from tether.fallback import degraded
from tether.registry import EtcdRegistry
from tether.testing import eventually


class Load:
    """Steady calls from several concurrent callers until :meth:`stop`.

    ``callers`` call ``Say`` (idempotent in the proto, so tether may retry it) and
    ``hold_callers`` call ``Hold`` (not idempotent: only an attempt that never reached a handler
    may be sent again). ``Hold`` answers at once from an instance whose holds were released
    (see ``EchoFleet``). Each caller waits ``interval`` seconds between its calls: a steady rate
    that leaves a 2-core machine room for the fault being tested.

    Attributes:
        says, holds: outcomes by status name (``ok`` for an answer).
        errors, failures: what each failure said, and when it happened.
        by_instance: answers by the instance that gave them (``seen["instance"]``).
        fallback: answers made by a fallback rather than an instance.
        latencies: seconds each call took, every outcome included.
        saying, holding: calls of each kind in flight now.
    """

    def __init__(
        self,
        channel: Any,
        *,
        callers: int = 4,
        hold_callers: int = 0,
        interval: float = 0.0,
        timeout: float = 5.0,
    ) -> None:
        self.echo = echo_pb2_grpc.EchoStub(channel)
        self.says: Counter[str] = Counter()
        self.holds: Counter[str] = Counter()
        self.by_instance: Counter[str] = Counter()
        #: Failures by method, status and details (cut short), for failure messages.
        self.errors: Counter[str] = Counter()
        #: ``(time.monotonic(), method, status name)`` of each failure, in order.
        self.failures: list[tuple[float, str, str]] = []
        self.fallback = 0
        self.latencies: list[float] = []
        self.saying = 0
        self.holding = 0
        self._callers = callers
        self._hold_callers = hold_callers
        self._interval = interval
        self._timeout = timeout
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def total(self) -> int:
        """Calls answered so far, whatever the outcome."""
        return self.says.total() + self.holds.total()

    @property
    def failed(self) -> int:
        """Calls that ended in an error status."""
        return self.total - self.says["ok"] - self.holds["ok"]

    def outcomes(self) -> dict[str, dict[str, int]]:
        """Outcomes of both kinds of call, and what the failures said, for failure messages."""
        return {"Say": dict(self.says), "Hold": dict(self.holds), "errors": dict(self.errors)}

    def p99_ms(self) -> float:
        """The 99th percentile of call latency so far, in milliseconds."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def start(self) -> None:
        """Start every caller."""
        self._tasks = [
            *(
                asyncio.ensure_future(self._caller("Say", self._say, self.says))
                for _ in range(self._callers)
            ),
            *(
                asyncio.ensure_future(self._caller("Hold", self._hold, self.holds))
                for _ in range(self._hold_callers)
            ),
        ]

    async def stop(self) -> None:
        """Let every caller finish its call in flight, and end; safe to call again."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    async def calls(self, count: int, *, within: float = 30) -> None:
        """Wait until ``count`` more calls have been answered."""
        target = self.total + count
        await eventually(
            lambda: self.total >= target,
            within=within,
            message=f"{count} more calls answered (outcomes so far: {self.outcomes()})",
        )

    async def served_by(self, instance_id: str, count: int = 1, *, within: float = 10) -> None:
        """Wait until ``instance_id`` has answered ``count`` more calls."""
        target = self.by_instance[instance_id] + count
        await eventually(
            lambda: self.by_instance[instance_id] >= target,
            within=within,
            message=f"{count} more answers by {instance_id} (so far {dict(self.by_instance)})",
        )

    def record(self, figures: Figures) -> None:
        """Fill in the figures of a scenario: calls, failures, fallbacks and p99 latency."""
        figures.calls = self.total
        figures.failed = self.failed
        figures.fallback = self.fallback
        if self.holds:
            figures.extra["non_idempotent"] = self.holds.total()
            figures.extra["non_idempotent_failed"] = self.holds.total() - self.holds["ok"]
        figures.extra["p99_ms"] = round(self.p99_ms(), 1)

    async def _say(self) -> None:
        self.saying += 1
        try:
            await self._call(self.echo.Say(echo_pb2.SayRequest(text="hi"), timeout=self._timeout))
        finally:
            self.saying -= 1

    async def _hold(self) -> None:
        self.holding += 1
        try:
            await self._call(self.echo.Hold(echo_pb2.SayRequest(text="hi"), timeout=self._timeout))
        finally:
            self.holding -= 1

    async def _call(self, call: Any) -> None:
        reply = await call
        if await degraded(call) is not None:
            self.fallback += 1
        else:
            self.by_instance[reply.seen["instance"]] += 1

    async def _caller(self, method: str, one_call: Any, outcomes: Counter[str]) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await one_call()
                outcomes["ok"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                self.errors[f"{method} {exc.code().name}: {(exc.details() or '')[:120]}"] += 1
                self.failures.append((time.monotonic(), method, exc.code().name))
            except grpc.aio.UsageError:
                return  # the channel closed under a failing test
            self.latencies.append(time.monotonic() - started)
            if self._interval:
                await asyncio.sleep(self._interval)


class Caller:
    """A peer of the Echo service, as another tether service would be: an etcd discovery, a
    governed channel on ``discovery:///echo``, a log of what discovery showed, and a load.

    Use it as an async context manager; the load starts with ``caller.load.start()`` and is
    stopped on exit if it still runs.

    Args:
        endpoints: where discovery reads etcd (a proxy's address, to cut it off).
        ttl_seconds: the discovery's registry TTL (it holds instances etcd forgot for two).
        load_options: passed to :class:`Load`.
    """

    def __init__(self, endpoints: Sequence[str], *, ttl_seconds: int = 2, **load_options: Any):
        self.discovery = EtcdRegistry(
            RegistryConfig(endpoints=tuple(endpoints), ttl_seconds=ttl_seconds)
        )
        self.channel: Channel = tether.dial("discovery:///echo", discovery=self.discovery)
        self.load = Load(self.channel, **load_options)
        self._membership: MembershipLog | None = None

    @property
    def membership(self) -> MembershipLog:
        assert self._membership is not None, "use Caller as an async context manager"
        return self._membership

    async def __aenter__(self) -> Caller:
        try:
            self._membership = await MembershipLog.follow(self.discovery, "echo")
            async with asyncio.timeout(10):
                await self.channel.channel_ready()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            await self.load.stop()  # again, if the test stopped it: a no-op
        finally:
            await self.channel.close()
            if self._membership is not None:
                self._membership.close()
            await self.discovery.close()
