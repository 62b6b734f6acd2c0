"""The middleware algebra: a handler maps a request to a response; a middleware wraps a handler.

This module knows nothing of gRPC. The same contract serves the server side (an inbound call
travelling toward the servicer) and the client side (an outbound call travelling toward the
network). Per-call facts (method, metadata, deadline, side) come from
:func:`tether.context.current_call`, not from extra arguments.

For a stream request the request is an async iterator of messages; for a stream response the
handler returns an async iterator of messages. A middleware that must see every message of a
stream wraps that iterator.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

__all__ = ["Handler", "Middleware", "chain"]

#: An async callable from request to response. ``Any`` because requests and responses are the
#: protobuf messages (or streams of them) of whichever method is being called.
Handler: TypeAlias = Callable[[Any], Awaitable[Any]]

#: A function that wraps a handler and returns the wrapped handler.
Middleware: TypeAlias = Callable[[Handler], Handler]


def chain(*middlewares: Middleware | Sequence[Middleware]) -> Middleware:
    """Compose middlewares into one; the first listed is the outermost.

    ``chain(a, b)(h)`` is ``a(b(h))``: a request meets ``a`` first, the response meets ``a``
    last. Sequences are flattened, so ``chain(defaults, extra)`` works.
    """
    flat: list[Middleware] = []
    for item in middlewares:
        if callable(item):
            flat.append(item)
        else:
            flat.extend(item)

    def compose(handler: Handler) -> Handler:
        for middleware in reversed(flat):
            handler = middleware(handler)
        return handler

    return compose
