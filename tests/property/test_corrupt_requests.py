"""Request bytes that are not the method's message: a clean status, and the server goes on.

The bytes are sent raw, with a generic call and identity serializers, as a broken or hostile
client would. A unary request is parsed by tether's adapter, inside the chain: bytes that do
not parse get INTERNAL ("the request message could not be parsed"), the code gRPC gives a
request that does not parse, counted and access-logged like any call. A request stream is
parsed by grpc as the handler reads it; the error reaches the handler and recovery answers
INTERNAL with its generic message.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from served_echo import ServedEcho

UNPARSABLE = "the request message could not be parsed"
#: Bytes no SayRequest parses from: a truncated varint, a string field with invalid UTF-8,
#: a length past the end, and a field number of zero.
CORRUPT = [b"\xff\xff\xff", b"\x0a\x03\xff\xfe\xfd", b"\x0a\x7f" + b"x" * 3, b"\x00\x01"]
SHAPES = {
    "/echo.v1.Echo/Say": "unary_unary",
    "/echo.v1.Echo/Split": "unary_stream",
    "/echo.v1.Echo/Join": "stream_unary",
    "/echo.v1.Echo/Chat": "stream_stream",
}


@pytest.fixture(scope="module")
def channel(served_echo: ServedEcho) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served_echo.target) as channel:
        yield channel


def send_raw(channel: grpc.Channel, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    """Send ``body`` as the request (once, or as a one-message stream); the final status."""
    shape = SHAPES[method]
    call = getattr(channel, shape)(method)  # no serializers: bytes in, bytes out
    request = iter([body]) if shape.startswith("stream") else body
    try:
        result = call(request, timeout=10)
        if shape.endswith("stream"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_still_serving(channel: grpc.Channel) -> None:
    reply = echo_pb2_grpc.EchoStub(channel).Say(echo_pb2.SayRequest(text="next"), timeout=10)
    assert reply.text == "next"


@pytest.mark.parametrize("method", sorted(SHAPES))
@pytest.mark.parametrize("body", CORRUPT, ids=lambda b: b.hex())
def test_corrupt_bytes_get_internal_and_the_server_keeps_serving(
    served_echo: ServedEcho, channel: grpc.Channel, method: str, body: bytes
) -> None:
    """Every call shape: INTERNAL with a generic message, no exception named, no traceback from
    grpc; the call is access-logged; the next call is served."""
    served_echo.mark()
    code, details = send_raw(channel, method, body)
    assert code is grpc.StatusCode.INTERNAL, (code, details)
    assert details in (UNPARSABLE, "internal error")
    assert "DecodeError" not in details and "Error parsing" not in details
    written = served_echo.written()
    assert "Unexpected [" not in written, "grpc logged the failure itself (a traceback)"
    assert '"code":"INTERNAL"' in written and '"logger_name":"tether.access"' in written
    assert_still_serving(channel)


@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.one_of(st.binary(max_size=2048), st.binary(max_size=8).map(lambda b: b"\x0a" + b)))
def test_any_request_bytes_are_served_or_refused_cleanly(
    served_echo: ServedEcho, channel: grpc.Channel, body: bytes
) -> None:
    """Arbitrary bytes to a unary method: served when they happen to parse as a SayRequest
    (protobuf skips unknown fields), else INTERNAL "could not be parsed"; the next call is
    served, and the bytes are never written to logs or spans."""
    served_echo.mark()
    code, details = send_raw(channel, "/echo.v1.Echo/Say", body)
    event(f"status {code.name}")
    try:
        request = echo_pb2.SayRequest.FromString(body)
    except Exception:
        assert (code, details) == (grpc.StatusCode.INTERNAL, UNPARSABLE)
    else:
        expected = {
            "boom": grpc.StatusCode.INTERNAL,
            "not-found": grpc.StatusCode.NOT_FOUND,
            "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "unavailable:echo-1": grpc.StatusCode.UNAVAILABLE,
        }
        if request.fail.startswith("slow:") or request.fail.startswith("via:"):
            pass  # a request the servicer acts on (sleeps, relays): any clean status will do
        elif request.fail == "abort":
            assert code is grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert code is expected.get(request.fail, grpc.StatusCode.OK), (code, details)
    assert_still_serving(channel)
    if len(body) >= 8:
        assert body.hex() not in served_echo.written()
