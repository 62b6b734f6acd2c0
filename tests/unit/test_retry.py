"""Tests for tether.retry: which calls are retried, backoff, throttling, pushback, deadlines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2  # noqa: F401  # registers echo.v1 descriptors in the default pool
from support.fakes import FakeClock as Clock

from tether import CallContext, MethodName, Side, current_call, use_call
from tether.config import RetryConfig
from tether.errors import NotFound, RemoteError, Unavailable
from tether.retry import (
    PREVIOUS_ATTEMPTS_KEY,
    PUSHBACK_KEY,
    IdempotencyClassifier,
    RetryThrottler,
    backoff_delay,
    declared_idempotent,
    retry,
    server_pushback,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SAY = MethodName.parse("/echo.v1.Echo/Say")  # the proto declares it IDEMPOTENT
HOLD = MethodName.parse("/echo.v1.Echo/Hold")  # not idempotent


class Peer:
    """A handler that answers from a script: an exception to raise, or a response."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[CallContext] = []

    async def __call__(self, request: Any) -> Any:
        ctx = current_call()
        assert ctx is not None
        self.calls.append(ctx)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def unavailable(*, sent: bool = True, trailers: Sequence[tuple[str, str]] = ()) -> RemoteError:
    return RemoteError(UNAVAILABLE, "down", trailing_metadata=trailers, sent=sent)


def context(
    method: MethodName = SAY, *, deadline: float | None = None, streaming: bool = False
) -> CallContext:
    return CallContext(
        method=method,
        side=Side.CLIENT,
        metadata=(("x-user", "ada"),),
        deadline=deadline,
        response_streaming=streaming,
    )


async def run(
    peer: Peer,
    clock: Clock,
    *,
    ctx: CallContext | None = None,
    config: RetryConfig | None = None,
    throttler: RetryThrottler | None = None,
    rand: float = 0.5,
) -> Any:
    middleware = retry(
        config or RetryConfig(),
        throttler=throttler,
        sleep=clock.sleep,
        rand=lambda: rand,
        clock=clock,
    )
    with use_call(ctx or context()):
        return await middleware(peer)("request")


async def test_idempotent_call_is_retried_until_it_succeeds() -> None:
    """UNAVAILABLE on an idempotent method is retried; the success is returned."""
    peer, clock = Peer(unavailable(), unavailable(), "ok"), Clock()
    assert await run(peer, clock) == "ok"
    assert len(peer.calls) == 3


async def test_attempts_are_bounded() -> None:
    """After max_attempts the last failure reaches the caller."""
    last = unavailable()
    peer, clock = Peer(unavailable(), unavailable(), last), Clock()
    with pytest.raises(RemoteError) as err:
        await run(peer, clock, config=RetryConfig(max_attempts=3))
    assert err.value is last
    assert len(peer.calls) == 3


async def test_one_attempt_turns_retries_off() -> None:
    """max_attempts=1 sends each call once, even one that was never sent."""
    peer, clock = Peer(unavailable(sent=False)), Clock()
    with pytest.raises(RemoteError):
        await run(peer, clock, config=RetryConfig(max_attempts=1))
    assert len(peer.calls) == 1


async def test_backoff_is_full_jitter_and_grows() -> None:
    """Delays are random(0, min(initial * multiplier**n, max)), from the injected draw."""
    peer, clock = Peer(unavailable(), unavailable(), unavailable(), unavailable(), "ok"), Clock()
    config = RetryConfig(
        max_attempts=5, initial_backoff_seconds=0.1, max_backoff_seconds=0.3, backoff_multiplier=2
    )
    assert await run(peer, clock, config=config, rand=0.5) == "ok"
    assert clock.slept == pytest.approx([0.05, 0.1, 0.15, 0.15])


def test_backoff_delay_uses_the_whole_range() -> None:
    """A draw of 0 means no wait; a draw near 1 waits nearly the bound."""
    config = RetryConfig(initial_backoff_seconds=0.2, max_backoff_seconds=1.0)
    assert backoff_delay(0, config, lambda: 0.0) == 0.0
    assert backoff_delay(0, config, lambda: 0.999) == pytest.approx(0.1998)
    assert backoff_delay(10, config, lambda: 0.999) == pytest.approx(0.999)


async def test_non_retryable_code_is_not_retried() -> None:
    """A status outside retryable_status_codes goes straight back."""
    peer, clock = Peer(RemoteError(grpc.StatusCode.NOT_FOUND, "no"), "ok"), Clock()
    with pytest.raises(RemoteError):
        await run(peer, clock)
    assert len(peer.calls) == 1


async def test_configured_codes_are_retried() -> None:
    """Codes named in the config are retried; the default UNAVAILABLE then is not."""
    config = RetryConfig(retryable_status_codes=("RESOURCE_EXHAUSTED",))
    exhausted = RemoteError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
    peer, clock = Peer(exhausted, "ok"), Clock()
    assert await run(peer, clock, config=config) == "ok"
    peer = Peer(unavailable(), "ok")
    with pytest.raises(RemoteError):
        await run(peer, clock, config=config)


