"""The client rate limiter: a token bucket per dependency, and the middleware that applies it.

Policy and algorithm are kept apart. :class:`TokenBucketLimiter` only counts tokens; the
:func:`rate_limit` middleware decides how long a call may wait for one (``max_wait_seconds``,
never past the call's deadline) and what a refusal looks like: :class:`~tether.errors.RateLimited`
(``RESOURCE_EXHAUSTED`` with a ``RetryInfo``), raised before anything is sent.

Limits are per dependency (DESIGN: one service must not drain a bucket shared with another). The
client chain is built once per target, so one middleware instance, and the one bucket it makes,
serves exactly one service. No gRPC here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tether.config_policies import LimiterConfig
from tether.context import current_call
from tether.errors import RateLimited
from tether.middleware import Handler, Middleware

__all__ = ["Limiter", "TokenBucketLimiter", "rate_limit"]

#: Waits out a reservation; ``asyncio.sleep`` or a fake clock's sleep in tests.
Sleep = Callable[[float], Awaitable[Any]]

#: Refill is computed from float timestamps, so a token can come out a hair short of whole
#: (0.9999999999); that much is forgiven, or a caller would wait a whole extra step for it.
_EPSILON = 1e-9


class Limiter(Protocol):
    """What the rate-limit middleware needs of a limiter: admit within a wait, or say how long."""

    async def acquire(self, max_wait: float) -> bool:
        """Take a permit within ``max_wait`` seconds; False, at once, if it would come later."""
        ...

    def wait_time(self) -> float:
        """Seconds until a permit would be free for a new caller; 0 when one is free now."""
        ...


class TokenBucketLimiter:
    """A token bucket with continuous refill: ``rate`` tokens a second, at most ``burst`` stored.

    The bucket starts full, so ``burst`` calls pass at once and then ``rate`` a second. A waiter
    reserves its token when it starts waiting: the count may go below zero, and each later
    caller's wait is measured behind the reservations already made. So a crowd of waiters wakes
    one token apart, in arrival order, instead of all at once, and a caller that arrives later
    never overtakes them. No lock is needed, or held across an await: every change of state is
    a synchronous step on the event loop.

    Args:
        rate: tokens added per second; > 0.
        burst: the bucket's size; >= 1.
        clock: a monotonic clock in seconds; ``time.monotonic`` or a fake for tests.

    Raises:
        ValueError: ``rate`` is not a positive finite number, or ``burst`` is below 1.
    """

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(
                f"rate must be a positive finite number of tokens a second, not {rate}"
            )
        if burst < 1:
            raise ValueError(f"burst must be >= 1, not {burst}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock()

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """The bucket's size."""
        return int(self._burst)

    def _refill(self) -> float:
        now = self._clock()
        elapsed = now - self._stamp
        if elapsed > 0:  # a clock that steps back (a fake one) must not drain the bucket
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now
        return self._tokens

    def try_acquire(self) -> bool:
        """Take a token if one is free now (and nobody is waiting for one).

        Returns:
            True if the caller may go ahead.
        """
        if self._refill() >= 1 - _EPSILON:
            self._tokens -= 1
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until a token would be free for a new caller, behind the waiters already queued.

        Returns:
            0 when a token is free now.
        """
        missing = 1 - self._refill()
        return missing / self._rate if missing > _EPSILON else 0.0

    async def acquire(self, max_wait: float, sleep: Sleep = asyncio.sleep) -> bool:
        """Take a token, waiting up to ``max_wait`` seconds for it.

        Args:
            max_wait: the longest the caller will wait; 0 (or less) means do not wait.
            sleep: waits out the reservation; injectable for tests.

        Returns:
            True once the token is the caller's; False at once, without waiting, when it would
            not be free within ``max_wait``.

        Raises:
            asyncio.CancelledError: the caller was cancelled while waiting; its reservation is
                given back.
        """
        if self.try_acquire():
            return True
        wait = self.wait_time()
        if wait > max_wait:
            return False
        self._tokens -= 1  # reserved now, so later callers queue behind this one
        try:
            await sleep(wait)
        except BaseException:
            # The token was never used: give it back, or the bucket would stay one short.
            self._refill()
            self._tokens = min(self._burst, self._tokens + 1)
            raise
        return True


def _pass_through(handler: Handler) -> Handler:
    return handler


def rate_limit(
    config: LimiterConfig,
    *,
    service: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    limiter: Limiter | None = None,
    on_reject: Callable[[], None] | None = None,
) -> Middleware:
    """Build the client rate-limit middleware for one dependency.

    A call takes a token before it goes on. Without a free token it waits up to
    ``config.max_wait_seconds``, but never past its own deadline; if the token would come
    later it is refused locally with :class:`~tether.errors.RateLimited`, whose ``retry_after``
    is the time until a token. A refused call never reaches the next handler, so nothing is sent.

    Args:
        config: ``rate`` (None: no limit, the middleware passes calls through), ``burst``
            (its ``capacity``) and ``max_wait_seconds``.
        service: the dependency this chain calls; named in the refusal.
        clock: the clock of the bucket and of call deadlines (``time.monotonic``).
        sleep: waits for a reserved token; injectable for tests.
        limiter: replaces the bucket made from ``config`` (a custom algorithm); the default
            bucket is made once here, so each middleware instance limits one service.
        on_reject: called once per refused call (metrics); must not raise or block.

    Returns:
        A client middleware; put it inside the deadline and the breaker, outside retry, so a
        call takes one token however many attempts it makes.
    """
    if limiter is None:
        if config.rate is None:
            return _pass_through
        bucket = TokenBucketLimiter(config.rate, config.capacity, clock=clock)

        async def take(max_wait: float) -> bool:
            return await bucket.acquire(max_wait, sleep)

        wait_time: Callable[[], float] = bucket.wait_time
    else:
        take, wait_time = limiter.acquire, limiter.wait_time
    max_wait_seconds = config.max_wait_seconds
    if config.rate is None:
        limit = "its limiter"
    else:
        limit = f"{config.rate:g} calls/s, burst {config.capacity}"

    def middleware(handler: Handler) -> Handler:
        async def limited(request: Any) -> Any:
            max_wait = max_wait_seconds
            call = current_call()
            if call is not None and call.deadline is not None:
                # A token that comes after the deadline is no use: refuse now instead.
                max_wait = min(max_wait, call.deadline - clock())
            if not await take(max(0.0, max_wait)):
                retry_after = wait_time()
                if on_reject is not None:
                    on_reject()
                raise RateLimited(
                    f"client rate limit for {service!r} exceeded ({limit}); "
                    f"not sent, a call may go in {retry_after:.3f} s",
                    retry_after=retry_after,
                )
            return await handler(request)

        return limited

    return middleware
