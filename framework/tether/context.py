"""The immutable call context, carried in a contextvar so code deep inside a handler can read it."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import functools
import time
from collections.abc import Coroutine, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "CallContext",
    "Metadata",
    "MethodName",
    "Side",
    "current_call",
    "detached_task",
    "use_call",
]

#: gRPC metadata as it travels: an ordered sequence of (key, value) pairs; keys are lowercase,
#: values are ``str``, or ``bytes`` for keys ending in ``-bin``.
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class MethodName:
    """A full gRPC method name, parsed once: ``/pkg.v1.Service/Method``."""

    full: str
    package: str
    service: str
    method: str
    #: The service with its package, as protos and health checks name it: ``pkg.v1.Service``.
    qualified_service: str = field(init=False, repr=False, compare=False)
    #: ``pkg.v1.Service/Method``: how configuration, fallbacks and metrics name the method.
    path: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once per method (parse is cached), not by every middleware on every call.
        qualified = f"{self.package}.{self.service}" if self.package else self.service
        object.__setattr__(self, "qualified_service", qualified)
        object.__setattr__(self, "path", f"{qualified}/{self.method}")

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def parse(full: str) -> MethodName:
        """Parse ``/pkg.Service/Method``; a malformed name keeps what it has rather than raising.

        Method names arrive from the network on the server side, so parsing must not fail: an
        unparseable name yields an empty package and service with the whole text as method.
        """
        path = full[1:] if full.startswith("/") else full
        qualified, sep, method = path.rpartition("/")
        if not sep or not qualified or not method:
            return MethodName(full=full, package="", service="", method=path)
        package, _, service = qualified.rpartition(".")
        return MethodName(full=full, package=package, service=service, method=method)

    def __str__(self) -> str:
        return self.full


class Side(enum.Enum):
    """Which end of the call this process is."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class CallContext:
    """What is known about one RPC, on either side; replace fields with :meth:`replace`.

    Attributes:
        method: the parsed method name.
        side: ``Side.SERVER`` for an inbound call, ``Side.CLIENT`` for an outbound one.
        metadata: inbound metadata on the server side, outbound metadata on the client side.
        deadline: absolute ``time.monotonic()`` value by which the call must finish, or None.
        peer: the other end (``ipv4:127.0.0.1:5555``) on the server side; the target on the client.
        request_streaming: the request is a stream of messages (an async iterator).
        response_streaming: the response is a stream of messages (an async iterator).
        parent: the inbound call this outbound call is made on behalf of, if any.
        transport_deadline: the deadline the transport enforces by itself (grpc cancels a
            served call at the deadline its caller sent); None when nothing does.
    """

    method: MethodName
    side: Side
    metadata: Metadata = ()
    deadline: float | None = None
    peer: str | None = None
    request_streaming: bool = False
    response_streaming: bool = False
    parent: CallContext | None = None
    transport_deadline: float | None = None

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (negative once it passed), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def header(self, key: str) -> str | bytes | None:
        """The first metadata value under ``key`` (case-insensitive), or None."""
        key = key.lower()
        for k, v in self.metadata:
            if k == key:
                return v
        return None

    def with_metadata(self, pairs: Sequence[tuple[str, str | bytes]]) -> CallContext:
        """A copy whose metadata has ``pairs`` appended (for outbound propagation)."""
        return dataclasses.replace(self, metadata=(*self.metadata, *pairs))

    def replace(self, **changes: object) -> CallContext:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_current: ContextVar[CallContext | None] = ContextVar("tether_call", default=None)


def current_call() -> CallContext | None:
    """The call being served or made in this task, or None outside any call."""
    return _current.get()


class use_call:  # noqa: N801 - used as a function: ``with use_call(ctx):``
    """Make ``ctx`` the current call for the body of the ``with`` block.

    A middleware that changes the context (adds metadata, tightens the deadline) binds the new
    value around its call to the next handler, so everything inside sees it. A class, not a
    generator-based context manager: it runs on every call's path, several times.
    """

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: CallContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> CallContext:
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


_T = TypeVar("_T")


def detached_task(coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
    """Start a background task in an empty context: no call, no trace, no bound log fields.

    Framework loops (discovery, connections, registration) may be started lazily by the first
    call that needs them; a plain ``create_task`` would copy that call's context, and every
    line the loop logs afterwards would claim to belong to that call.
    """
    return asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())
