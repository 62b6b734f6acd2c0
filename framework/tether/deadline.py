"""Deadline middleware for both sides: every call has one, and nothing runs past it; no gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tether.config_policies import PolicyResolver
from tether.context import current_call, use_call
from tether.errors import DeadlineExceeded, InvalidArgument
from tether.middleware import Handler, Middleware

__all__ = ["MAX_TIMEOUT_SECONDS", "bound_deadline", "enforce_deadline"]

#: Longest deadline a call is given, in seconds from now (about three years): a caller's longer
#: timeout, ``float("inf")`` included, is cut to it. grpc fails a call whose deadline it cannot
#: represent (10**10 s away already) at once with DEADLINE_EXCEEDED, which the breaker would
#: count against a dependency that never saw the call.
MAX_TIMEOUT_SECONDS = 1e8


# --------------------------------------------------------------------------- client side


def bound_deadline(
    resolver: PolicyResolver,
    *,
    margin: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> Middleware:
    """Client middleware: every call gets a deadline, never later than the inbound call's.

    A call the caller gave no timeout gets its method's ``timeout_seconds`` (response streams
    excepted: they are often open-ended). Inside a server handler, the outbound deadline is at
    most the inbound one minus ``margin``, so the answer can still travel back in time. A
    call whose deadline has already passed is refused locally and never sent; one further
    away than :data:`MAX_TIMEOUT_SECONDS` is cut to that, and a NaN timeout is refused
    locally with INVALID_ARGUMENT.

    Args:
        resolver: the dependency's policies (per-method timeouts).
        margin: seconds kept back from the inbound deadline.
        clock: ``time.monotonic`` or a fake; deadlines are on this clock.

    Returns:
        The outermost middleware of the client chain.
    """

    def middleware(handler: Handler) -> Handler:
        async def bounded(request: Any) -> Any:
            ctx = current_call()
            if ctx is None:
                return await handler(request)
            now = clock()
            deadline = ctx.deadline
            if deadline is not None and deadline != deadline:  # NaN: not a number of seconds
                raise InvalidArgument(f"the timeout of {ctx.method.full} is not a number")
            if deadline is None and not ctx.response_streaming:
                deadline = now + resolver.policy(ctx.method.path).timeout_seconds
            parent = ctx.parent
            inherited = parent is not None and parent.deadline is not None
            if parent is not None and parent.deadline is not None:
                cap = parent.deadline - margin
                deadline = cap if deadline is None else min(deadline, cap)
            if deadline is not None and deadline <= now:
                where = " (the inbound call's deadline is spent)" if inherited else ""
                raise DeadlineExceeded(f"deadline passed before {ctx.method.full} was sent{where}")
            if deadline is not None and deadline - now > MAX_TIMEOUT_SECONDS:
                deadline = now + MAX_TIMEOUT_SECONDS
            if deadline == ctx.deadline:
                return await handler(request)
            with use_call(ctx.replace(deadline=deadline)):
                return await handler(request)

        return bounded

    return middleware


# --------------------------------------------------------------------------- server side


def enforce_deadline(handler: Handler) -> Handler:
    """Server middleware: refuse a call whose deadline passed, cancel one that outlives it.

    A call whose deadline (``CallContext.deadline``, ``time.monotonic`` based) has already
    passed when it reaches this middleware is not run: nobody is waiting for its answer, and
    running it would only take capacity from calls that can still succeed. A unary-response
    handler still running at the deadline is cancelled (it sees ``asyncio.CancelledError``)
    and the call answers ``DEADLINE_EXCEEDED``; the deadline read here is the one the chain
    carries, so one an outer middleware tightened is enforced as well. When it is the
    transport's own (``CallContext.transport_deadline``), grpc cancels the handler at it and
    this middleware arms no timer of its own.

    Stream-response calls get the arrival check only. Their handler returns at once and the
    work happens while the stream is read, where a timeout would have to span the generator's
    yields; grpc cancels a stream at its deadline itself, and that reaches the servicer the
    same way.

    Raises:
        DeadlineExceeded: the deadline passed before the call started or while it ran.
    """

    async def enforced(request: Any) -> Any:
        call = current_call()
        if call is None or call.deadline is None:
            return await handler(request)
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before the call started; it was not run")
        if call.response_streaming:
            return await handler(request)
        transport = call.transport_deadline
        if transport is not None and call.deadline >= transport:
            # grpc cancels the handler at this deadline itself: a timer here would only cost
            # (about 5 µs a call). One a middleware tightened still gets the timer below.
            return await handler(request)
        timeout = asyncio.timeout(remaining)
        try:
            async with timeout:
                return await handler(request)
        except TimeoutError:
            if not timeout.expired():
                raise  # the handler's own timeout (an outbound call, say), not this deadline
            raise DeadlineExceeded("deadline exceeded while the call ran; cancelled") from None

    return enforced
