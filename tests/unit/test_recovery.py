"""The recovery middleware, driven directly with a bound call context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

import tether
from tether import CallContext, MethodName, Side, recover, use_call

UNARY = CallContext(method=MethodName.parse("/a.v1.S/M"), side=Side.SERVER)
STREAM = UNARY.replace(response_streaming=True)


async def fails(request: Any) -> Any:
    raise KeyError("db password is hunter2")


async def test_unexpected_becomes_internal_and_is_logged() -> None:
    """An unexpected exception becomes Internal('internal error'), logged with its call."""
    with capture_logs() as logs, use_call(UNARY), pytest.raises(tether.Internal) as err:
        await recover(fails)(None)
    assert err.value.message == "internal error"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    [entry] = logs
    assert entry["event"] == "handler raised"
    assert entry["error_type"] == "KeyError"
    assert isinstance(entry["exc_info"], KeyError)


async def test_status_errors_pass_untouched() -> None:
    """A StatusError keeps its class and message and is not logged as a crash."""

    async def not_found(request: Any) -> Any:
        raise tether.NotFound("no order 7")

    with (
        capture_logs() as logs,
        use_call(UNARY),
        pytest.raises(tether.NotFound, match="no order 7"),
    ):
        await recover(not_found)(None)
    assert logs == []


async def test_cancellation_passes_untouched() -> None:
    """Cancellation is not an error to recover from."""

    async def cancelled(request: Any) -> Any:
        raise asyncio.CancelledError

    with use_call(UNARY), pytest.raises(asyncio.CancelledError):
        await recover(cancelled)(None)


async def test_not_implemented_becomes_unimplemented() -> None:
    """NotImplementedError (from generated base servicers) becomes UNIMPLEMENTED."""

    async def missing(request: Any) -> Any:
        raise NotImplementedError("Method not implemented!")

    with use_call(UNARY), pytest.raises(tether.Unimplemented):
        await recover(missing)(None)


async def test_stream_failure_midway_becomes_internal() -> None:
    """A stream that fails after some items yields them, then raises Internal."""

    async def items() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("boom")

    async def streaming(request: Any) -> Any:
        return items()

    got: list[int] = []
    with capture_logs() as logs, use_call(STREAM):
        stream = await recover(streaming)(None)
        with pytest.raises(tether.Internal):
            async for item in stream:
                got.append(item)
    assert got == [1]
    assert [e["event"] for e in logs] == ["handler raised"]


async def test_success_returns_response() -> None:
    """A handler that succeeds is returned as is."""

    async def ok(request: Any) -> Any:
        return request * 2

    with use_call(UNARY):
        assert await recover(ok)(21) == 42


def _dependency_failed(code: grpc.StatusCode, details: str) -> Any:
    async def handler(request: Any) -> Any:
        # What an outbound call through tether (or plain grpc.aio) raises in a handler.
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    return handler


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    ],
)
async def test_a_dependencys_failure_passes_on_with_its_code(code: grpc.StatusCode) -> None:
    """An outbound call's error the handler let go keeps its code and message, and is logged
    as a dependency failure rather than a crash."""
    with capture_logs() as logs, use_call(UNARY), pytest.raises(tether.StatusError) as err:
        await recover(_dependency_failed(code, "only 2 left"))(None)
    assert (err.value.code, err.value.message) == (code, "only 2 left")
    assert [entry["event"] for entry in logs] == ["dependency call failed"]


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED]
)
async def test_a_dependency_refusing_our_credentials_is_internal(code: grpc.StatusCode) -> None:
    """The caller is not to blame for this service's credentials: INTERNAL, generic message."""
    with use_call(UNARY), pytest.raises(tether.Internal) as err:
        await recover(_dependency_failed(code, "token expired for svc-a"))(None)
    assert err.value.message == "internal error"
