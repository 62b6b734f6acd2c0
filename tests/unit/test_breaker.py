"""Tests for tether.breaker: trips, fails fast, probes, closes, and whose errors count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs
from support.fakes import FakeClock as Clock

from tether import CallContext, Handler, MethodName, Side, current_call, use_call
from tether.breaker import (
    BreakerEvent,
    BreakerListener,
    BreakerMiddleware,
    PybreakerBreaker,
    breaker,
)
from tether.config import ClientConfig
from tether.errors import BreakerOpen, DeadlineExceeded, RateLimited, RemoteError, Unavailable
from tether.testing import eventually

SERVICE = "echo.v1.Echo"
SAY = MethodName.parse("/echo.v1.Echo/Say")
JOIN = MethodName.parse("/echo.v1.Echo/Join")
SPLIT = MethodName.parse("/echo.v1.Echo/Split")
INTERNAL = grpc.StatusCode.INTERNAL
WAIT = 5.0  # bound on every real wait here; a healthy run needs a fraction of it


class Peer:
    """A handler that answers from a script and counts the calls that reached it.

    Each outcome is an exception to raise, a response to return, or an ``asyncio.Event`` to wait
    for before answering "ok" (a call held in flight).
    """

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[CallContext] = []
        self.entered = 0

    async def __call__(self, request: Any) -> Any:
        ctx = current_call()
        assert ctx is not None
        self.calls.append(ctx)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, asyncio.Event):
            self.entered += 1
            await outcome.wait()
            return "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def failure(code: grpc.StatusCode = INTERNAL) -> RemoteError:
    return RemoteError(code, "peer failed")


@dataclass
class Rig:
    """The breaker middleware and the handler it made over a peer."""

    middleware: BreakerMiddleware
    handler: Handler

    def states(self) -> dict[str, str]:
        return self.middleware.breakers.states()

    def breaker(self, method: str = "echo.v1.Echo/Say") -> PybreakerBreaker:
        made = self.middleware.breakers.get(method)
        assert made is not None
        return made


def guarded(
    peer: Handler,
    clock: Clock,
    *,
    listeners: Sequence[BreakerListener] = (),
    **breaker_config: Any,
) -> Rig:
    """The breaker middleware over ``peer``, configured like ``client.breaker``."""
    config = ClientConfig(breaker={"fail_max": 3, "reset_timeout_seconds": 10, **breaker_config})
    middleware = breaker(
        config.resolver(SERVICE), service=SERVICE, clock=clock, listeners=listeners
    )
    return Rig(middleware, middleware(peer))


async def call(rig: Rig, method: MethodName = SAY, *, deadline: float | None = None) -> Any:
    with use_call(CallContext(method=method, side=Side.CLIENT, deadline=deadline)):
        return await rig.handler("request")


async def fail_times(rig: Rig, n: int, method: MethodName = SAY) -> None:
    for _ in range(n):
        with pytest.raises(RemoteError):
            await call(rig, method)


def state(rig: Rig, method: str = "echo.v1.Echo/Say") -> str:
    return rig.states()[method]


async def test_opens_after_fail_max_consecutive_failures() -> None:
    """fail_max failures in a row open the breaker; one fewer does not."""
    peer, clock = Peer(failure()), Clock()
    rig = guarded(peer, clock)
    await fail_times(rig, 2)
    assert state(rig) == "closed"
    await fail_times(rig, 1)
    assert state(rig) == "open"


async def test_a_success_resets_the_run_of_failures() -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    peer, clock = Peer(failure(), failure(), "ok", failure(), failure(), "ok"), Clock()
    rig = guarded(peer, clock)
    await fail_times(rig, 2)
    assert await call(rig) == "ok"
    await fail_times(rig, 2)
    assert await call(rig) == "ok"
    assert state(rig) == "closed"


async def test_open_breaker_fails_fast_without_calling() -> None:
    """While open, a call is refused locally with BreakerOpen and never reaches the peer."""
    peer, clock = Peer(failure()), Clock()
    rig = guarded(peer, clock)
    await fail_times(rig, 3)
    clock.now += 5.8
    with pytest.raises(BreakerOpen) as err:
        await call(rig)
    assert len(peer.calls) == 3
    assert str(err.value) == "circuit breaker open for echo.v1.Echo/Say; next probe in 4.2 s"
    assert err.value.retry_after == pytest.approx(4.2)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE


async def test_half_open_admits_exactly_the_configured_probes() -> None:
    """After reset_timeout, half_open_probes calls go through at once; the others fail fast."""
    release = asyncio.Event()
    peer, clock = Peer(failure(), failure(), failure(), release), Clock()
    rig = guarded(peer, clock, half_open_probes=2)
    await fail_times(rig, 3)
    clock.now += 10
    tasks = [asyncio.create_task(call(rig)) for _ in range(5)]
    await eventually(
        lambda: sum(t.done() for t in tasks) == 3, within=WAIT, message="three calls refused"
    )
    refused = [t for t in tasks if t.done()]
    assert all(isinstance(t.exception(), BreakerOpen) for t in refused)
    assert "half-open" in str(refused[0].exception())
    assert peer.entered == 2
    release.set()
    assert [await t for t in tasks if t not in refused] == ["ok", "ok"]


async def test_closes_after_success_threshold_probe_successes() -> None:
    """success_threshold probe successes close the breaker; fewer leave it half-open."""
    peer, clock = Peer(failure(), failure(), failure(), "ok"), Clock()
    rig = guarded(peer, clock, success_threshold=2)
    await fail_times(rig, 3)
    clock.now += 10
    assert await call(rig) == "ok"
    assert state(rig) == "half-open"
    assert await call(rig) == "ok"
    assert state(rig) == "closed"


async def test_probe_failure_opens_again_for_a_full_timeout() -> None:
    """A failed probe re-opens the breaker; it waits reset_timeout again before probing."""
    peer, clock = Peer(failure()), Clock()
    rig = guarded(peer, clock)
    await fail_times(rig, 3)
    clock.now += 10
    await fail_times(rig, 1)
    assert state(rig) == "open"
    clock.now += 9.9
    with pytest.raises(BreakerOpen):
        await call(rig)
    clock.now += 0.1
    await fail_times(rig, 1)
    assert len(peer.calls) == 5


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    ],
)
async def test_codes_outside_failure_codes_never_count(code: grpc.StatusCode) -> None:
    """A peer's answer with a status not in failure_codes is a success for the breaker."""
    peer, clock = Peer(failure(code)), Clock()
    rig = guarded(peer, clock, fail_max=1)
    await fail_times(rig, 5)
    assert state(rig) == "closed"


