"""tether.fallback: declaring fallbacks, checking them against the proto, and the middleware."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from structlog.testing import capture_logs
from support.fakes import FakeClock

import tether
from tether.config import ClientConfig
from tether.context import CallContext, MethodName, Side, use_call
from tether.errors import BreakerOpen, ConfigError, RateLimited, RemoteError, StatusError
from tether.fallback import (
    FALLBACK_LOG_EVERY,
    FALLBACK_TRAILER,
    Degradation,
    Fallbacks,
    collect_trailers,
    degraded,
    fallback,
)
from tether.middleware import Handler
from tether.v1 import options_pb2

SAY = "echo.v1.Echo/Say"
LOOKUP = "echo.v1.Echo/Lookup"  # its proto declares (tether.v1.fallback)
Reply = echo_pb2.SayReply
Req = echo_pb2.SayRequest


def cached(request: Req, error: StatusError) -> Reply:
    """A well-declared sync fallback."""
    return Reply(text=f"cached {request.text}", seen={"reason": error.code.name})


async def cached_async(request: Req, error: StatusError) -> Reply:
    """A well-declared async fallback."""
    return Reply(text=f"async {request.text}")


def problems(fallbacks: Fallbacks, names: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """The problems check() refuses, by field: (value, rule)."""
    with pytest.raises(ConfigError) as err:
        fallbacks.check(names)
    return {p.field: (p.value, p.rule) for p in err.value.problems}


# --------------------------------------------------------------------------- declaring


def test_add_takes_a_function_or_a_response() -> None:
    """Neither, or both, of fn and response= is a TypeError at once."""
    fallbacks = Fallbacks()
    with pytest.raises(TypeError, match="either fn or response"):
        fallbacks.add(SAY)
    with pytest.raises(TypeError, match="either fn or response"):
        fallbacks.add(SAY, cached, response="text: 'x'")


def test_method_decorator_declares_and_returns_the_function() -> None:
    """@fallbacks.method(...) leaves the function as it was and declares it."""
    fallbacks = Fallbacks()
    decorated = fallbacks.method(SAY)(cached)
    assert decorated is cached
    assert SAY in fallbacks
    assert f"/{SAY}" in fallbacks  # the wire spelling is the same method
    assert len(fallbacks) == 1


def test_check_accepts_well_declared_fallbacks() -> None:
    """Sync and async functions, returns=, a message and proto text all pass the check."""
    fallbacks = Fallbacks()
    fallbacks.add(SAY, cached)
    fallbacks.add("echo.v1.Echo/Hold", cached_async)
    fallbacks.add("echo.v1.Echo/Join", lambda request, error: Reply(), returns=Reply)
    fallbacks.add(LOOKUP, response=Reply(text="given"))
    fallbacks.check()
    only_text = Fallbacks()
    only_text.add(SAY, response='text: "static" seen { key: "k" value: "v" }')
    only_text.check([SAY, LOOKUP])


def test_check_refuses_an_unknown_method() -> None:
    """A method the descriptor pool does not know, or misspelt, is refused with its name."""
    fallbacks = Fallbacks()
    fallbacks.add("echo.v1.Echo/Shout", cached)
    fallbacks.add("echo.v1.Echo.Say", cached)  # dots only: calls would never find it
    found = problems(fallbacks)
    assert set(found) == {"fallback[echo.v1.Echo/Shout]", "fallback[echo.v1.Echo.Say]"}
    value, rule = found["fallback[echo.v1.Echo/Shout]"]
    assert value.endswith("cached")
    assert "no method in the descriptor pool" in rule
    assert "package.Service/Method" in rule


def test_check_refuses_a_function_of_the_wrong_type() -> None:
    """A function annotated with another message names the method, expected and given types."""

    def wrong(request: Req, error: StatusError) -> Req:
        return request

    fallbacks = Fallbacks()
    fallbacks.add(SAY, wrong)
    (field, (value, rule)) = next(iter(problems(fallbacks).items()))
    assert field == "fallback[echo.v1.Echo/Say]"
    assert value.endswith("wrong")
    assert rule == "must return echo.v1.SayReply, got echo.v1.SayRequest"


def test_check_refuses_an_unannotated_function() -> None:
    """Without a return annotation or returns= the type cannot be checked: refused, with a hint."""
    fallbacks = Fallbacks()
    fallbacks.add(SAY, lambda request, error: Reply())
    value, rule = problems(fallbacks)[f"fallback[{SAY}]"]
    assert "<lambda>" in value
    assert rule.startswith("must return echo.v1.SayReply, got a function without a return")
    assert "returns=" in rule


def test_check_refuses_returns_of_the_wrong_type_and_non_messages() -> None:
    """returns= is checked like an annotation; a non-message annotation is named as Python."""

    def text(request: Req, error: StatusError) -> str:
        return "no"

    fallbacks = Fallbacks()
    fallbacks.add(SAY, lambda request, error: Req(), returns=Req)
    fallbacks.add("echo.v1.Echo/Hold", text)
    found = problems(fallbacks)
    assert found[f"fallback[{SAY}]"][1] == "must return echo.v1.SayReply, got echo.v1.SayRequest"
    assert found["fallback[echo.v1.Echo/Hold]"][1] == "must return echo.v1.SayReply, got str"


def test_check_refuses_a_function_that_cannot_take_request_and_error() -> None:
    """A function that cannot be called as fn(request, error) is refused."""

    def one(request: Req) -> Reply:
        return Reply()

    fallbacks = Fallbacks()
    fallbacks.add(SAY, one)  # type: ignore[arg-type]  # the point of the test
    assert "must take (request, error)" in problems(fallbacks)[f"fallback[{SAY}]"][1]


def test_check_refuses_static_text_that_does_not_parse() -> None:
    """Static text is parsed as the output type; the parser's complaint is in the rule."""
    fallbacks = Fallbacks()
    fallbacks.add(SAY, response='name: "unknown"')
    value, rule = problems(fallbacks)[f"fallback[{SAY}]"]
    assert value == repr('name: "unknown"')
    assert rule.startswith("must return echo.v1.SayReply, got text that does not parse")
    assert 'no field named "name"' in rule


