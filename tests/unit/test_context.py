"""The call context: method parsing, metadata lookup, deadline arithmetic, contextvar binding."""

from __future__ import annotations

import asyncio
import time

import pytest

from tether import CallContext, MethodName, Side, current_call, use_call


def make(**changes: object) -> CallContext:
    base = CallContext(method=MethodName.parse("/shop.v1.Orders/Place"), side=Side.SERVER)
    return base.replace(**changes)


def test_method_name_parsed_into_parts() -> None:
    """A full method name splits into package, service and method."""
    name = MethodName.parse("/shop.orders.v1.Orders/Place")
    assert (name.package, name.service, name.method) == ("shop.orders.v1", "Orders", "Place")
    assert name.qualified_service == "shop.orders.v1.Orders"
    assert str(name) == "/shop.orders.v1.Orders/Place"


def test_method_without_package() -> None:
    """A service with no package keeps an empty package."""
    name = MethodName.parse("/Orders/Place")
    assert (name.package, name.service, name.method) == ("", "Orders", "Place")
    assert name.qualified_service == "Orders"


@pytest.mark.parametrize("junk", ["", "/", "nothing", "//", "/a/", "/%%%/\x00"])
def test_malformed_method_name_never_raises(junk: str) -> None:
    """Names from the network that do not parse keep their text and never raise."""
    name = MethodName.parse(junk)
    assert name.full == junk


def test_method_name_parse_is_cached() -> None:
    """The same name parses to the same object (parsed once per method)."""
    assert MethodName.parse("/a.B/C") is MethodName.parse("/a.B/C")


def test_header_is_case_insensitive_first_value() -> None:
    """header() returns the first value under a key, ignoring case of the query."""
    ctx = make(metadata=(("x-user", "ada"), ("x-user", "bob"), ("k-bin", b"\x00")))
    assert ctx.header("X-User") == "ada"
    assert ctx.header("k-bin") == b"\x00"
    assert ctx.header("missing") is None


def test_with_metadata_appends_without_mutating() -> None:
    """with_metadata() returns a new context; the old one is unchanged."""
    ctx = make(metadata=(("a", "1"),))
    new = ctx.with_metadata([("b", "2")])
    assert new.metadata == (("a", "1"), ("b", "2"))
    assert ctx.metadata == (("a", "1"),)


def test_context_is_immutable() -> None:
    """Fields cannot be assigned."""
    ctx = make()
    with pytest.raises(AttributeError):
        ctx.peer = "x"  # type: ignore[misc]


def test_time_remaining() -> None:
    """time_remaining() counts down to the deadline and is None without one."""
    assert make().time_remaining() is None
    remaining = make(deadline=time.monotonic() + 10).time_remaining()
    assert remaining is not None and 9 < remaining <= 10
    expired = make(deadline=time.monotonic() - 1).time_remaining()
    assert expired is not None and expired < 0


def test_use_call_binds_and_restores() -> None:
    """use_call() makes a context current for its block and restores the previous one."""
    outer, inner = make(peer="outer"), make(peer="inner")
    assert current_call() is None
    with use_call(outer):
        assert current_call() is outer
        with use_call(inner):
            assert current_call() is inner
        assert current_call() is outer
    assert current_call() is None


async def test_context_follows_tasks_created_inside() -> None:
    """A task created while a call is bound sees that call."""
    ctx = make(peer="p")

    async def child() -> CallContext | None:
        await asyncio.sleep(0)
        return current_call()

    with use_call(ctx):
        task = asyncio.create_task(child())
    assert await task is ctx


async def test_context_follows_to_thread() -> None:
    """asyncio.to_thread copies the context, so the call is visible in the worker thread."""
    ctx = make(peer="p")
    with use_call(ctx):
        seen = await asyncio.to_thread(current_call)
    assert seen is ctx