async def test_configured_failure_codes_decide() -> None:
    """Only the configured failure_codes count: here UNAVAILABLE does, INTERNAL does not."""
    peer, clock = Peer(failure(INTERNAL), failure(grpc.StatusCode.UNAVAILABLE)), Clock()
    rig = guarded(peer, clock, fail_max=1, failure_codes=["UNAVAILABLE"])
    await fail_times(rig, 1)
    assert state(rig) == "closed"
    await fail_times(rig, 1)
    assert state(rig) == "open"


@pytest.mark.parametrize(
    "local",
    [
        RateLimited("limited"),
        DeadlineExceeded("deadline exceeded before the call was sent"),
        Unavailable("no instances of 'echo'"),
        ValueError("a bug below the breaker"),
    ],
)
async def test_local_rejections_never_count(local: Exception) -> None:
    """Errors raised below the breaker, before anything was sent, are neither verdict."""
    peer, clock = Peer(local), Clock()
    rig = guarded(peer, clock, fail_max=1)
    for _ in range(3):
        with pytest.raises(type(local)):
            await call(rig)
    assert state(rig) == "closed"
    assert rig.breaker().failures == 0


async def test_local_rejection_gives_the_probe_slot_back() -> None:
    """A probe refused below the breaker frees its slot; it neither closes nor re-opens."""
    peer, clock = Peer(failure(), RateLimited("limited"), "ok"), Clock()
    rig = guarded(peer, clock, fail_max=1)
    await fail_times(rig, 1)
    clock.now += 10
    with pytest.raises(RateLimited):
        await call(rig)
    assert state(rig) == "half-open"
    assert await call(rig) == "ok"
    assert state(rig) == "closed"