async def test_local_errors_are_not_retried() -> None:
    """A status raised inside the chain (not a peer's answer) is not retried."""
    peer, clock = Peer(Unavailable("no instances of 'echo'"), "ok"), Clock()
    with pytest.raises(Unavailable):
        await run(peer, clock)
    assert len(peer.calls) == 1


async def test_non_idempotent_call_that_was_sent_is_not_retried() -> None:
    """A method without an idempotency declaration is not repeated once it reached a server."""
    peer, clock = Peer(unavailable(), "ok"), Clock()
    with pytest.raises(RemoteError):
        await run(peer, clock, ctx=context(HOLD))
    assert len(peer.calls) == 1


async def test_unsent_call_is_retried_at_once_for_any_method() -> None:
    """An attempt that never reached a server is retried at once, idempotent or not."""
    peer, clock = Peer(unavailable(sent=False), "ok"), Clock()
    assert await run(peer, clock, ctx=context(HOLD)) == "ok"
    assert clock.slept == []


async def test_unsent_attempts_do_not_drain_the_throttle() -> None:
    """Connection failures put no load on servers, so they cost no retry tokens."""
    throttler, clock = RetryThrottler(10, 0.1), Clock()
    for _ in range(5):
        peer = Peer(unavailable(sent=False), unavailable(sent=False), "ok")
        assert await run(peer, clock, throttler=throttler) == "ok"
    assert throttler.tokens == 10


async def test_configured_method_is_idempotent() -> None:
    """A method listed in idempotent_methods is retried although the proto says nothing."""
    clock = Clock()
    middleware = retry(
        RetryConfig(),
        idempotent_methods=["echo.v1.Echo/Hold"],
        sleep=clock.sleep,
        rand=lambda: 0.0,
        clock=clock,
    )
    peer = Peer(unavailable(), "ok")
    with use_call(context(HOLD)):
        assert await middleware(peer)("request") == "ok"


def test_idempotency_comes_from_the_proto_or_config() -> None:
    """The descriptor pool's idempotency_level decides, unless configuration lists the method."""
    assert declared_idempotent("echo.v1.Echo.Say")
    assert not declared_idempotent("echo.v1.Echo.Hold")
    assert not declared_idempotent("no.such.Service.Method")
    plain = IdempotencyClassifier()
    assert plain(SAY) and not plain(HOLD)
    listed = IdempotencyClassifier(["echo.v1.Echo/Hold"])
    assert listed(HOLD)
    wildcard = IdempotencyClassifier(["echo.v1.Echo/*"])
    assert wildcard(MethodName.parse("/echo.v1.Echo/Chat"))
    assert not wildcard(MethodName.parse("/other.v1.Echo/Chat"))


async def test_streaming_calls_are_never_retried() -> None:
    """A streamed call passes through untouched."""
    peer, clock = Peer(unavailable(), "ok"), Clock()
    with pytest.raises(RemoteError):
        await run(peer, clock, ctx=context(streaming=True))
    assert len(peer.calls) == 1


async def test_retries_carry_previous_attempts() -> None:
    """Each retry says how many attempts came before it; the first says nothing."""
    peer, clock = Peer(unavailable(), unavailable(), "ok"), Clock()
    await run(peer, clock)
    headers = [dict(ctx.metadata).get(PREVIOUS_ATTEMPTS_KEY) for ctx in peer.calls]
    assert headers == [None, "1", "2"]
    assert all(dict(ctx.metadata)["x-user"] == "ada" for ctx in peer.calls)
    assert [k for k, _ in peer.calls[2].metadata].count(PREVIOUS_ATTEMPTS_KEY) == 1


def test_throttler_counts_tokens() -> None:
    """Failures take a token, successes give back token_ratio, within [0, max_tokens]."""
    throttler = RetryThrottler(max_tokens=4, token_ratio=0.5)
    throttler.record_success()
    assert throttler.tokens == 4
    throttler.record_failure()
    throttler.record_failure()
    assert throttler.tokens == 2 and not throttler.allow()
    throttler.record_success()
    assert throttler.tokens == 2.5 and throttler.allow()
    for _ in range(10):
        throttler.record_failure()
    assert throttler.tokens == 0


async def test_throttling_stops_retries_when_most_calls_fail() -> None:
    """Failing calls drain the bucket; at half of max_tokens no call is retried."""
    throttler, clock = RetryThrottler(max_tokens=10, token_ratio=0.1), Clock()
    attempts = []
    for _ in range(4):
        peer = Peer(unavailable())
        with pytest.raises(RemoteError):
            await run(peer, clock, throttler=throttler)
        attempts.append(len(peer.calls))
    assert attempts == [3, 2, 1, 1]  # tokens 10 -> 7 -> 5 (retry refused) -> 4 -> 3
    peer = Peer("ok")
    for _ in range(30):
        await run(peer, clock, throttler=throttler)
    assert throttler.allow()  # successes refill the bucket


