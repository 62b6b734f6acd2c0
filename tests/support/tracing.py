"""Tracing helpers for tests: an App's Tracing exporting to memory, and span assertions."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tether


def memory_tracing(
    exporter: InMemorySpanExporter, service: str, ratio: float = 1.0
) -> tether.Tracing:
    """Tracing on, at ``ratio``, for ``service``, each span handed to ``exporter`` as it ends."""
    config = tether.TetherConfig(
        service={"name": service}, tracing={"enabled": True, "sample_ratio": ratio}
    )
    return tether.Tracing(config.tracing, resource={"service.name": service}, exporter=exporter)


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    """``child`` is in ``parent``'s trace, and ``parent`` is its parent."""
    assert child.parent is not None, f"{child.name} has no parent"
    assert child.context.trace_id == parent.context.trace_id, f"{child.name}: another trace"
    assert child.parent.span_id == parent.context.span_id, f"{child.name}: another parent"


def same_attributes(a: ReadableSpan, b: ReadableSpan, keys: Sequence[str]) -> None:
    """``a`` and ``b`` agree on the attributes ``keys``."""
    left, right = dict(a.attributes or {}), dict(b.attributes or {})
    assert {k: left.get(k) for k in keys} == {k: right.get(k) for k in keys}
