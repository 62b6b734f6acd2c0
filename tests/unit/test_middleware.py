"""The middleware algebra: handlers, middleware and chain(), with no gRPC involved."""

from __future__ import annotations

from typing import Any

from tether import Handler, Middleware, chain


def tag(name: str, log: list[str]) -> Middleware:
    """A middleware that records entry and exit under ``name``."""

    def middleware(handler: Handler) -> Handler:
        async def tagged(request: Any) -> Any:
            log.append(f"{name}>")
            response = await handler(request)
            log.append(f"<{name}")
            return f"{name}({response})"

        return tagged

    return middleware


async def echo(request: Any) -> Any:
    return request


async def test_first_listed_is_outermost() -> None:
    """chain(a, b)(h) runs a before b on the way in and after it on the way out."""
    log: list[str] = []
    handler = chain(tag("a", log), tag("b", log))(echo)
    assert await handler("x") == "a(b(x))"
    assert log == ["a>", "b>", "<b", "<a"]


async def test_sequences_are_flattened() -> None:
    """A list of middlewares inside chain() composes as if spread out."""
    log: list[str] = []
    handler = chain([tag("a", log), tag("b", log)], tag("c", log))(echo)
    assert await handler("x") == "a(b(c(x)))"


async def test_empty_chain_is_identity() -> None:
    """chain() with nothing returns the handler unchanged."""
    assert chain()(echo) is echo


async def test_middleware_may_short_circuit() -> None:
    """A middleware can answer without calling the next handler."""
    called: list[Any] = []

    async def inner(request: Any) -> Any:
        called.append(request)
        return request

    def cache(handler: Handler) -> Handler:
        async def cached(request: Any) -> Any:
            return "cached"

        return cached

    assert await chain(cache)(inner)("x") == "cached"
    assert called == []


async def test_chain_is_built_once_and_reused() -> None:
    """Composition happens when chain() is applied, not per call."""
    builds: list[int] = []

    def counting(handler: Handler) -> Handler:
        builds.append(1)
        return handler

    handler = chain(counting)(echo)
    for i in range(3):
        assert await handler(i) == i
    assert builds == [1]
