"""Server admission control: per-method bounds on concurrent calls and on calls per second.

A server that takes every call it is sent queues work it cannot finish in time and slows every
caller down; refusing the excess at once, with a hint of when to come back, keeps the calls it
accepts fast. :func:`admit` gives each method its own in-flight counter and token bucket
(:class:`~tether.limiter.TokenBucketLimiter`), as ``server.admission`` configures them, and answers
``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` when either is full.

Health and reflection never pass through the server chain, so a saturated method never makes
the instance look unhealthy. No gRPC here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tether.config_policies import AdmissionConfig, AdmissionLimits
from tether.context import current_call
from tether.errors import ResourceExhausted
from tether.limiter import TokenBucketLimiter
from tether.middleware import Handler, Middleware

__all__ = ["admit"]


class _Gate:
    """The admission state of one method: calls in flight and, when rate-limited, a bucket."""

    __slots__ = ("bucket", "in_flight", "max_concurrent", "method", "retry_after")

    def __init__(self, method: str, limits: AdmissionLimits, clock: Callable[[], float]) -> None:
        self.method = method
        self.max_concurrent = limits.max_concurrent
        self.retry_after = limits.retry_after_seconds
        self.bucket = (
            None
            if limits.rate is None
            else TokenBucketLimiter(limits.rate, limits.capacity, clock=clock)
        )
        self.in_flight = 0

    def enter(self) -> None:
        """Admit one call, or refuse it without changing any state.

        Raises:
            ResourceExhausted: the method is at its concurrency bound or out of tokens.
        """
        # Concurrency first: checking it costs nothing, while a token taken for a call that
        # is then refused would be lost.
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            raise ResourceExhausted(
                f"{self.method} is serving its limit of {self.max_concurrent} concurrent calls; "
                "retry later",
                retry_after=self.retry_after,
            )
        if self.bucket is not None and not self.bucket.try_acquire():
            retry_after = self.bucket.wait_time()
            raise ResourceExhausted(
                f"{self.method} admits {self.bucket.rate:g} calls/s (burst "
                f"{self.bucket.burst}); retry in {retry_after:.3f} s",
                retry_after=retry_after,
            )
        self.in_flight += 1

    def full_limit(self) -> str:
        """Which limit refused the last call: ``concurrency`` or ``rate`` (a refusal changes no
        state, so the bounds still say which one was reached)."""
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return "concurrency"
        return "rate"

    def leave(self) -> None:
        """Count one admitted call as finished."""
        self.in_flight -= 1


class _TrackedStream:
    """A response stream that frees its call's admission slot once, when the stream ends.

    A class rather than an async generator: a generator's ``finally`` never runs if nothing
    ever iterates it, and a slot must be freed even for a stream that was dropped unread.
    """

    __slots__ = ("_done", "_stream")

    def __init__(self, stream: AsyncIterator[Any], done: Callable[[], None]) -> None:
        self._stream = stream
        self._done: Callable[[], None] | None = done

    def __aiter__(self) -> _TrackedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await anext(self._stream)
        except BaseException:
            # The end of the stream, a failure or a cancellation: the call is over.
            self._finish()
            raise

    async def aclose(self) -> None:
        """Free the slot and close the inner stream, if it can be closed."""
        self._finish()
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()

    def __del__(self) -> None:
        self._finish()  # dropped before its end (never iterated, or abandoned)


def admit(
    config: AdmissionConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_reject: Callable[[str, str], None] | None = None,
) -> Middleware:
    """Build the server admission middleware: refuse calls over a method's limits at once.

    Each method gets its own counter of calls in flight (``max_concurrent``) and token bucket
    (``rate``, ``burst``), made on its first call; the chain only sees methods the server
    serves, so their number is bounded. A call over either limit is refused with
    :class:`~tether.errors.ResourceExhausted` before the handler runs: for concurrency with
    ``retry_after_seconds`` as its ``retry_after``, for the rate with the time until the next
    token. A stream-response call stays in flight until its stream ends.

    Args:
        config: the ``server.admission`` section; with no limits anywhere the middleware passes
            every call through untouched.
        clock: the buckets' monotonic clock; injectable for tests.
        on_reject: called with the method (``package.Service/Method``) and the limit that
            refused it (``concurrency`` or ``rate``) for each refused call, before the refusal
            is raised; an App counts them (``tether_admission_rejections_total``) and puts a
            ``tether.admission_refused`` event on the call's span.

    Returns:
        A server middleware; put it inside ``recover`` and outside the handler's own work
        (tracing and logging outside it still record the refusals).
    """
    if not config.limited:
        return _pass_through
    gates: dict[str, _Gate | None] = {}

    def gate_of(full_method: str, qualified: str) -> _Gate | None:
        try:
            return gates[full_method]
        except KeyError:
            limits = config.limits(qualified)
            gate = _Gate(qualified, limits, clock) if limits.limited else None
            gates[full_method] = gate
            return gate

    def middleware(handler: Handler) -> Handler:
        async def admitted(request: Any) -> Any:
            call = current_call()
            if call is None:
                return await handler(request)
            name = call.method
            gate = gate_of(name.full, name.path)
            if gate is None:
                return await handler(request)
            try:
                gate.enter()
            except ResourceExhausted:
                if on_reject is not None:
                    on_reject(name.path, gate.full_limit())
                raise
            if not call.response_streaming:
                try:
                    return await handler(request)
                finally:
                    gate.leave()
            try:
                stream = aiter(await handler(request))
            except BaseException:
                gate.leave()
                raise
            return _TrackedStream(stream, gate.leave)

        return admitted

    return middleware


def _pass_through(handler: Handler) -> Handler:
    return handler
