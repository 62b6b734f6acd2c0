"""The circuit breaker of the client chain: one breaker per (service, method); no gRPC here.

Policy and algorithm are kept apart, as in Kratos. The algorithm is a :class:`Breaker`: it
admits a call (handing out a :class:`Permit`) or refuses it, and it counts the verdicts the
permits bring back. :class:`PybreakerBreaker` implements it on pybreaker's state machine. The
middleware built by :func:`breaker` owns the policy:

- a ``RemoteError`` whose status is in the method's ``failure_codes`` is a failure; any other
  ``RemoteError`` is a success (the dependency answered, if only to say no);
- an error raised locally below the breaker (a limiter's ``RateLimited``, a deadline that passed
  before sending, "no instances") is neither: the call never reached the dependency;
- the breaker's own timeout sits just above the call's deadline, so a dependency that never
  answers is counted even if nothing below gives up first (for a unary response; a response
  stream is judged by its first message or the failure before it);
- an open breaker refuses locally with ``BreakerOpen``, saying when it will probe next.

pybreaker is synchronous: ``CircuitBreaker.call`` holds its lock across the whole call,
decorating an ``async def`` never trips, and half-open lets every concurrent caller through.
So nothing here runs a call inside pybreaker. :class:`PybreakerBreaker` keeps pybreaker's
states, counters, thresholds and listener notifications, and drives them through the public
``open()`` / ``half_open()`` / ``close()`` transitions, each of which holds pybreaker's lock for
microseconds and never across an await. It adds what asyncio needs: a bounded number of probes
while half-open, and permits that tie a verdict to the state its call was admitted in.

Time comes from an injectable monotonic clock. pybreaker stamps ``opened_at`` with
``datetime.now(UTC)`` and compares wall-clock times in its open state's ``before_call``, which
only ``call()`` reaches; the storage given to pybreaker here also records the injected clock
whenever pybreaker stamps ``opened_at``, and the open-to-half-open check reads that instead.
Tests pass a fake clock; production uses ``time.monotonic``, which a wall-clock step (NTP)
cannot move.

A breaker serves one event loop; its counters are not guarded against other threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import pybreaker

from tether.config_policies import PolicyResolver
from tether.context import CallContext, MethodName, current_call
from tether.errors import BreakerOpen, DeadlineExceeded, RemoteError
from tether.log import get_logger
from tether.middleware import Handler

__all__ = [
    "Breaker",
    "BreakerEvent",
    "BreakerListener",
    "BreakerMiddleware",
    "Breakers",
    "Permit",
    "PybreakerBreaker",
    "breaker",
]

_log = get_logger("tether.breaker")

# pybreaker's names for its states, which are also the names logs, events and states() use.
_CLOSED = pybreaker.STATE_CLOSED
_OPEN = pybreaker.STATE_OPEN

#: How far past the call's deadline the breaker's own timeout fires. gRPC's deadline should
#: end the call first (and its DEADLINE_EXCEEDED counts); the margin only catches a call that
#: nothing below ends, without racing the deadline on a loaded event loop.
_TIMEOUT_MARGIN = 0.1


# --------------------------------------------------------------------------- the algorithm


class Permit(Protocol):
    """One admitted call's ticket; exactly one verdict counts, later ones are ignored."""

    def mark_success(self) -> None:
        """The dependency answered."""

    def mark_failure(self) -> None:
        """The dependency failed (the middleware decided the status is a failure)."""

    def release(self) -> None:
        """No verdict: the call never reached the dependency, or was abandoned."""


class Breaker(Protocol):
    """A circuit breaker: admits or refuses calls and counts what admitted calls report."""

    def allow(self) -> Permit | None:
        """A permit for one call, or None when the breaker refuses it."""

    def retry_after(self) -> float:
        """Seconds until the breaker lets a probe through; 0 while it is probing."""


class _ClockedStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's in-memory storage that also notes the injected clock when the circuit opens."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(_CLOSED)
        self._clock = clock
        self.opened_clock = 0.0

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        # pybreaker's open() sets this, so the two clocks are stamped by the same transition.
        self._opened_at = value
        self.opened_clock = self._clock()


