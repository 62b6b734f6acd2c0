"""Any metadata a caller can send gets a clean answer, and none of it is logged whole.

A real tether server (the default chain, tracing on, access log on, debug logs) on loopback is
sent generated metadata by grpc's own client: trace headers valid and broken, baggage past its
limit, ``grpc-timeout`` typed by hand, custom text and binary keys, repeats. Each call must end
with the status its request asks for (or RESOURCE_EXHAUSTED when the headers are past the
limit), the server must answer the next plain call, the trace must be the caller's exactly
when OpenTelemetry's own propagator accepts the caller's ``traceparent``, and no value longer
than a few characters may appear whole in the log lines, log records or spans it caused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from served_echo import ServedEcho
from wire_strategies import metadata, metadata_size

from tether.app import MAX_METADATA_BYTES

# A value this long (or longer) never appears whole in what the server wrote.
SHOWN_AT_MOST = 16
# Below this, grpc's own headers included, a call is never refused for its metadata size.
SURELY_FITS = MAX_METADATA_BYTES - 1024
EXPECTED = {
    "": grpc.StatusCode.OK,
    "boom": grpc.StatusCode.INTERNAL,
    "not-found": grpc.StatusCode.NOT_FOUND,
    "abort": grpc.StatusCode.INVALID_ARGUMENT,
}
_TRACE_FIELD = re.compile(r"^[ \t]*[0-9a-f]{2}-([0-9a-f]{32})-")


class _Pairs(Getter[list[tuple[str, Any]]]):
    def get(self, carrier: list[tuple[str, Any]], key: str) -> list[str] | None:
        return [v for k, v in carrier if k == key and isinstance(v, str)] or None

    def keys(self, carrier: list[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


def opentelemetry_parent(pairs: list[tuple[str, Any]]) -> str | None:
    """The trace id OpenTelemetry's W3C propagator reads from ``pairs``, if it accepts them."""
    ctx = TraceContextTextMapPropagator().extract(pairs, getter=_Pairs())
    span = trace.get_current_span(ctx).get_span_context()
    return format(span.trace_id, "032x") if span.is_valid else None


def leaked(values: list[str | bytes], text: str) -> list[str | bytes]:
    """The values (of a length worth hiding) that appear whole in ``text``."""
    found: list[str | bytes] = []
    for value in values:
        if isinstance(value, bytes):
            if len(value) >= SHOWN_AT_MOST // 2 and value.hex() in text:
                found.append(value)
        elif len(value) >= SHOWN_AT_MOST and value in text:
            found.append(value)
    return found


@pytest.fixture(scope="module")
def stub(served_echo: ServedEcho) -> Iterator[echo_pb2_grpc.EchoStub]:
    with grpc.insecure_channel(served_echo.target) as channel:
        yield echo_pb2_grpc.EchoStub(channel)


@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pairs=metadata(), fail=st.sampled_from(sorted(EXPECTED)))
def test_any_metadata_gets_a_clean_status_and_is_never_logged_whole(
    served_echo: ServedEcho,
    stub: echo_pb2_grpc.EchoStub,
    pairs: list[tuple[str, str | bytes]],
    fail: str,
) -> None:
    """Generated inbound metadata: the status the request asks for (or RESOURCE_EXHAUSTED
    past the size limit), the caller's trace exactly when OpenTelemetry would accept it, the
    next call served, and no value written whole to logs or spans."""
    served_echo.mark()
    size = metadata_size(pairs)
    try:
        reply = stub.Say(echo_pb2.SayRequest(text="x", fail=fail), metadata=pairs, timeout=10)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        reply = None

    event(f"status {code.name}")
    if size > MAX_METADATA_BYTES:
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    elif size < SURELY_FITS:
        assert code is EXPECTED[fail], (code, details)
    else:  # within grpc's own headers' size of the limit: either outcome is right
        assert code in (EXPECTED[fail], grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details)

    if reply is not None:
        # As the server received it: grpc keeps one traceparent (the last one sent).
        received = reply.seen.get("traceparent")
        parent = opentelemetry_parent([("traceparent", received)] if received else [])
        seen = reply.seen["trace_id"]
        event("caller's trace continued" if parent else "new trace")
        if parent is not None:
            assert seen == parent, "the caller's valid traceparent was not continued"
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", seen) and int(seen, 16), seen
            refused = _TRACE_FIELD.match(received) if received else None
            assert refused is None or refused.group(1) != seen, "a refused trace id was used"

    assert stub.Say(echo_pb2.SayRequest(text="next"), timeout=10).text == "next"
    values = [value for _, value in pairs]
    assert not leaked(values, details), f"status details echo the metadata: {details[:200]!r}"
    written = served_echo.written()
    if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:  # refused by grpc: tether never saw it
        assert (
            '"logger_name":"tether.access"' in written and '"name": "echo.v1.Echo/Say"' in written
        )
    assert not leaked(values, written), "a metadata value was written whole"
