"""The outermost server middleware: unexpected exceptions become INTERNAL, logged in full here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tether.context import current_call
from tether.errors import Internal, RemoteError, StatusError, Unimplemented
from tether.log import get_logger
from tether.middleware import Handler

__all__ = ["recover"]

_log = get_logger("tether.recovery")

#: What the caller reads when a handler fails unexpectedly: nothing about why.
GENERIC_MESSAGE = "internal error"


#: A dependency's answers that describe this service's own credentials, not the caller's
#: request: passing them on would blame the caller.
_NOT_PASSED_ON = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def _translate(exc: Exception) -> StatusError:
    """Map an exception that escaped a handler to the status the caller gets."""
    if isinstance(exc, grpc.aio.AioRpcError):
        # A call to a dependency failed and the handler let it go: the caller gets the
        # dependency's status (UNAVAILABLE, DEADLINE_EXCEEDED, FAILED_PRECONDITION...) and
        # message, as the client chain left them after retries and fallbacks.
        code = exc.code()
        _log.warning("dependency call failed", code=code.name, details=(exc.details() or "")[:200])
        if code in _NOT_PASSED_ON or code is grpc.StatusCode.OK:
            return Internal(GENERIC_MESSAGE)
        return RemoteError(code, exc.details() or "")
    if isinstance(exc, NotImplementedError):
        # The servicer base classes grpcio-tools generates raise it for methods left out.
        return Unimplemented("method not implemented")
    _log.error("handler raised", exc_info=exc, error_type=type(exc).__name__)
    return Internal(GENERIC_MESSAGE)


async def _guard_stream(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for item in stream:
            yield item
    except (StatusError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise _translate(exc) from None


def recover(handler: Handler) -> Handler:
    """Middleware: let status errors through, turn anything else into ``INTERNAL``.

    The full exception is logged server-side with the call's context; the caller gets a
    generic message and no traceback. ``NotImplementedError`` becomes ``UNIMPLEMENTED``. A
    dependency's failure the handler did not catch (``grpc.aio.AioRpcError`` from an outbound
    call) passes on with its code and message, except UNAUTHENTICATED and PERMISSION_DENIED
    (this service's credentials, not the caller's), which become ``INTERNAL``.
    Cancellation passes untouched. For a stream response, errors raised while streaming are
    handled the same way.
    """

    async def recovered(request: Any) -> Any:
        try:
            response = await handler(request)
        except (StatusError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _translate(exc) from None
        call = current_call()
        if call is not None and call.response_streaming:
            return _guard_stream(response)
        return response

    return recovered