class _Permit:
    """A :class:`Permit` of :class:`PybreakerBreaker`."""

    __slots__ = ("_breaker", "_epoch", "_probe", "_spent")

    def __init__(self, breaker: PybreakerBreaker, epoch: int, probe: bool) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._probe = probe
        self._spent = False

    def _counts(self) -> bool:
        # A call admitted before the breaker last changed state reports on a past the breaker
        # has already judged: a slow call from before the trip must not close a half-open
        # breaker, nor take back a probe slot it never held.
        if self._spent:
            return False
        self._spent = True
        return self._epoch == self._breaker._epoch

    def mark_success(self) -> None:
        if self._counts():
            self._breaker._succeeded(self._probe)

    def mark_failure(self) -> None:
        if self._counts():
            self._breaker._failed(self._probe)

    def release(self) -> None:
        if self._counts() and self._probe:
            self._breaker._probing -= 1


class _Transitions(pybreaker.CircuitBreakerListener):
    """Hears pybreaker's state changes; the one place a :class:`PybreakerBreaker` learns of them."""

    def __init__(self, owner: PybreakerBreaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._owner._entered(old_state.name if old_state is not None else _CLOSED, new_state.name)


class PybreakerBreaker:
    """A :class:`Breaker` on pybreaker's closed / open / half-open state machine.

    Closed, every call is admitted and ``fail_max`` consecutive failures open the circuit. Open,
    every call is refused until ``reset_timeout`` has passed; the next call then half-opens it.
    Half-open, at most ``half_open_probes`` calls are in flight at once (the others are refused);
    ``success_threshold`` probe successes close it, one probe failure opens it again.

    Args:
        fail_max: consecutive failures that open the circuit.
        reset_timeout: seconds an open circuit refuses calls before probing.
        success_threshold: probe successes that close the circuit.
        half_open_probes: probes in flight at once while half-open.
        clock: a monotonic clock in seconds; a fake one in tests.
        on_change: called with ``(previous, state, failures)`` after each state change.
        name: names the breaker inside pybreaker.
    """

    def __init__(
        self,
        *,
        fail_max: int = 5,
        reset_timeout: float = 10.0,
        success_threshold: int = 1,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str, int], None] | None = None,
        name: str | None = None,
    ) -> None:
        if half_open_probes < 1:
            raise ValueError("half_open_probes must be >= 1")
        self._clock = clock
        self._storage = _ClockedStorage(clock)
        self._probes = half_open_probes
        self._probing = 0  # probes admitted in this half-open spell and not yet judged
        self._epoch = 0  # bumped by every state change; permits carry the one they began in
        self._state = _CLOSED
        self._on_change = on_change
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            listeners=[_Transitions(self)],
            state_storage=self._storage,
            name=name,
        )

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``; open turns half-open on the first call after
        ``reset_timeout``, so an idle breaker stays ``open`` until then."""
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted since the last success."""
        return self._storage.counter

    def allow(self) -> Permit | None:
        """A permit for one call, or None when the breaker refuses it."""
        state = self._state
        if state == _CLOSED:
            return _Permit(self, self._epoch, False)
        if state == _OPEN:
            if self._clock() < self._storage.opened_clock + self._cb.reset_timeout:
                return None
            self._cb.half_open()
        if self._probing >= self._probes:
            return None
        self._probing += 1
        return _Permit(self, self._epoch, True)

    def retry_after(self) -> float:
        """Seconds until the breaker lets a probe through; 0 while it is probing."""
        if self._state != _OPEN:
            return 0.0
        left = self._storage.opened_clock + self._cb.reset_timeout - self._clock()
        return max(0.0, left)

    # Verdicts, as pybreaker's own call() would count them: a success resets the run of
    # failures, a failure extends it, in any state.

    def _succeeded(self, probe: bool) -> None:
        storage = self._storage
        storage.reset_counter()
        if probe:
            self._probing -= 1
            storage.increment_success_counter()
            if storage.success_counter >= self._cb.success_threshold:
                self._cb.close()

    def _failed(self, probe: bool) -> None:
        self._storage.increment_counter()
        if probe:
            self._probing -= 1
            self._cb.open()
        elif self._storage.counter >= self._cb.fail_max:
            self._cb.open()

    def _entered(self, previous: str, state: str) -> None:
        # Called by pybreaker inside open() / half_open() / close(), after it reset the
        # counters the new state starts from.
        self._state = state
        self._epoch += 1
        self._probing = 0
        if self._on_change is not None:
            self._on_change(previous, state, self._storage.counter)


