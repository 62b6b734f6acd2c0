"""Governed outbound channels: a ``grpc.aio`` channel whose every call runs the client chain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from tether.config import ClientConfig
from tether.interceptors import ChainClientInterceptor
from tether.middleware import Middleware

__all__ = ["default_client_middleware", "dial"]


def default_client_middleware(config: ClientConfig) -> list[Middleware]:
    """The client chain every outbound call runs, outermost first.

    This literal list is the one place the order is decided. It is empty until the governance
    middleware (deadline, breaker, limiter, retry budget, fallback) is configured from ``config``.
    """
    del config
    return []


def dial(
    target: str,
    *,
    config: ClientConfig | None = None,
    middleware: Sequence[Middleware] | None = None,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """Open a channel to ``target`` (``host:port``) whose calls go through the client chain.

    Args:
        target: the address to dial.
        config: client defaults; ``ClientConfig()`` if omitted.
        middleware: the client chain; :func:`default_client_middleware` if omitted.
        options: extra gRPC channel options.
        credentials: TLS credentials; an insecure channel if omitted.

    Returns:
        A ``grpc.aio.Channel``; use it as an async context manager or ``await channel.close()``.
    """
    chain = (
        default_client_middleware(config or ClientConfig()) if middleware is None else middleware
    )
    interceptors = ChainClientInterceptor(chain, target=target).interceptors()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, credentials, options=list(options), interceptors=interceptors
    )
