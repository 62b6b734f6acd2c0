"""Governed outbound channels: every call runs the client chain and is balanced over instances."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from tether.breaker import BreakerListener, breaker
from tether.channel import DISCOVERY_SCHEME, Channel
from tether.config import ClientConfig
from tether.deadline import bound_deadline
from tether.fallback import FallbackListener, Fallbacks, fallback
from tether.limiter import rate_limit
from tether.metrics import Metrics, observe_client
from tether.middleware import Middleware
from tether.registry.base import Discovery
from tether.retry import RetryHook, retry
from tether.tls import client_tls
from tether.tracing import SpanEvents, Tracing, trace_client

__all__ = ["default_client_middleware", "dial"]

#: The dependency name of a fixed-address channel dialled without ``service=``, in logs,
#: breaker events and metric labels.
_FIXED_ADDRESS = "(fixed address)"


def default_client_middleware(
    config: ClientConfig,
    service: str | None = None,
    fallbacks: Fallbacks | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> list[Middleware]:
    """The client chain every outbound call runs, outermost first.

    This literal list is the one place the order is decided. With ``metrics``,
    ``observe_client`` comes first, so it counts and times each call as its caller sees it
    (retries included, a fallback's answer as OK). ``trace_client`` comes next: one CLIENT
    span per call, whose context goes out in the call's metadata (with tracing off, the
    current context still goes out). The steps below report to ``metrics`` through their
    listeners and hooks, and put events on the span (:class:`~tether.tracing.SpanEvents`):

    1. ``bound_deadline``: every call gets a deadline (per-method default; never beyond the
       inbound call's, minus a margin); a spent one is refused before anything else runs.
    2. ``fallback``: a method with a declared fallback (code, or ``(tether.v1.fallback)`` in
       the proto) answers with it when the breaker or limiter refuses, or the call fails with
       one of its ``fallback_codes``; the call is marked degraded.
    3. ``breaker``: one circuit breaker per method; an open one fails fast locally.
    4. ``rate_limit``: one token bucket for the dependency; each call takes one token, however
       many attempts it makes.
    5. ``retry``: gRFC A6 retries with a budget, each attempt balanced afresh by the terminal
       that :class:`~tether.channel.Channel` adds below the chain.

    Args:
        config: the client section of the service configuration.
        service: the dependency's name, whose ``client.services`` overrides apply.
        fallbacks: code fallbacks (an App's ``app.fallbacks``); fallbacks declared in the
            proto apply either way.
        metrics: where to record calls, breaker changes, limiter refusals, retries and
            fallbacks of this dependency; no metrics if None.
        tracing: the spans' pipeline (an App's ``app.tracing``); propagation only if None.

    Returns:
        A new list; callers may extend it.
    """
    policies = config.resolver(service)
    name = service or _FIXED_ADDRESS
    m = metrics
    traced = tracing if tracing is not None else Tracing()
    on_breaker: list[BreakerListener] = []
    on_fallback: list[FallbackListener] = []
    on_reject: list[Callable[[], None]] = []
    on_retry: list[RetryHook] = []
    if traced.enabled:
        on_breaker.append(SpanEvents.breaker)
        on_fallback.append(SpanEvents.fallback)
        on_reject.append(SpanEvents.rejected)
        on_retry.append(SpanEvents.retried)
    if m is not None:
        on_breaker.append(m.observe_breaker)
        on_fallback.append(m.observe_fallback)
        on_reject.append(m.rejection_counter(name))
        on_retry.append(m.retry_counter(name))
    return [
        *([] if m is None else [observe_client(m, target=name)]),
        trace_client(traced, target=service),
        bound_deadline(policies, margin=config.deadline_margin_seconds),
        fallback(
            policies,
            fallbacks or Fallbacks(),
            service=name,
            listeners=on_fallback,
        ),
        breaker(policies, service=name, listeners=on_breaker),
        rate_limit(policies.limiter, service=name, on_reject=_all(on_reject)),
        retry(
            config.retry,
            policies=policies,
            idempotent_methods=config.idempotent_methods,
            on_retry=_all(on_retry),
        ),
    ]


def _all(hooks: Sequence[Callable[..., None]]) -> Callable[..., None] | None:
    """One hook calling each of ``hooks`` in order; None when there are none."""
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def every(*args: Any) -> None:
        for hook in hooks:
            hook(*args)

    return every


def dial(
    target: str,
    *,
    service: str | None = None,
    discovery: Discovery | None = None,
    config: ClientConfig | None = None,
    middleware: Sequence[Middleware] | None = None,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    fallbacks: Fallbacks | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Channel:
    """Open a governed channel; its calls run the client chain, then go to a balanced instance.

    Args:
        target: ``host:port``; ``h1:p1,h2:p2`` for a fixed set of instances; or
            ``discovery:///name`` to follow the instances of service ``name`` in ``discovery``.
        service: the name whose ``client.services`` overrides apply; by default the service
            of a ``discovery:///name`` target, none for a fixed address.
        discovery: the registry to look ``discovery:///`` targets up in.
        config: client settings (default deadline, balancer, retries); ``ClientConfig()`` if
            omitted.
        middleware: the client chain; :func:`default_client_middleware` if omitted.
        options: extra gRPC channel options for every connection.
        credentials: TLS credentials; if omitted, ``config.tls_for(service)`` decides
            (``client.tls`` and the dependency's override, files read now), else plaintext.
        fallbacks: code fallbacks for the default chain (proto-declared ones always apply).
        metrics: records the default chain's calls and governance (see
            :func:`default_client_middleware`) and the instances known, under the dependency's
            name; no metrics if None.
        tracing: the default chain's spans (an App's ``app.tracing``); if None, calls carry
            the current trace context but record no spans.

    Returns:
        A :class:`~tether.channel.Channel`, usable wherever generated stubs take a
        ``grpc.aio.Channel``; use it as an async context manager or ``await channel.close()``.

    Raises:
        ValueError: the target is empty, or is ``discovery:///`` without ``discovery``.
        ConfigError: a TLS file of ``config`` cannot be used.
    """
    cfg = config or ClientConfig()
    if service is None and target.startswith(DISCOVERY_SCHEME):
        service = target[len(DISCOVERY_SCHEME) :]
    if credentials is None:
        policy = cfg.services.get(service) if service else None
        overridden = policy is not None and policy.tls is not None
        field = f"client.services.{service}.tls" if overridden else "client.tls"
        tls = client_tls(cfg.tls_for(service), field=field)
        if tls is not None:
            credentials = tls.credentials
            options = (*tls.options, *options)
    chain = (
        default_client_middleware(cfg, service, fallbacks, metrics, tracing)
        if middleware is None
        else middleware
    )
    return Channel(
        target,
        discovery=discovery,
        config=cfg,
        middleware=chain,
        options=options,
        credentials=credentials,
        on_members=None if metrics is None else metrics.instances_gauge(service or _FIXED_ADDRESS),
    )