def test_check_refuses_a_message_of_the_wrong_type() -> None:
    """A fixed message of another type is refused with both type names."""
    fallbacks = Fallbacks()
    fallbacks.add(SAY, response=Req(text="x"))
    value, rule = problems(fallbacks)[f"fallback[{SAY}]"]
    assert value.startswith("echo.v1.SayRequest(")
    assert rule == "must return echo.v1.SayReply, got echo.v1.SayRequest"


def test_check_refuses_streaming_responses_and_duplicates() -> None:
    """A fallback cannot answer a response stream; one method declared twice is refused."""
    fallbacks = Fallbacks()
    fallbacks.add("echo.v1.Echo/Split", cached)
    fallbacks.add(SAY, cached)
    fallbacks.add(SAY, cached_async)
    found = problems(fallbacks)
    assert "answers with a stream" in found["fallback[echo.v1.Echo/Split]"][1]
    assert found[f"fallback[{SAY}]"][1] == "declared more than once"


def test_check_reports_every_problem_at_once() -> None:
    """Several bad declarations give one ConfigError listing each of them."""
    fallbacks = Fallbacks()
    fallbacks.add("echo.v1.Echo/Shout", cached)
    fallbacks.add(SAY, lambda request, error: Reply())
    fallbacks.add("echo.v1.Echo/Hold", response="nope: 1")
    with pytest.raises(ConfigError) as err:
        fallbacks.check()
    assert len(err.value.problems) == 3
    assert "fallback[echo.v1.Echo/Hold]='nope: 1'" in str(err.value)