# --------------------------------------------------------------------------- the breakers


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """One state change of one method's breaker, as listeners receive it.

    Attributes:
        service: the dependency, as the middleware was told.
        method: ``package.Service/Method``.
        old: the state left: ``closed``, ``open`` or ``half-open``.
        new: the state entered.
        at: the breaker's clock (``time.monotonic()`` unless injected) when it happened.
    """

    service: str
    method: str
    old: str
    new: str
    at: float


#: Something to tell of state changes: metrics, tracing, tests.
BreakerListener = Callable[[BreakerEvent], None]


@dataclass(frozen=True, slots=True)
class _Guard:
    """What the middleware needs for one method: its breaker and what counts as failure."""

    method: str
    breaker: Breaker
    failure_codes: frozenset[str]


class Breakers:
    """The breakers of one dependency, one per method, each made on the method's first call.

    Methods whose policy has ``breaker.enabled`` false get none. Method names come from
    generated stubs, so the set stays as small as the dependency's API.

    Args:
        resolver: the dependency's per-method policies.
        service: the dependency's name, for logs and events.
        clock: a monotonic clock in seconds; a fake one in tests.
        listeners: called with a :class:`BreakerEvent` on every state change.
    """

    def __init__(
        self,
        resolver: PolicyResolver,
        *,
        service: str,
        clock: Callable[[], float] = time.monotonic,
        listeners: Sequence[BreakerListener] = (),
    ) -> None:
        self._resolver = resolver
        self._service = service
        self._clock = clock
        self._listeners = tuple(listeners)
        self._guards: dict[str, _Guard | None] = {}
        self._breakers: dict[str, PybreakerBreaker] = {}

    def get(self, method: str) -> PybreakerBreaker | None:
        """The breaker of ``package.Service/Method``, made now if needed; None when disabled."""
        guard = self._guard(MethodName.parse("/" + method.lstrip("/")))
        return None if guard is None else self._breakers[guard.method]

    def states(self) -> dict[str, str]:
        """A snapshot: ``package.Service/Method`` to ``closed``, ``open`` or ``half-open``."""
        return {method: b.state for method, b in self._breakers.items()}

    def _guard(self, method: MethodName) -> _Guard | None:
        """The guard of ``method`` for the middleware; None when its breaker is disabled."""
        try:
            return self._guards[method.full]
        except KeyError:
            pass
        name = method.path
        policy = self._resolver.policy(name).breaker
        guard: _Guard | None = None
        if policy.enabled:
            made = PybreakerBreaker(
                fail_max=policy.fail_max,
                reset_timeout=policy.reset_timeout_seconds,
                success_threshold=policy.success_threshold,
                half_open_probes=policy.half_open_probes,
                clock=self._clock,
                on_change=lambda old, new, failures: self._changed(name, old, new, failures),
                name=name,
            )
            self._breakers[name] = made
            guard = _Guard(name, made, frozenset(policy.failure_codes))
        self._guards[method.full] = guard
        return guard

    def _changed(self, method: str, old: str, new: str, failures: int) -> None:
        log = _log.warning if new == _OPEN else _log.info
        log(
            "circuit breaker state changed",
            dependency=self._service,
            rpc=method,
            state=new,
            previous=old,
            failures=failures,
        )
        event = BreakerEvent(self._service, method, old, new, self._clock())
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # an exporter's bug must not fail the call that tripped
                _log.error("breaker listener failed", rpc=method, exc_info=exc)


# --------------------------------------------------------------------------- the policy


def _judge(permit: Permit, err: RemoteError, failure_codes: frozenset[str]) -> None:
    if err.code.name in failure_codes:
        permit.mark_failure()
    else:
        permit.mark_success()  # the dependency answered, if only to say the request was wrong


def _refusal(guard: _Guard) -> BreakerOpen:
    wait = guard.breaker.retry_after()
    if wait > 0:
        message = f"circuit breaker open for {guard.method}; next probe in {wait:.1f} s"
    else:
        message = f"circuit breaker half-open for {guard.method}; probes in flight"
    return BreakerOpen(message, retry_after=wait)


