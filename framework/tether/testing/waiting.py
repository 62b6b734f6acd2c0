"""Bounded waiting for tests: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["eventually"]

T = TypeVar("T")


@overload
async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float, message: str, interval: float = 0.01
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T], *, within: float, message: str, interval: float = 0.01
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    within: float,
    message: str,
    interval: float = 0.01,
) -> Any:
    """Call ``check`` until it returns something truthy, and return that.

    Args:
        check: a function or coroutine function; an exception it raises counts as "not yet".
        within: seconds to keep trying.
        message: what was expected, for the failure message.
        interval: seconds between tries.

    Raises:
        AssertionError: ``check`` was still falsy (or raising) after ``within`` seconds; the message
            has the last value or exception.
    """
    deadline = time.monotonic() + within
    last: object = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last = result
        except Exception as exc:  # a condition that cannot be evaluated yet is "not yet"
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message}: not true after {within:g} s (last: {last!r})")
        await asyncio.sleep(interval)
