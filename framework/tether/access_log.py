"""The access log of the server chain: one line per served call, and a warning for slow ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tether.config import LoggingConfig
from tether.context import CallContext, current_call
from tether.errors import StatusError
from tether.log import get_logger
from tether.middleware import Handler, Middleware

__all__ = ["log_calls"]

_log = get_logger("tether.access")


def log_calls(config: LoggingConfig, *, clock: Callable[[], float] = time.monotonic) -> Middleware:
    """Build the access-log middleware from ``logging.access_log`` and ``slow_call_seconds``.

    Each line has the method, the status code, the duration in milliseconds and the peer, and
    (through the log processors) the call's context; never the request or its metadata. With
    neither setting on, the middleware is not in the chain at all.

    Args:
        config: the logging section.
        clock: a monotonic clock; injectable for tests.

    Returns:
        A server middleware; put it outside ``recover``, so a crash is logged as INTERNAL.
    """
    every = config.access_log
    slow = config.slow_call_seconds

    def finish(call: CallContext, started: float, code: str) -> None:
        seconds = clock() - started
        is_slow = slow is not None and seconds > slow
        if not (every or is_slow):
            return
        fields = {
            "code": code,
            "duration_ms": round(seconds * 1000, 3),
            "peer": call.peer,
        }
        if is_slow:
            _log.warning("slow call", threshold_ms=round((slow or 0) * 1000, 3), **fields)
        else:
            _log.info("call", **fields)

    def middleware(handler: Handler) -> Handler:
        if not every and slow is None:
            return handler

        async def logged(request: Any) -> Any:
            call = current_call()
            if call is None:
                return await handler(request)
            started = clock()
            try:
                response = await handler(request)
            except StatusError as err:
                finish(call, started, err.code.name)
                raise
            except asyncio.CancelledError:
                finish(call, started, "CANCELLED")
                raise
            except Exception:
                finish(call, started, "UNKNOWN")
                raise
            if not call.response_streaming:
                finish(call, started, "OK")
                return response
            return _timed_stream(response, lambda code: finish(call, started, code))

        return logged

    return middleware


async def _timed_stream(stream: Any, done: Callable[[str], None]) -> AsyncIterator[Any]:
    """Pass a response stream through and report its outcome once it ends."""
    code = "OK"
    try:
        async for item in stream:
            yield item
    except StatusError as err:
        code = err.code.name
        raise
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"
        raise
    except Exception:
        code = "UNKNOWN"
        raise
    finally:
        done(code)
