"""tether's W3C parsers against OpenTelemetry's own, on thousands of headers, valid and not.

tether reads ``traceparent``, ``tracestate`` and ``baggage`` with a lean parser of its own
(for speed) and promises to accept and refuse exactly what OpenTelemetry's propagators do.
These tests hold it to that on generated input, and check that nothing raises.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from wire_strategies import PRINTABLE, baggages, traceparents, tracestates

from tether.tracing import Tracing, parse_traceparent

OPENTELEMETRY = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


class _Pairs(Getter[list[tuple[str, Any]]]):
    """Reads metadata pairs as tether's own getter does: every str value of a key."""

    def get(self, carrier: list[tuple[str, Any]], key: str) -> list[str] | None:
        return [v for k, v in carrier if k == key and isinstance(v, str)] or None

    def keys(self, carrier: list[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


def described(span: SpanContext | None) -> tuple[Any, ...] | None:
    """What a remote parent carries, comparable across parsers; None for no (valid) parent."""
    if span is None or not span.is_valid:
        return None
    return (span.trace_id, span.span_id, int(span.trace_flags), tuple(span.trace_state.items()))


def parent_of(ctx: Context) -> tuple[Any, ...] | None:
    return described(trace.get_current_span(ctx).get_span_context())


@settings(max_examples=2000)
@given(
    header=st.one_of(traceparents(tabs=True), st.text(max_size=80)),
    state=st.one_of(st.none(), tracestates(), st.text(max_size=80)),
)
def test_traceparent_is_parsed_as_opentelemetry_parses_it(header: str, state: str | None) -> None:
    """parse_traceparent accepts and refuses what TraceContextTextMapPropagator does, any text
    (tabs, unicode, newlines) included, and agrees on every field it keeps."""
    carrier = {"traceparent": header, **({"tracestate": state} if state is not None else {})}
    expected = parent_of(TraceContextTextMapPropagator().extract(carrier))
    assert described(parse_traceparent(header, state)) == expected


_KEYS = st.sampled_from(["traceparent", "tracestate", "baggage", "x-other"])
_VALUES = st.one_of(
    traceparents(), tracestates(), baggages(), st.text(PRINTABLE, max_size=40), st.binary()
)


_VALID_PARENT = traceparents().filter(lambda h: parse_traceparent(h) is not None)


@settings(max_examples=1500)
@given(
    first=st.lists(st.tuples(st.just("traceparent"), _VALID_PARENT), max_size=1),
    rest=st.lists(st.tuples(_KEYS, _VALUES), max_size=6),
)
def test_metadata_yields_the_context_opentelemetry_would_extract(
    first: list[tuple[str, str]], rest: list[tuple[str, str | bytes]]
) -> None:
    """From any inbound metadata (repeated keys and bytes values included), tether extracts
    the parent and baggage OpenTelemetry's W3C propagators would, and never raises."""
    pairs = [*first, *rest]
    ours = Tracing().propagation.extract(pairs)
    try:
        theirs = OPENTELEMETRY.extract(pairs, getter=_Pairs())
    except Exception:  # tether must shrug off what makes OpenTelemetry raise: a new trace
        theirs = Context()
    assert parent_of(ours) == parent_of(theirs)
    assert dict(baggage.get_all(ours)) == dict(baggage.get_all(theirs))
