"""Metadata near and over gRPC's limits: a decision by size alone, and never logged whole.

grpc-core refuses inbound metadata past a soft limit (8 KiB) at random, more often the
closer it is to a hard limit (16 KiB), past which it always refuses, with RESOURCE_EXHAUSTED
and before any tether code runs. A tether server sets both limits to 16 KiB
(``tether.app.MAX_METADATA_BYTES``), so the outcome depends on size alone: these tests pin
that (a bare grpc server refuses about half the calls at 12 KiB), and that what tether's own
parsers refuse (a traceparent over 512 characters, baggage over 8 KiB) costs nothing but the
header.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from served_echo import ServedEcho

import tether
from tether.app import MAX_METADATA_BYTES
from tether.config import ClientConfig

# grpc counts each entry as name + value + 32; its own headers (path, authority, user agent,
# timeout, te, content type...) take about 550 bytes of the limit.
OWN_HEADERS = 1024
CALLS = 20  # a bare grpc server refuses about half of the calls at 12 KiB: all 20 pass by luck
# with odds under one in a million. A refusal costs grpc about 0.1 s: fewer of those.
REFUSED_CALLS = 5


@pytest.fixture(scope="module")
def stub(served_echo: ServedEcho) -> Iterator[echo_pb2_grpc.EchoStub]:
    with grpc.insecure_channel(served_echo.target) as channel:
        yield echo_pb2_grpc.EchoStub(channel)


def outcome(stub: echo_pb2_grpc.EchoStub, metadata: list[tuple[str, str | bytes]]) -> str:
    try:
        stub.Say(echo_pb2.SayRequest(text="x"), metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def value(size: int, tag: str) -> str:
    """A value of ``size`` characters that no log line could contain by chance."""
    return (tag + "-" + "0123456789abcdef" * (size // 16 + 1))[:size]


@pytest.mark.parametrize("size", [7 * 1024, 9 * 1024, 12 * 1024, MAX_METADATA_BYTES - OWN_HEADERS])
def test_metadata_under_the_limit_is_always_served(
    served_echo: ServedEcho,
    stub: echo_pb2_grpc.EchoStub,
    size: int,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Between gRPC's soft and hard limits every call is served, not a random share of them,
    and the value is written nowhere (logs, records, spans, the process's stderr)."""
    served_echo.mark()
    big = value(size, "under")
    outcomes = {outcome(stub, [("x-big", big)]) for _ in range(CALLS)}
    assert outcomes == {"OK"}
    captured = capfd.readouterr()
    assert big not in served_echo.written() + captured.out + captured.err


@pytest.mark.parametrize(
    "metadata",
    [
        [("x-big", value(MAX_METADATA_BYTES, "single"))],
        [("x-big", value(64 * 1024, "large"))],
        [(f"x-k{i}", value(100, f"many{i}")) for i in range(200)],
        [("x-big-bin", value(17 * 1024, "binary").encode())],  # counted decoded, not as base64
    ],
    ids=["16KiB", "64KiB", "200x100B", "binary"],
)
def test_metadata_over_the_limit_is_always_refused(
    served_echo: ServedEcho,
    stub: echo_pb2_grpc.EchoStub,
    metadata: list[tuple[str, str | bytes]],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Past 16 KiB every call is refused with RESOURCE_EXHAUSTED, whose message gives sizes,
    never values; the server serves the next call; nothing is written whole."""
    served_echo.mark()
    outcomes = [outcome(stub, metadata) for _ in range(REFUSED_CALLS)]
    assert all(o.startswith("RESOURCE_EXHAUSTED: ") for o in outcomes), set(outcomes)
    assert outcome(stub, []) == "OK"
    captured = capfd.readouterr()
    text = "\n".join([served_echo.written(), captured.out, captured.err, *outcomes])
    for _, sent in metadata:
        shown = sent.decode() if isinstance(sent, bytes) else sent
        assert shown[:24] not in text


@pytest.mark.parametrize(
    ("key", "size"),
    [("traceparent", 600), ("tracestate", 4096), ("baggage", 12 * 1024)],
)
def test_oversized_trace_headers_are_dropped_and_the_call_served(
    served_echo: ServedEcho, stub: echo_pb2_grpc.EchoStub, key: str, size: int
) -> None:
    """A trace header past tether's own limits (traceparent and tracestate 512, baggage 8 KiB)
    but under gRPC's is ignored: the call is served in a new trace, nothing written whole."""
    served_echo.mark()
    header = value(size, key)
    if key == "traceparent":
        header = f"00-{'a' * 32}-{'b' * 16}-01-" + header
    reply = stub.Say(echo_pb2.SayRequest(text="x"), metadata=[(key, header)], timeout=10)
    assert reply.seen["trace_id"] != "a" * 32
    assert header[:24] not in served_echo.written()


async def test_a_tether_client_refused_for_its_metadata_keeps_its_breaker_closed(
    served_echo: ServedEcho,
) -> None:
    """RESOURCE_EXHAUSTED for oversized metadata is the caller's doing: a tether client's
    breaker does not count it (fail_max 2, three refusals), and the next call goes through."""
    async with tether.dial(served_echo.target, config=ClientConfig(breaker={"fail_max": 2})) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Say(
                    echo_pb2.SayRequest(text="x"),
                    metadata=[("x-big", value(20 * 1024, "client"))],
                    timeout=10,
                )
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await stub.Say(echo_pb2.SayRequest(text="after"), timeout=10)).text == "after"