async def test_deadline_exceeded_from_the_peer_counts() -> None:
    """A peer's DEADLINE_EXCEEDED is a failure of the dependency."""
    peer, clock = Peer(failure(grpc.StatusCode.DEADLINE_EXCEEDED)), Clock()
    rig = guarded(peer, clock, fail_max=1)
    await fail_times(rig, 1)
    assert state(rig) == "open"


async def test_breaker_timeout_just_above_the_deadline_counts() -> None:
    """A call nothing below ends is cut just past its deadline and counted as a failure."""
    peer, clock = Peer(asyncio.Event()), Clock()
    rig = guarded(peer, clock, fail_max=1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not answer within its deadline"):
        await asyncio.wait_for(call(rig, deadline=started + 0.05), WAIT)
    assert time.monotonic() - started >= 0.15  # the deadline plus the breaker's margin
    assert state(rig) == "open"


async def test_disabled_breaker_passes_through() -> None:
    """With breaker.enabled false every call reaches the peer and no breaker is made."""
    peer, clock = Peer(failure()), Clock()
    rig = guarded(peer, clock, enabled=False, fail_max=1)
    await fail_times(rig, 5)
    assert len(peer.calls) == 5
    assert rig.states() == {}


async def test_a_method_override_disables_one_breaker() -> None:
    """client.services.<name>.methods overrides decide per method."""
    config = ClientConfig(
        breaker={"fail_max": 1},
        services={SERVICE: {"methods": {"echo.v1.Echo/Join": {"breaker": {"enabled": False}}}}},
    )
    middleware = breaker(config.resolver(SERVICE), service=SERVICE, clock=Clock())
    rig = Rig(middleware, middleware(Peer(failure())))
    await fail_times(rig, 3, JOIN)
    await fail_times(rig, 1, SAY)
    assert rig.states() == {"echo.v1.Echo/Say": "open"}


async def test_methods_have_their_own_breakers() -> None:
    """One method's failures never open another method's breaker."""
    peer, clock = Peer(failure(), failure(), failure(), "ok"), Clock()
    rig = guarded(peer, clock)
    await fail_times(rig, 3, SAY)
    assert await call(rig, JOIN) == "ok"
    assert rig.states() == {"echo.v1.Echo/Say": "open", "echo.v1.Echo/Join": "closed"}


async def test_listeners_and_log_fire_once_per_transition() -> None:
    """Each state change is logged once and told to every listener once, in order."""
    events: list[BreakerEvent] = []
    peer, clock = Peer(failure(), failure(), failure(), failure(), "ok"), Clock()
    rig = guarded(peer, clock, listeners=[events.append])
    with capture_logs() as logs:
        await fail_times(rig, 3)
        with pytest.raises(BreakerOpen):
            await call(rig)
        clock.now += 10
        await fail_times(rig, 1)  # half-open, then open again
        clock.now += 10
        assert await call(rig) == "ok"  # half-open, then closed
    changes = [(e.old, e.new) for e in events]
    assert changes == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ]
    assert events[0] == BreakerEvent(SERVICE, "echo.v1.Echo/Say", "closed", "open", 1000.0)
    lines = [e for e in logs if e["event"] == "circuit breaker state changed"]
    assert [(e["previous"], e["state"]) for e in lines] == changes
    assert lines[0] == {
        "event": "circuit breaker state changed",
        "log_level": "warning",
        "logger_name": "tether.breaker",
        "dependency": SERVICE,
        "rpc": "echo.v1.Echo/Say",
        "state": "open",
        "previous": "closed",
        "failures": 3,
    }


