"""The client deadline middleware: defaults per method, inherited inbound deadlines, refusal."""

from __future__ import annotations

from typing import Any

import pytest

from tether.config import ClientConfig
from tether.context import CallContext, MethodName, Side, current_call, use_call
from tether.deadline import bound_deadline
from tether.errors import DeadlineExceeded

NOW = 1000.0
METHOD = MethodName.parse("/users.v1.Users/GetUser")


def call(
    deadline: float | None = None, parent: CallContext | None = None, *, stream: bool = False
) -> CallContext:
    return CallContext(
        method=METHOD, side=Side.CLIENT, metadata=(), deadline=deadline, peer=None,
        request_streaming=False, response_streaming=stream, parent=parent,
    )  # fmt: skip


def inbound(deadline: float | None) -> CallContext:
    return CallContext(
        method=MethodName.parse("/front.v1.Front/Get"), side=Side.SERVER, metadata=(),
        deadline=deadline, peer=None, request_streaming=False, response_streaming=False,
        parent=None,
    )  # fmt: skip


async def deadline_sent(ctx: CallContext, config: ClientConfig | None = None) -> float | None:
    """Run the middleware around a handler that reports the deadline it was given."""
    config = config or ClientConfig(timeout_seconds=5)
    middleware = bound_deadline(config.resolver("users"), margin=0.05, clock=lambda: NOW)

    async def handler(request: Any) -> Any:
        seen = current_call()
        assert seen is not None
        return seen.deadline

    with use_call(ctx):
        return await middleware(handler)(None)  # type: ignore[no-any-return]


async def test_a_call_without_timeout_gets_the_default() -> None:
    """No caller timeout: client.timeout_seconds from now."""
    assert await deadline_sent(call()) == NOW + 5


async def test_per_method_default_wins_over_the_service_and_client_defaults() -> None:
    """client.services.<name>.methods overrides the service and client timeouts."""
    config = ClientConfig(
        timeout_seconds=5,
        services={
            "users": {
                "timeout_seconds": 2,
                "methods": {"users.v1.Users/GetUser": {"timeout_seconds": 0.3}},
            }
        },
    )
    assert await deadline_sent(call(), config) == pytest.approx(NOW + 0.3)


async def test_caller_timeout_is_kept() -> None:
    """A timeout the caller gave is not replaced by the default."""
    assert await deadline_sent(call(NOW + 60)) == NOW + 60


async def test_inbound_deadline_caps_the_outbound_one_minus_margin() -> None:
    """Inside a handler, the outbound deadline never exceeds the inbound one minus the margin."""
    parent = inbound(NOW + 1)
    assert await deadline_sent(call(parent=parent)) == pytest.approx(NOW + 0.95)
    assert await deadline_sent(call(NOW + 60, parent=parent)) == pytest.approx(NOW + 0.95)
    assert await deadline_sent(call(NOW + 0.5, parent=parent)) == NOW + 0.5


async def test_response_streams_get_no_default_but_inherit() -> None:
    """Open-ended streams get no invented deadline, but never outlive the inbound call."""
    assert await deadline_sent(call(stream=True)) is None
    assert await deadline_sent(call(stream=True, parent=inbound(NOW + 2))) == pytest.approx(
        NOW + 1.95
    )


async def test_spent_deadline_is_refused_before_sending() -> None:
    """A deadline already passed (or eaten by the margin) is DEADLINE_EXCEEDED, nothing sent."""
    with pytest.raises(DeadlineExceeded, match=r"before /users\.v1\.Users/GetUser was sent"):
        await deadline_sent(call(NOW - 1))
    with pytest.raises(DeadlineExceeded, match="inbound call's deadline is spent"):
        await deadline_sent(call(parent=inbound(NOW + 0.01)))
