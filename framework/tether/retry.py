"""The retry middleware: gRFC A6 retries of unary calls, each to another instance; no gRPC here.

Policy and algorithm are kept apart. The middleware owns the policy: which status codes are
retried, which methods may be repeated, what server pushback means, when the deadline forbids
another attempt. :class:`RetryThrottler` is the algorithm: a token bucket that only counts.

An attempt is retried when its status is retryable, the method is idempotent (the proto says
``idempotency_level = IDEMPOTENT`` or ``NO_SIDE_EFFECTS``, or configuration lists it), the
throttle has tokens, the server did not push back with "do not retry", attempts remain and the
backoff ends before the deadline. An attempt that never reached a server's handlers
(``RemoteError.sent`` is False: the connection could not be made, or a server shutting down
refused it) is retried at once for any method, as gRPC's own transparent retries are: it
cannot have had a side effect, and it put no load on a server, so it neither drains the
throttle nor waits out a backoff. It still counts against ``max_attempts``, so a call tries
a bounded number of instances. Which instance the next attempt goes to is the balancer's
business: it avoids the addresses this call already tried.

Only unary-request, unary-response calls are retried: a streamed request cannot be replayed.
grpcio's own retries stay off on tether subchannels (``grpc.enable_retries=0``), so attempts
never multiply.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool

from tether.config_policies import PolicyResolver, RetryConfig
from tether.context import MethodName, current_call, use_call
from tether.errors import RemoteError
from tether.middleware import Handler, Middleware

__all__ = [
    "PREVIOUS_ATTEMPTS_KEY",
    "PUSHBACK_KEY",
    "IdempotencyClassifier",
    "RetryHook",
    "RetryThrottler",
    "backoff_delay",
    "declared_idempotent",
    "retry",
    "server_pushback",
]

#: Told of each retry: ``(method, attempt number about to start, code name that failed)``.
RetryHook = Callable[[MethodName, int, str], None]

#: Trailer by which a server asks for a delay before the retry, or (negative) for none at all.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: Header telling the server how many attempts came before this one (absent on the first).
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"

_PUSHBACK_VALUE = re.compile(r"-?(0|[1-9][0-9]*)")
_INT32_MAX = 2**31 - 1
_CACHE_LIMIT = 4096
_REPEATABLE = frozenset(
    {descriptor_pb2.MethodOptions.IDEMPOTENT, descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS}
)


class RetryThrottler:
    """gRFC A6 retry throttling: failures drain a token bucket, successes refill it.

    Retries are allowed while more than half the tokens are left, so when most calls fail a
    client stops multiplying the load on a struggling service. One throttler serves one target;
    the retry middleware counts only the calls it may retry.

    Args:
        max_tokens: size of the bucket, which starts full.
        token_ratio: tokens a success puts back; a failure takes one.
    """

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if max_tokens <= 0 or token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be > 0")
        self._max = float(max_tokens)
        self._ratio = float(token_ratio)
        self._tokens = self._max

    @property
    def tokens(self) -> float:
        """Tokens left now."""
        return self._tokens

    def allow(self) -> bool:
        """Whether a retry may be sent now."""
        return self._tokens > self._max / 2

    def record_success(self) -> None:
        """Count a successful call."""
        self._tokens = min(self._max, self._tokens + self._ratio)

    def record_failure(self) -> None:
        """Count an attempt that failed with a retryable status, or was pushed back."""
        self._tokens = max(0.0, self._tokens - 1.0)


def backoff_delay(retry_number: int, config: RetryConfig, rand: Callable[[], float]) -> float:
    """The delay before a retry: full jitter, ``random(0, min(initial * multiplier**n, max))``.

    Args:
        retry_number: 0 for the first retry (or the first after a pushback), 1 for the next...
        config: the backoff bounds.
        rand: a uniform draw from [0, 1).

    Returns:
        Seconds to wait.
    """
    bound = config.initial_backoff_seconds * config.backoff_multiplier**retry_number
    return rand() * min(bound, config.max_backoff_seconds)


def server_pushback(trailers: Sequence[tuple[str, str | bytes]]) -> float | None:
    """The delay a server asked for in ``grpc-retry-pushback-ms``.

    Args:
        trailers: the trailing metadata of the failed attempt.

    Returns:
        None when the server said nothing; seconds to wait; ``math.inf`` when the value is
        negative or malformed, which gRFC A6 reads as "do not retry".
    """
    for key, value in trailers:
        if key != PUSHBACK_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if not _PUSHBACK_VALUE.fullmatch(text):
            return math.inf
        millis = int(text)
        if millis < 0 or millis > _INT32_MAX:
            return math.inf
        return millis / 1000
    return None


def declared_idempotent(full_name: str, pool: descriptor_pool.DescriptorPool | None = None) -> bool:
    """Whether the proto declares a method idempotent or free of side effects.

    Args:
        full_name: ``package.Service.Method``, as the descriptor pool names it.
        pool: where generated code registered its descriptors; the default pool if None.

    Returns:
        True for ``idempotency_level = IDEMPOTENT`` or ``NO_SIDE_EFFECTS``; False otherwise,
        and for a method the pool does not know.
    """
    try:
        method = (pool or descriptor_pool.Default()).FindMethodByName(full_name)
    except KeyError:
        return False
    return method.GetOptions().idempotency_level in _REPEATABLE


class IdempotencyClassifier:
    """Decides whether a method may be repeated: configuration lists it or the proto declares it.

    Decisions are cached per method name.

    Args:
        methods: ``package.Service/Method`` or ``package.Service/*`` entries (as in
            ``client.idempotent_methods``).
        pool: the descriptor pool to read method options from; the default pool if None.
    """

    def __init__(
        self, methods: Iterable[str] = (), *, pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        self._methods: set[str] = set()
        self._services: set[str] = set()
        for entry in methods:
            service, _, method = entry.partition("/")
            if method == "*":
                self._services.add(service)
            else:
                self._methods.add(entry)
        self._pool = pool
        self._known: dict[str, bool] = {}

    def __call__(self, method: MethodName) -> bool:
        """Whether ``method`` may be sent again after an attempt that reached a server."""
        known = self._known.get(method.full)
        if known is None:
            known = self._decide(method)
            if len(self._known) < _CACHE_LIMIT:  # names come from code, but stay bounded
                self._known[method.full] = known
        return known

    def _decide(self, method: MethodName) -> bool:
        service = method.qualified_service
        if service in self._services or method.path in self._methods:
            return True
        return declared_idempotent(f"{service}.{method.method}", self._pool)


def retry(
    config: RetryConfig | None = None,
    *,
    policies: PolicyResolver | None = None,
    idempotent_methods: Iterable[str] = (),
    is_idempotent: Callable[[MethodName], bool] | None = None,
    throttler: RetryThrottler | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
    on_retry: RetryHook | None = None,
) -> Middleware:
    """Build the retry middleware (see the module docstring for when a call is retried).

    Args:
        config: attempts, backoff, retryable codes and throttling; ``RetryConfig()`` if None.
        policies: per-method overrides (``client.services``): each call's retry settings and
            ``idempotent`` flag come from here when given; the throttle stays ``config``'s.
        idempotent_methods: methods to treat as idempotent besides those the proto declares.
        is_idempotent: replaces the idempotency decision entirely (tests, custom rules).
        throttler: the token bucket; one is made from ``config``. Share one per target.
        sleep: waits out a backoff; injectable for tests.
        rand: a uniform draw from [0, 1) for the jitter; injectable for tests.
        clock: ``time.monotonic`` or a fake, the clock call deadlines are measured on.
        on_retry: called as ``on_retry(method, attempt, code)`` each time an attempt after
            the first is about to be sent: its number (2 for the first retry) and the status
            code name of the attempt that failed (metrics, span events); must not raise or
            block.

    Returns:
        A client middleware; put it inside the deadline, breaker and limiter, right outside
        the load-balancing terminal, so each attempt is balanced afresh.
    """
    base = config or RetryConfig()
    bucket = throttler or RetryThrottler(base.max_tokens, base.token_ratio)
    classify = is_idempotent or IdempotencyClassifier(idempotent_methods)

    def settings(method: MethodName) -> tuple[RetryConfig, bool]:
        if policies is None:
            return base, classify(method)
        policy = policies.policy(method.path)
        declared = policy.idempotent
        return policy.retry, classify(method) if declared is None else declared

    def middleware(handler: Handler) -> Handler:
        async def retrying(request: Any) -> Any:
            ctx = current_call()
            if ctx is None or ctx.request_streaming or ctx.response_streaming:
                return await handler(request)
            cfg, repeatable = settings(ctx.method)
            max_attempts = cfg.max_attempts
            if max_attempts < 2:
                return await handler(request)
            retryable = cfg.retryable_status_codes
            attempt = 1
            backoff_step = 0
            attempt_ctx = ctx
            while True:
                try:
                    if attempt == 1:
                        response = await handler(request)
                    else:
                        with use_call(attempt_ctx):
                            response = await handler(request)
                except RemoteError as err:
                    if err.sent:
                        pushback = server_pushback(err.trailing_metadata)
                        code = err.code.name
                        # Only calls that may be retried move the bucket, as in grpc-core
                        # (a method without a retry policy never touches it): failures of
                        # calls that are never retried must not starve those that are.
                        if repeatable and (code in retryable or pushback == math.inf):
                            bucket.record_failure()
                        if (
                            code not in retryable
                            or pushback == math.inf
                            or not repeatable
                            or not bucket.allow()
                        ):
                            raise
                        if pushback is None:
                            delay = backoff_delay(backoff_step, cfg, rand)
                            backoff_step += 1
                        else:
                            # A6: after a pushback the backoff starts again from the beginning.
                            delay = pushback
                            backoff_step = 0
                    else:
                        delay = 0.0
                    if attempt >= max_attempts:
                        raise
                    if ctx.deadline is not None and clock() + delay >= ctx.deadline:
                        raise  # the next attempt could not finish in time; report this one
                    if delay > 0:
                        await sleep(delay)
                    attempt_ctx = ctx.with_metadata([(PREVIOUS_ATTEMPTS_KEY, str(attempt))])
                    attempt += 1
                    if on_retry is not None:
                        on_retry(ctx.method, attempt, err.code.name)
                    continue
                if repeatable:
                    bucket.record_success()
                return response

        return retrying

    return middleware