@pytest.fixture
def bad_option_pool() -> descriptor_pool.DescriptorPool:
    """A pool whose bad.v1.Bad/Get declares a (tether.v1.fallback) that does not parse."""
    pool = descriptor_pool.DescriptorPool()
    for module in (descriptor_pb2, options_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    file = descriptor_pb2.FileDescriptorProto(
        name="bad/v1/bad.proto",
        package="bad.v1",
        syntax="proto3",
        dependency=["tether/v1/options.proto"],
    )
    file.message_type.add(name="Reply").field.add(
        name="text",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    method = file.service.add(name="Bad").method.add(
        name="Get", input_type=".bad.v1.Reply", output_type=".bad.v1.Reply"
    )
    method.options.Extensions[options_pb2.fallback] = "nope: 1"
    pool.Add(file)
    return pool


def test_check_refuses_a_proto_option_that_does_not_parse(
    bad_option_pool: descriptor_pool.DescriptorPool,
) -> None:
    """The proto's (tether.v1.fallback) is checked for the methods named, unknown ones too."""
    fallbacks = Fallbacks(pool=bad_option_pool)
    found = problems(fallbacks, ["bad.v1.Bad/Get", "bad.v1.Bad/Missing"])
    value, rule = found["fallback[bad.v1.Bad/Get]"]
    assert value == repr("nope: 1")
    assert rule.startswith("(tether.v1.fallback) must return bad.v1.Reply, got text that")
    assert "no method" in found["fallback[bad.v1.Bad/Missing]"][1]
    assert fallbacks.lookup("bad.v1.Bad/Get") is None  # never served


def test_check_reads_the_options_of_imported_modules() -> None:
    """Without names, every method of the generated modules imported so far is checked."""
    Fallbacks().check()  # echo.v1's Lookup declares a good option


# --------------------------------------------------------------------------- answering


def test_lookup_finds_the_proto_option() -> None:
    """A method whose proto declares a fallback has one without any code."""
    found = Fallbacks().lookup(LOOKUP)
    assert found is not None
    assert found.source == "proto"
    assert found.output is Reply
    assert Fallbacks().lookup(SAY) is None


def test_code_wins_over_the_proto() -> None:
    """A fallback declared in code replaces the one in the proto."""
    fallbacks = Fallbacks()
    fallbacks.add(LOOKUP, cached)
    found = fallbacks.lookup(f"/{LOOKUP}")
    assert found is not None and found.source == "code"


def test_lookup_refuses_what_check_would() -> None:
    """A declaration that would fail the check never serves, even if check() was skipped."""
    fallbacks = Fallbacks()
    fallbacks.add(SAY, lambda request, error: Reply())
    with capture_logs() as logs:
        assert fallbacks.lookup(SAY) is None
    assert logs[0]["event"] == "fallback refused"


async def test_static_answers_are_fresh_copies() -> None:
    """Each call gets its own message; changing one leaves the next as declared."""
    found = Fallbacks().lookup(LOOKUP)
    assert found is not None
    first = await found.respond(Req(), BreakerOpen())
    first.text = "changed"
    second = await found.respond(Req(), BreakerOpen())
    assert type(second) is Reply
    assert second.text == "static"
    assert dict(second.seen) == {"source": "proto"}


async def test_sync_and_async_functions_answer() -> None:
    """A sync function's return and an async one's result are the answer."""
    fallbacks = Fallbacks()
    fallbacks.add(SAY, cached)
    fallbacks.add("echo.v1.Echo/Hold", cached_async)
    say = fallbacks.lookup(SAY)
    hold = fallbacks.lookup("echo.v1.Echo/Hold")
    assert say is not None and hold is not None
    assert (await say.respond(Req(text="a"), BreakerOpen())).text == "cached a"
    assert (await hold.respond(Req(text="b"), BreakerOpen())).text == "async b"


async def test_a_function_that_lies_about_its_type_is_caught() -> None:
    """A function annotated right but returning another type raises TypeError, never serves it."""

    def liar(request: Req, error: StatusError) -> Reply:
        return Req()  # type: ignore[return-value]  # the point of the test

    fallbacks = Fallbacks()
    fallbacks.add(SAY, liar)
    found = fallbacks.lookup(SAY)
    assert found is not None
    with pytest.raises(TypeError, match=r"returned echo\.v1\.SayRequest, not echo\.v1\.SayReply"):
        await found.respond(Req(), BreakerOpen())


# --------------------------------------------------------------------------- the middleware


def _ctx(method: str = SAY, *, streaming: bool = False) -> CallContext:
    return CallContext(
        method=MethodName.parse(f"/{method}"), side=Side.CLIENT, response_streaming=streaming
    )


def failing(error: Exception) -> Handler:
    async def handler(request: Any) -> Any:
        raise error

    return handler


def chain_for(fallbacks: Fallbacks, *, codes: tuple[str, ...] | None = None, **kwargs: Any) -> Any:
    cfg = ClientConfig() if codes is None else ClientConfig(fallback_codes=codes)
    return fallback(cfg.resolver("echo"), fallbacks, service="echo", **kwargs)


@pytest.fixture
def say_fallbacks() -> Fallbacks:
    fallbacks = Fallbacks()
    fallbacks.add(SAY, cached)
    return fallbacks


@pytest.fixture
def trailers() -> Iterator[list[tuple[str, str]]]:
    with collect_trailers([]) as sink:
        yield sink


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (BreakerOpen("breaker open"), "UNAVAILABLE"),
        (RateLimited("limited"), "RESOURCE_EXHAUSTED"),
        (RemoteError(grpc.StatusCode.UNAVAILABLE, "down"), "UNAVAILABLE"),
        (RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"), "DEADLINE_EXCEEDED"),
    ],
    ids=["breaker", "limiter", "unavailable", "deadline"],
)
async def test_fallback_answers_local_refusals_and_listed_codes(
    say_fallbacks: Fallbacks,
    trailers: list[tuple[str, str]],
    error: StatusError,
    reason: str,
) -> None:
    """Breaker and limiter refusals, and the default fallback codes, get the fallback."""
    handler = chain_for(say_fallbacks)(failing(error))
    with use_call(_ctx()):
        reply = await handler(Req(text="x"))
    assert type(reply) is Reply
    assert reply.text == "cached x"
    assert reply.seen["reason"] == reason
    assert trailers == [(FALLBACK_TRAILER, reason)]


async def test_codes_not_listed_fail_unchanged(
    say_fallbacks: Fallbacks, trailers: list[tuple[str, str]]
) -> None:
    """A status the policy does not list propagates as the very same error."""
    error = RemoteError(grpc.StatusCode.INTERNAL, "boom")
    handler = chain_for(say_fallbacks)(failing(error))
    with use_call(_ctx()), pytest.raises(RemoteError) as raised:
        await handler(Req())
    assert raised.value is error
    assert trailers == []


async def test_configured_codes_are_honoured(say_fallbacks: Fallbacks) -> None:
    """fallback_codes decides which peer statuses are replaced."""
    handler = chain_for(say_fallbacks, codes=("INTERNAL",))(
        failing(RemoteError(grpc.StatusCode.INTERNAL, "boom"))
    )
    with use_call(_ctx()):
        assert (await handler(Req(text="y"))).text == "cached y"


async def test_local_errors_other_than_refusals_fail_unchanged(say_fallbacks: Fallbacks) -> None:
    """Only BreakerOpen and RateLimited among local errors are replaced."""
    error = tether.Unavailable("no instances")
    handler = chain_for(say_fallbacks)(failing(error))
    with use_call(_ctx()), pytest.raises(tether.Unavailable) as raised:
        await handler(Req())
    assert raised.value is error


async def test_methods_without_fallback_fail_unchanged() -> None:
    """A refused call of a method with no fallback raises the refusal itself."""
    error = BreakerOpen("open")
    handler = chain_for(Fallbacks())(failing(error))
    with use_call(_ctx()), pytest.raises(BreakerOpen) as raised:
        await handler(Req())
    assert raised.value is error


async def test_response_streams_are_left_alone(say_fallbacks: Fallbacks) -> None:
    """A streaming-response call is never answered by a fallback."""
    handler = chain_for(say_fallbacks)(failing(BreakerOpen()))
    with use_call(_ctx(streaming=True)), pytest.raises(BreakerOpen):
        await handler(Req())


async def test_success_passes_through(say_fallbacks: Fallbacks) -> None:
    """A call that succeeds is not touched."""

    async def ok(request: Any) -> Any:
        return Reply(text="real")

    with use_call(_ctx()):
        assert (await chain_for(say_fallbacks)(ok)(Req())).text == "real"


async def test_degradation_is_logged_and_reported() -> None:
    """A log line (method, reason, error cut to 200) and every listener see the answer."""
    events: list[Degradation] = []

    def broken(event: Degradation) -> None:
        raise RuntimeError("metrics are down")

    fallbacks = Fallbacks()
    fallbacks.add(SAY, cached)
    error = RemoteError(grpc.StatusCode.UNAVAILABLE, "x" * 500)
    handler = chain_for(fallbacks, listeners=[broken, events.append])(failing(error))
    with capture_logs() as logs, use_call(_ctx()):
        await handler(Req())
    answered = next(line for line in logs if line["event"] == "fallback answered")
    assert answered["dependency"] == "echo"
    assert answered["rpc"] == SAY
    assert answered["reason"] == "UNAVAILABLE"
    assert answered["error"] == "x" * 200
    assert answered["log_level"] == "warning"
    assert any(line["event"] == "fallback listener failed" for line in logs)
    assert events == [Degradation("echo", SAY, "UNAVAILABLE", error, "code")]


async def test_a_fallback_may_answer_with_a_status() -> None:
    """A StatusError raised by the fallback function is the call's answer."""

    def not_found(request: Req, error: StatusError) -> Reply:
        raise tether.NotFound("nothing cached")

    fallbacks = Fallbacks()
    fallbacks.add(SAY, not_found)
    handler = chain_for(fallbacks)(failing(BreakerOpen()))
    with use_call(_ctx()), pytest.raises(tether.NotFound, match="nothing cached"):
        await handler(Req())


async def test_a_failing_fallback_leaves_the_original_error() -> None:
    """A fallback that crashes is logged; the original error, cause intact, stands."""

    def crash(request: Req, error: StatusError) -> Reply:
        raise KeyError("cache")

    cause = ValueError("the wire error")
    error = RemoteError(grpc.StatusCode.UNAVAILABLE, "down")
    error.__cause__ = cause
    fallbacks = Fallbacks()
    fallbacks.add(SAY, crash)
    handler = chain_for(fallbacks)(failing(error))
    with capture_logs() as logs, use_call(_ctx()), pytest.raises(RemoteError) as raised:
        await handler(Req())
    assert raised.value is error
    assert raised.value.__cause__ is cause  # the adapter hands the caller this cause
    assert logs[0]["event"] == "fallback failed"


class _Call:
    def __init__(self, *trailers: tuple[str, str | bytes]) -> None:
        self._trailers = trailers

    async def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


async def test_degraded_reads_the_trailer() -> None:
    """degraded(call) is the reason in the tether-fallback trailer, or None."""
    assert await degraded(_Call(("x-other", "1"), (FALLBACK_TRAILER, "UNAVAILABLE"))) == (
        "UNAVAILABLE"
    )
    assert await degraded(_Call(("x-other", "1"))) is None


async def test_an_outage_logs_one_warning_per_interval_with_a_count() -> None:
    """Every answer is counted by listeners, but the warning is logged once per method and
    reason per FALLBACK_LOG_EVERY seconds, with how many answers went unlogged."""
    clock = FakeClock()
    events: list[Degradation] = []
    fallbacks = Fallbacks()
    fallbacks.add(SAY, cached)
    error = RemoteError(grpc.StatusCode.UNAVAILABLE, "down")
    handler = chain_for(fallbacks, listeners=[events.append], clock=clock)(failing(error))
    with capture_logs() as logs, use_call(_ctx()):
        for _ in range(5):
            await handler(Req())
        clock.now += FALLBACK_LOG_EVERY
        await handler(Req())
    answered = [line for line in logs if line["event"] == "fallback answered"]
    assert len(events) == 6
    assert [line.get("unlogged_since_last") for line in answered] == [None, 4]
