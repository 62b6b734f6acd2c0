"""Governed outbound channels: every call runs the client chain and is balanced over instances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from tether.channel import Channel
from tether.config import ClientConfig
from tether.middleware import Middleware
from tether.registry.base import Discovery
from tether.retry import retry

__all__ = ["default_client_middleware", "dial"]


def default_client_middleware(config: ClientConfig) -> list[Middleware]:
    """The client chain every outbound call runs, outermost first.

    This literal list is the one place the order is decided. The finished order is: deadline,
    circuit breaker, rate limiter, retry (with its budget), then the load-balancing terminal
    that :class:`~tether.channel.Channel` adds below the chain. Retry sits right above the
    terminal so that each attempt is balanced afresh and goes to another instance.

    Args:
        config: the client section of the service configuration.

    Returns:
        A new list; callers may extend it.
    """
    return [
        retry(config.retry, idempotent_methods=config.idempotent_methods),
    ]


def dial(
    target: str,
    *,
    discovery: Discovery | None = None,
    config: ClientConfig | None = None,
    middleware: Sequence[Middleware] | None = None,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> Channel:
    """Open a governed channel; its calls run the client chain, then go to a balanced instance.

    Args:
        target: ``host:port``; ``h1:p1,h2:p2`` for a fixed set of instances; or
            ``discovery:///name`` to follow the instances of service ``name`` in ``discovery``.
        discovery: the registry to look ``discovery:///`` targets up in.
        config: client settings (default deadline, balancer, retries); ``ClientConfig()`` if
            omitted.
        middleware: the client chain; :func:`default_client_middleware` if omitted.
        options: extra gRPC channel options for every connection.
        credentials: TLS credentials; insecure connections if omitted.

    Returns:
        A :class:`~tether.channel.Channel`, usable wherever generated stubs take a
        ``grpc.aio.Channel``; use it as an async context manager or ``await channel.close()``.

    Raises:
        ValueError: the target is empty, or is ``discovery:///`` without ``discovery``.
    """
    cfg = config or ClientConfig()
    chain = default_client_middleware(cfg) if middleware is None else middleware
    return Channel(
        target,
        discovery=discovery,
        config=cfg,
        middleware=chain,
        options=options,
        credentials=credentials,
    )