async def test_calls_never_retried_leave_the_throttle_alone() -> None:
    """Failures and successes of a non-idempotent method cost and give no retry tokens (as
    grpc-core, whose methods without a retry policy never touch the bucket), so they cannot
    stop the retries of idempotent calls."""
    throttler, clock = RetryThrottler(max_tokens=10, token_ratio=0.1), Clock()
    for _ in range(8):
        with pytest.raises(RemoteError):
            await run(Peer(unavailable()), clock, ctx=context(HOLD), throttler=throttler)
    await run(Peer("ok"), clock, ctx=context(HOLD), throttler=throttler)
    assert throttler.tokens == 10
    assert await run(Peer(unavailable(), "ok"), clock, throttler=throttler) == "ok"


async def test_pushback_sets_the_delay() -> None:
    """grpc-retry-pushback-ms replaces the backoff; the next backoff starts from the beginning."""
    pushed = unavailable(trailers=[(PUSHBACK_KEY, "250")])
    peer, clock = Peer(unavailable(), pushed, unavailable(), "ok"), Clock()
    config = RetryConfig(max_attempts=4)
    assert await run(peer, clock, config=config, rand=0.5) == "ok"
    assert clock.slept == pytest.approx([0.05, 0.25, 0.05])


@pytest.mark.parametrize("value", ["-1", "soon", "007", "1.5", "99999999999"])
async def test_pushback_can_refuse_a_retry(value: str) -> None:
    """A negative or malformed pushback means: do not retry."""
    peer, clock = Peer(unavailable(trailers=[(PUSHBACK_KEY, value)]), "ok"), Clock()
    with pytest.raises(RemoteError):
        await run(peer, clock)
    assert len(peer.calls) == 1


def test_server_pushback_parses_the_trailer() -> None:
    """The trailer is read as milliseconds; absence is None; a refusal is infinity."""
    assert server_pushback([]) is None
    assert server_pushback([("x-other", "5"), (PUSHBACK_KEY, "0")]) == 0
    assert server_pushback([(PUSHBACK_KEY, b"1500")]) == 1.5
    assert server_pushback([(PUSHBACK_KEY, "-5")]) == math.inf


async def test_backoff_never_sleeps_past_the_deadline() -> None:
    """When the backoff would end after the deadline, the failure is returned at once."""
    clock = Clock()
    peer = Peer(unavailable(), "ok")
    with pytest.raises(RemoteError):
        await run(peer, clock, ctx=context(deadline=clock.now + 0.04), rand=0.9)
    assert clock.slept == []
    assert len(peer.calls) == 1


async def test_retry_within_the_deadline_goes_ahead() -> None:
    """A backoff that ends before the deadline is waited out."""
    clock = Clock()
    peer = Peer(unavailable(), "ok")
    assert await run(peer, clock, ctx=context(deadline=clock.now + 1), rand=0.9) == "ok"
    assert clock.slept == pytest.approx([0.09])


async def test_other_errors_pass_through() -> None:
    """Errors that are not a peer's status (a local NotFound, a bug) are not retried."""
    peer, clock = Peer(NotFound("nope"), "ok"), Clock()
    with pytest.raises(NotFound):
        await run(peer, clock)
    peer = Peer(ValueError("bug"), "ok")
    with pytest.raises(ValueError, match="bug"):
        await run(peer, clock)


async def per_method_run(
    peer: Peer, clock: Clock, services: dict[str, Any], method: MethodName
) -> Any:
    from tether.config import ClientConfig

    policies = ClientConfig(services=services).resolver("echo")
    middleware = retry(
        RetryConfig(), policies=policies, sleep=clock.sleep, rand=lambda: 0.5, clock=clock
    )
    with use_call(context(method)):
        return await middleware(peer)("request")


async def test_per_method_retry_settings_apply() -> None:
    """client.services.<name>.methods.<m>.retry overrides the attempts for that method only."""
    services = {"echo": {"methods": {"echo.v1.Echo/Say": {"retry": {"max_attempts": 5}}}}}
    peer, clock = Peer(*[unavailable()] * 4, "ok"), Clock()
    assert await per_method_run(peer, clock, services, SAY) == "ok"
    assert len(peer.calls) == 5


async def test_per_method_idempotent_flag_overrides_the_proto() -> None:
    """idempotent: true in config makes Hold retryable; false stops Say from being retried."""
    services = {
        "echo": {
            "methods": {
                "echo.v1.Echo/Hold": {"idempotent": True},
                "echo.v1.Echo/Say": {"idempotent": False},
            }
        }
    }
    peer, clock = Peer(unavailable(), "ok"), Clock()
    assert await per_method_run(peer, clock, services, HOLD) == "ok"
    peer = Peer(unavailable(), "ok")
    with pytest.raises(RemoteError):
        await per_method_run(peer, clock, services, SAY)
    assert len(peer.calls) == 1