async def test_a_failing_listener_does_not_fail_the_call() -> None:
    """A listener that raises is logged; the call still gets its own outcome."""

    def broken(event: BreakerEvent) -> None:
        raise RuntimeError("exporter down")

    peer, clock = Peer(failure()), Clock()
    rig = guarded(peer, clock, fail_max=1, listeners=[broken])
    with capture_logs() as logs:
        await fail_times(rig, 1)
    assert state(rig) == "open"
    assert any(e["event"] == "breaker listener failed" for e in logs)


async def test_a_call_admitted_before_the_trip_does_not_judge_the_probe() -> None:
    """A slow call from before the breaker opened cannot close it when it finally succeeds."""
    slow = asyncio.Event()
    peer, clock = Peer(slow, failure()), Clock()
    rig = guarded(peer, clock, fail_max=1)
    early = asyncio.create_task(call(rig))
    await eventually(lambda: peer.entered == 1, within=WAIT, message="the slow call in flight")
    await fail_times(rig, 1)
    clock.now += 10
    assert rig.breaker().allow() is not None
    slow.set()
    assert await early == "ok"
    assert state(rig) == "half-open"


async def test_stream_verdict_is_its_first_message_or_its_error() -> None:
    """A response stream counts once: a failure before any message, or success at the first."""

    async def messages(fail_first: bool) -> AsyncIterator[str]:
        if fail_first:
            raise failure()
        yield "a"
        raise failure()  # after the first message: already judged a success

    outcomes = iter([True, False, False])

    async def open_stream(request: Any) -> AsyncIterator[str]:
        return messages(next(outcomes))

    clock = Clock()
    rig = guarded(open_stream, clock, fail_max=2)
    ctx = CallContext(method=SPLIT, side=Side.CLIENT, response_streaming=True)
    got = []
    for _ in range(3):
        with use_call(ctx), pytest.raises(RemoteError):
            async for message in await rig.handler("request"):
                got.append(message)
    assert got == ["a", "a"]
    assert rig.breaker("echo.v1.Echo/Split").failures == 0
    assert state(rig, "echo.v1.Echo/Split") == "closed"


async def test_a_stream_dropped_unread_gives_its_probe_slot_back() -> None:
    """A probe whose response stream is never read frees its slot when the stream is dropped."""

    async def messages() -> AsyncIterator[str]:
        yield "a"

    async def open_stream(request: Any) -> AsyncIterator[str]:
        return messages()

    clock = Clock()
    rig = guarded(open_stream, clock, fail_max=1)
    permit = rig.breaker("echo.v1.Echo/Split").allow()
    assert permit is not None
    permit.mark_failure()
    clock.now += 10
    with use_call(CallContext(method=SPLIT, side=Side.CLIENT, response_streaming=True)):
        stream = await rig.handler("request")
        with pytest.raises(BreakerOpen):
            await rig.handler("request")  # the one probe slot is taken
        del stream
        assert [m async for m in await rig.handler("request")] == ["a"]
    assert state(rig, "echo.v1.Echo/Split") == "closed"


def test_pybreaker_breaker_counts_on_its_own() -> None:
    """The algorithm without the middleware: permits in, verdicts out, refusals when open."""
    clock = Clock()
    changes: list[tuple[str, str, int]] = []
    b = PybreakerBreaker(
        fail_max=2, reset_timeout=1, clock=clock, on_change=lambda *c: changes.append(c)
    )
    for _ in range(2):
        permit = b.allow()
        assert permit is not None
        permit.mark_failure()
        permit.mark_failure()  # a second verdict on one permit is ignored
    assert b.state == "open" and b.allow() is None and b.retry_after() == 1
    clock.now += 1
    probe = b.allow()
    assert probe is not None and b.allow() is None and b.retry_after() == 0
    probe.mark_success()
    assert changes == [("closed", "open", 2), ("open", "half-open", 2), ("half-open", "closed", 0)]