class _JudgedStream:
    """A response stream whose first message, or failure before it, is the call's verdict.

    The verdict does not wait for the end: watches and subscriptions may stay open for hours,
    and a probe must not hold its slot that long. A class rather than an async generator, so a
    stream dropped before it was ever read still gives its permit back (``__del__``).
    """

    __slots__ = ("_codes", "_permit", "_stream")

    def __init__(self, stream: Any, permit: Permit, failure_codes: frozenset[str]) -> None:
        self._stream: AsyncIterator[Any] = stream.__aiter__()
        self._permit = permit
        self._codes = failure_codes

    def __aiter__(self) -> _JudgedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            message = await self._stream.__anext__()
        except StopAsyncIteration:
            self._permit.mark_success()  # an empty answer is still an answer
            raise
        except RemoteError as err:
            _judge(self._permit, err, self._codes)
            raise
        except BaseException:
            self._permit.release()
            raise
        self._permit.mark_success()  # counts once; later messages are no news
        return message

    async def aclose(self) -> None:
        """Stop reading: no verdict unless one was given already."""
        self._permit.release()
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

    def __del__(self) -> None:
        self._permit.release()


async def _call_unary(
    handler: Handler, request: Any, ctx: CallContext, guard: _Guard, permit: Permit
) -> Any:
    remaining = ctx.time_remaining()
    try:
        if remaining is None:
            response = await handler(request)
        else:
            timeout = asyncio.timeout(remaining + _TIMEOUT_MARGIN)
            try:
                async with timeout:
                    response = await handler(request)
            except TimeoutError:
                if not timeout.expired():
                    raise  # someone else's timeout, raised from below
                permit.mark_failure()
                raise DeadlineExceeded(
                    f"{guard.method} did not answer within its deadline"
                ) from None
    except RemoteError as err:
        _judge(permit, err, guard.failure_codes)
        raise
    except BaseException:
        # Raised locally or cancelled: the dependency was not judged. (After the timeout
        # above this is a no-op: the failure was already counted.)
        permit.release()
        raise
    permit.mark_success()
    return response


class BreakerMiddleware:
    """The breaker middleware; ``breakers`` holds the breakers it made, for inspection.

    Args:
        breakers: one breaker per method of the dependency.
    """

    def __init__(self, breakers: Breakers) -> None:
        self.breakers = breakers

    def __call__(self, handler: Handler) -> Handler:
        """Wrap ``handler`` so each call passes its method's breaker."""
        breakers = self.breakers

        async def guarded(request: Any) -> Any:
            ctx = current_call()
            if ctx is None:
                return await handler(request)
            guard = breakers._guard(ctx.method)
            if guard is None:
                return await handler(request)
            permit = guard.breaker.allow()
            if permit is None:
                raise _refusal(guard)
            if not ctx.response_streaming:
                return await _call_unary(handler, request, ctx, guard, permit)
            try:
                stream = await handler(request)
            except RemoteError as err:
                _judge(permit, err, guard.failure_codes)
                raise
            except BaseException:
                permit.release()
                raise
            return _JudgedStream(stream, permit, guard.failure_codes)

        return guarded


def breaker(
    resolver: PolicyResolver,
    *,
    service: str,
    clock: Callable[[], float] = time.monotonic,
    listeners: Sequence[BreakerListener] = (),
) -> BreakerMiddleware:
    """Build the circuit-breaker middleware of one dependency (see the module docstring).

    Args:
        resolver: the dependency's per-method policies (``ClientConfig.resolver(service)``);
            each method's ``breaker`` section configures its breaker.
        service: the dependency's name, for logs and events.
        clock: a monotonic clock in seconds for the breakers; a fake one in tests. Call
            deadlines are always measured on ``time.monotonic``.
        listeners: called with a :class:`BreakerEvent` on every state change of any of its
            breakers; an exception a listener raises is logged, never passed to the call.

    Returns:
        A client middleware; put it inside the deadline middleware and outside the limiter and
        retry, so a call is judged once, after its retries, and a refusal costs no token.

    Raises:
        BreakerOpen: (from the wrapped handler) the method's breaker is open, or half-open with
            every probe slot taken; nothing was sent.
        DeadlineExceeded: (from the wrapped handler) the call outlived its deadline by the
            breaker's margin; it counts as a failure.
    """
    return BreakerMiddleware(Breakers(resolver, service=service, clock=clock, listeners=listeners))
