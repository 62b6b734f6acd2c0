"""Tests for tether.limiter: the token bucket, fair waiting, the client rate-limit middleware."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from typing import Any

import pytest
from google.rpc import error_details_pb2
from support.fakes import FakeClock as Clock

from tether import CallContext, MethodName, Side, use_call
from tether.config_policies import LimiterConfig
from tether.errors import RateLimited, ResourceExhausted
from tether.limiter import Limiter, TokenBucketLimiter, rate_limit

SAY = MethodName.parse("/echo.v1.Echo/Say")


class Timeline:
    """A fake monotonic clock for many concurrent sleepers: time moves only in advance()."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), wake))
        await wake

    @property
    def sleeping(self) -> int:
        return sum(not wake.done() for _, _, wake in self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move time on and let every sleeper that is due run until it next waits."""
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now + 1e-9:
            _, _, wake = heapq.heappop(self._sleepers)
            if not wake.done():
                wake.set_result(None)
        for _ in range(5):  # a woken task needs a loop turn or two to finish its call
            await asyncio.sleep(0)


class Downstream:
    """The next handler: counts the calls that got through the limiter."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Any) -> Any:
        self.calls += 1
        return "ok"


def client_call(deadline: float | None = None) -> CallContext:
    return CallContext(method=SAY, side=Side.CLIENT, deadline=deadline)


async def call_through(
    middleware: Any, downstream: Downstream, deadline: float | None = None
) -> Any:
    with use_call(client_call(deadline)):
        return await middleware(downstream)("request")


def test_burst_is_admitted_at_once_then_the_rate() -> None:
    """A full bucket lets `burst` calls through at once; then one per 1/rate seconds."""
    clock = Clock()
    bucket = TokenBucketLimiter(rate=10, burst=5, clock=clock)
    assert [bucket.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    assert bucket.wait_time() == pytest.approx(0.1)
    clock.now += 0.05
    assert not bucket.try_acquire()
    assert bucket.wait_time() == pytest.approx(0.05)
    clock.now += 0.05
    assert bucket.try_acquire()
    assert not bucket.try_acquire()


def test_an_idle_bucket_holds_no_more_than_burst() -> None:
    """Refill stops at the bucket's size, however long the bucket was idle."""
    clock = Clock()
    bucket = TokenBucketLimiter(rate=100, burst=3, clock=clock)
    clock.now += 3600
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == pytest.approx(0.01)


@pytest.mark.parametrize(("rate", "burst"), [(50.0, 10), (7.5, 3), (400.0, 1), (1000.0, 100)])
async def test_admitted_calls_match_rate_times_time_plus_burst(rate: float, burst: int) -> None:
    """Over 2 s of calls attempted without pause, admitted == rate * 2 + burst within 5%."""
    clock, downstream = Clock(), Downstream()
    middleware = rate_limit(
        LimiterConfig(rate=rate, burst=burst), service="echo", clock=clock, sleep=clock.sleep
    )
    start, refused = clock.now, 0
    while clock.now - start <= 2.0 + 1e-9:  # both ends of the 2 s included
        for _ in range(3):  # more attempts than tokens at every step, for any rate here
            try:
                await call_through(middleware, downstream)
            except RateLimited:
                refused += 1
        clock.now += 0.0005
    expected = rate * 2 + burst
    assert abs(downstream.calls - expected) <= 0.05 * expected, (downstream.calls, expected)
    assert refused > 0 and clock.slept == []


async def test_a_call_waits_up_to_max_wait_for_a_token() -> None:
    """Without a free token a call waits, up to max_wait_seconds, and then goes through."""
    clock, downstream = Clock(), Downstream()
    config = LimiterConfig(rate=10, burst=1, max_wait_seconds=0.5)
    middleware = rate_limit(config, service="echo", clock=clock, sleep=clock.sleep)
    assert await call_through(middleware, downstream) == "ok"
    assert await call_through(middleware, downstream) == "ok"
    assert clock.slept == pytest.approx([0.1])
    assert downstream.calls == 2


async def test_a_wait_beyond_max_wait_is_refused_locally() -> None:
    """A token further away than max_wait_seconds: RateLimited at once, never sent downstream."""
    clock, downstream = Clock(), Downstream()
    config = LimiterConfig(rate=2, burst=1, max_wait_seconds=0.25)
    middleware = rate_limit(config, service="users", clock=clock, sleep=clock.sleep)
    await call_through(middleware, downstream)
    with pytest.raises(RateLimited) as err:
        await call_through(middleware, downstream)
    assert downstream.calls == 1
    assert clock.slept == []
    assert isinstance(err.value, ResourceExhausted)
    assert "'users'" in err.value.message and "2 calls/s" in err.value.message
    assert err.value.retry_after == pytest.approx(0.5)
    [info] = [d for d in err.value.details if isinstance(d, error_details_pb2.RetryInfo)]
    assert info.retry_delay.ToNanoseconds() == 500_000_000


async def test_a_deadline_closer_than_the_token_refuses_at_once() -> None:
    """A call whose deadline comes before its token is refused now, not at its deadline."""
    clock, downstream = Clock(), Downstream()
    config = LimiterConfig(rate=1, burst=1, max_wait_seconds=5)
    middleware = rate_limit(config, service="echo", clock=clock, sleep=clock.sleep)
    await call_through(middleware, downstream)
    with pytest.raises(RateLimited):
        await call_through(middleware, downstream, deadline=clock.now + 0.3)
    assert clock.slept == []
    assert downstream.calls == 1
    assert await call_through(middleware, downstream, deadline=clock.now + 2) == "ok"
    assert clock.slept == pytest.approx([1.0])


async def test_an_expired_deadline_still_takes_a_free_token() -> None:
    """The limiter only refuses for lack of tokens; a spent deadline is the deadline's business."""
    clock, downstream = Clock(), Downstream()
    middleware = rate_limit(LimiterConfig(rate=1), service="echo", clock=clock)
    assert await call_through(middleware, downstream, deadline=clock.now - 1) == "ok"


async def test_no_rate_passes_every_call_through() -> None:
    """rate None means no limit: the middleware returns the handler itself."""
    downstream = Downstream()
    middleware = rate_limit(LimiterConfig(burst=1), service="echo")
    assert middleware(downstream) is downstream
    for _ in range(1000):
        await call_through(middleware, downstream)
    assert downstream.calls == 1000


async def test_each_middleware_instance_has_its_own_bucket() -> None:
    """One bucket per middleware (per service): draining one leaves the other full."""
    clock, downstream = Clock(), Downstream()
    config = LimiterConfig(rate=1, burst=2)
    users = rate_limit(config, service="users", clock=clock)
    orders = rate_limit(config, service="orders", clock=clock)
    for _ in range(2):
        await call_through(users, downstream)
    with pytest.raises(RateLimited, match="'users'"):
        await call_through(users, downstream)
    for _ in range(2):
        await call_through(orders, downstream)
    assert downstream.calls == 4


async def test_waiters_wake_one_token_apart_in_arrival_order() -> None:
    """A crowd of waiters reserves tokens in turn: they do not all wake at the first token."""
    timeline = Timeline()
    bucket = TokenBucketLimiter(rate=10, burst=1, clock=timeline)
    assert bucket.try_acquire()
    admitted: list[int] = []

    async def waiter(n: int) -> None:
        if await bucket.acquire(0.55, timeline.sleep):
            admitted.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(6)]
    await timeline.advance(0)
    assert timeline.sleeping == 5  # the sixth would wait 0.6 s > 0.55 s: refused at once
    assert not bucket.try_acquire()  # a newcomer does not overtake the queue
    for step in range(1, 6):
        await timeline.advance(0.1)
        assert admitted == list(range(step))
    await asyncio.gather(*tasks)
    assert admitted == [0, 1, 2, 3, 4]
    assert not bucket.try_acquire()


async def test_a_cancelled_waiter_gives_its_token_back() -> None:
    """A waiter cancelled before its token came returns the reservation to the bucket."""
    timeline = Timeline()
    bucket = TokenBucketLimiter(rate=10, burst=1, clock=timeline)
    assert bucket.try_acquire()
    task = asyncio.create_task(bucket.acquire(1.0, timeline.sleep))
    await timeline.advance(0)
    assert bucket.wait_time() == pytest.approx(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bucket.wait_time() == pytest.approx(0.1)
    await timeline.advance(0.1)
    assert bucket.try_acquire()


async def test_a_custom_limiter_replaces_the_bucket() -> None:
    """Any Limiter may stand in for the default bucket; its wait_time becomes retry_after."""

    class Closed:
        async def acquire(self, max_wait: float) -> bool:
            return False

        def wait_time(self) -> float:
            return 7.0

    closed: Limiter = Closed()
    downstream = Downstream()
    middleware = rate_limit(LimiterConfig(), service="echo", limiter=closed)
    with pytest.raises(RateLimited) as err:
        await call_through(middleware, downstream)
    assert err.value.retry_after == 7.0
    assert downstream.calls == 0
    bucket: Limiter = TokenBucketLimiter(1, 1)  # the default bucket is a Limiter too
    assert await bucket.acquire(0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (math.nan, 1), (math.inf, 1), (1, 0)])
def test_bucket_refuses_bad_arguments(rate: float, burst: int) -> None:
    """rate must be positive and finite, burst at least 1."""
    with pytest.raises(ValueError, match=r"rate|burst"):
        TokenBucketLimiter(rate, burst)
