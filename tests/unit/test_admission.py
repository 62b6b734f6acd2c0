"""Tests for tether.admission and its configuration: per-method concurrency and rate limits."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2
from pydantic import ValidationError
from support.fakes import FakeClock as Clock

from tether import CallContext, MethodName, Side, chain, use_call
from tether.admission import admit
from tether.config import ServerConfig, load_config
from tether.config_policies import AdmissionConfig, AdmissionLimits
from tether.deadline import enforce_deadline
from tether.errors import ConfigError, DeadlineExceeded, ResourceExhausted

SAY = MethodName.parse("/echo.v1.Echo/Say")
HOLD = MethodName.parse("/echo.v1.Echo/Hold")
SPLIT = MethodName.parse("/echo.v1.Echo/Split")
OTHER = MethodName.parse("/other.v1.Other/Get")


class Servicer:
    """The handler behind the middleware: counts runs; `hold` keeps calls open until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()

    async def answer(self, request: Any) -> Any:
        self.runs += 1
        return "ok"

    async def hold(self, request: Any) -> Any:
        self.runs += 1
        await self.release.wait()
        return "held"

    async def stream(self, request: Any) -> Any:
        self.runs += 1

        async def words() -> AsyncIterator[str]:
            for word in ("a", "b"):
                if word == request:
                    raise RuntimeError("broken stream")
                yield word

        return words()


def server_call(method: MethodName, *, streaming: bool = False) -> CallContext:
    return CallContext(method=method, side=Side.SERVER, response_streaming=streaming)


async def call(handler: Any, method: MethodName, request: Any = "request") -> Any:
    with use_call(server_call(method, streaming=method is SPLIT)):
        return await handler(request)


async def settle() -> None:
    """Let started tasks run until they wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def retry_delay(err: ResourceExhausted) -> float:
    [info] = [d for d in err.details if isinstance(d, error_details_pb2.RetryInfo)]
    return float(info.retry_delay.ToNanoseconds()) / 1e9


def test_no_limits_pass_every_call_through() -> None:
    """The default configuration limits nothing: the handler is returned as it is."""
    servicer = Servicer()
    assert admit(AdmissionConfig())(servicer.answer) == servicer.answer
    assert ServerConfig().admission == AdmissionConfig()
    assert not AdmissionConfig().limited


async def test_concurrency_limit_refuses_the_next_call_with_retry_info() -> None:
    """At max_concurrent calls in flight the next is refused at once, handler not run."""
    servicer = Servicer()
    handler = admit(AdmissionConfig(max_concurrent=2, retry_after_seconds=0.25))(servicer.hold)
    held = [asyncio.create_task(call(handler, HOLD)) for _ in range(2)]
    await settle()
    with pytest.raises(ResourceExhausted) as err:
        await call(handler, HOLD)
    assert servicer.runs == 2
    assert "echo.v1.Echo/Hold" in err.value.message and "2 concurrent" in err.value.message
    assert err.value.retry_after == 0.25 and retry_delay(err.value) == 0.25
    servicer.release.set()
    assert await asyncio.gather(*held) == ["held", "held"]
    assert await call(handler, HOLD) == "held"  # slots are free again


async def test_limits_are_per_method() -> None:
    """A method at its bound does not hold back another method."""
    servicer = Servicer()
    middleware = admit(AdmissionConfig(max_concurrent=1))
    hold, answer = middleware(servicer.hold), middleware(servicer.answer)
    held = asyncio.create_task(call(hold, HOLD))
    await settle()
    with pytest.raises(ResourceExhausted):
        await call(hold, HOLD)
    assert await call(answer, SAY) == "ok"
    servicer.release.set()
    await held


async def test_a_failing_handler_frees_its_slot() -> None:
    """A call that raises is no longer in flight."""

    async def broken(request: Any) -> Any:
        raise RuntimeError("bug")

    handler = admit(AdmissionConfig(max_concurrent=1))(broken)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await call(handler, SAY)


async def test_a_cancelled_call_frees_its_slot() -> None:
    """A call cancelled while it runs (client gone, deadline) is no longer in flight."""
    servicer = Servicer()
    handler = admit(AdmissionConfig(max_concurrent=1))(servicer.hold)
    held = asyncio.create_task(call(handler, HOLD))
    await settle()
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    servicer.release.set()
    assert await call(handler, HOLD) == "held"


async def test_rate_limit_admits_burst_then_rate_with_retry_after() -> None:
    """A method's bucket admits `burst` at once; the refusal says when the next token comes."""
    clock, servicer = Clock(), Servicer()
    handler = admit(AdmissionConfig(rate=4, burst=2), clock=clock)(servicer.answer)
    assert [await call(handler, SAY) for _ in range(2)] == ["ok", "ok"]
    with pytest.raises(ResourceExhausted) as err:
        await call(handler, SAY)
    assert err.value.retry_after == pytest.approx(0.25)
    assert "4 calls/s" in err.value.message
    assert servicer.runs == 2
    clock.now += 0.25
    assert await call(handler, SAY) == "ok"


async def test_a_concurrency_refusal_costs_no_token() -> None:
    """A call refused for concurrency leaves the method's bucket untouched."""
    clock, servicer = Clock(), Servicer()
    handler = admit(AdmissionConfig(max_concurrent=1, rate=1, burst=2), clock=clock)(servicer.hold)
    held = asyncio.create_task(call(handler, HOLD))
    await settle()
    for _ in range(3):
        with pytest.raises(ResourceExhausted, match="concurrent"):
            await call(handler, HOLD)
    servicer.release.set()
    await held
    assert await call(handler, HOLD) == "held"  # the second token was still there


async def test_each_refusal_is_reported_with_the_limit_reached() -> None:
    """on_reject hears every refused call, with its method and which limit refused it, and
    nothing about admitted calls."""
    clock, servicer = Clock(), Servicer()
    refused: list[tuple[str, str]] = []
    middleware = admit(
        AdmissionConfig(methods={"echo.v1.Echo/Hold": {"max_concurrent": 1}}, rate=1, burst=1),
        clock=clock,
        on_reject=lambda method, limit: refused.append((method, limit)),
    )
    hold, answer = middleware(servicer.hold), middleware(servicer.answer)
    held = asyncio.create_task(call(hold, HOLD))
    await settle()
    with pytest.raises(ResourceExhausted):
        await call(hold, HOLD)
    assert await call(answer, SAY) == "ok"
    with pytest.raises(ResourceExhausted):
        await call(answer, SAY)
    servicer.release.set()
    await held
    assert refused == [("echo.v1.Echo/Hold", "concurrency"), ("echo.v1.Echo/Say", "rate")]


async def test_expired_calls_refused_outside_admission_cost_no_token() -> None:
    """In the recommended order (enforce_deadline, then admit) an expired call takes no token."""
    clock, servicer = Clock(), Servicer()
    admission = admit(AdmissionConfig(rate=1, burst=1), clock=clock)
    handler = chain(enforce_deadline, admission)(servicer.answer)
    expired = CallContext(method=SAY, side=Side.SERVER, deadline=time.monotonic() - 1)
    for _ in range(3):
        with use_call(expired), pytest.raises(DeadlineExceeded):
            await handler("request")
    assert await call(handler, SAY) == "ok"
    assert servicer.runs == 1


async def test_a_stream_is_in_flight_until_it_ends() -> None:
    """A stream-response call holds its slot while its stream is read, and frees it at the end."""
    servicer = Servicer()
    handler = admit(AdmissionConfig(max_concurrent=1))(servicer.stream)
    stream = await call(handler, SPLIT)
    with pytest.raises(ResourceExhausted):
        await call(handler, SPLIT)
    assert [word async for word in stream] == ["a", "b"]
    second = await call(handler, SPLIT, "b")  # fails after its first word
    with pytest.raises(RuntimeError, match="broken"):
        async for _ in second:
            pass
    assert await call(handler, SPLIT) is not None  # a failed stream freed its slot too


async def test_a_stream_dropped_unread_frees_its_slot() -> None:
    """A stream nobody reads (the call died before reading it) does not keep its slot."""
    servicer = Servicer()
    handler = admit(AdmissionConfig(max_concurrent=1))(servicer.stream)
    stream = await call(handler, SPLIT)
    del stream
    gc.collect()
    closed = await call(handler, SPLIT)
    await closed.aclose()
    assert await call(handler, SPLIT) is not None


async def test_method_overrides_win_over_service_and_defaults() -> None:
    """'pkg.Service/Method' beats 'pkg.Service/*', which beats the defaults; null lifts a limit."""
    config = AdmissionConfig.model_validate(
        {
            "max_concurrent": 10,
            "methods": {
                "echo.v1.Echo/*": {"max_concurrent": 5, "rate": 100},
                "echo.v1.Echo/Hold": {"max_concurrent": 1},
                "echo.v1.Echo/Say": {"max_concurrent": None, "rate": None},
            },
        }
    )
    assert config.limits("echo.v1.Echo/Hold") == AdmissionLimits(max_concurrent=1, rate=100)
    assert config.limits("echo.v1.Echo/Chat") == AdmissionLimits(max_concurrent=5, rate=100)
    assert not config.limits("echo.v1.Echo/Say").limited
    assert config.limits("other.v1.Other/Get") == AdmissionLimits(max_concurrent=10)
    servicer = Servicer()
    say = admit(config)(servicer.hold)
    calls = [asyncio.create_task(call(say, SAY)) for _ in range(20)]
    await settle()
    assert servicer.runs == 20  # Say has no limit at all
    servicer.release.set()
    await asyncio.gather(*calls)


def test_only_overrides_can_limit() -> None:
    """A limit given only in an override still switches the middleware on."""
    config = AdmissionConfig.model_validate({"methods": {"echo.v1.Echo/Hold": {"rate": 1}}})
    assert config.limited
    assert config.limits("echo.v1.Echo/Hold").capacity == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_concurrent": 0}, "greater than or equal to 1"),
        ({"rate": 0}, "greater than 0"),
        ({"burst": 5}, "burst is set without rate"),
        ({"methods": {"echo.v1.Echo/Hold": {"burst": 5}}}, "methods.echo.v1.Echo/Hold: burst"),
        ({"methods": {"Echo Hold": {"rate": 1}}}, "package.Service/Method"),
        ({"methods": {"echo.v1.Echo/Hold": {"limit": 1}}}, "Extra inputs"),
        ({"retry_after_seconds": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_admission_config_is_refused(data: dict[str, Any], message: str) -> None:
    """Bounds, burst without rate, method patterns and unknown keys are refused."""
    with pytest.raises(ValidationError, match=message):
        AdmissionConfig.model_validate(data)


def test_an_override_may_give_a_burst_to_the_default_rate() -> None:
    """A burst in an override is fine when a rate applies to the method."""
    config = AdmissionConfig.model_validate(
        {"rate": 10, "methods": {"echo.v1.Echo/Hold": {"burst": 50}}}
    )
    assert config.limits("echo.v1.Echo/Hold").capacity == 50
    assert config.limits("echo.v1.Echo/Say").capacity == 10


def test_admission_loads_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """server.admission comes from the YAML file, TETHER_SERVER__ADMISSION__* override it."""
    for name in [n for n in os.environ if n.upper().startswith("TETHER_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "tether.yaml"
    path.write_text(
        "service: {name: orders}\n"
        "server:\n"
        "  admission:\n"
        "    max_concurrent: 8\n"
        "    methods: {'orders.v1.Orders/Create': {rate: 20, burst: 5}}\n"
    )
    monkeypatch.setenv("TETHER_SERVER__ADMISSION__MAX_CONCURRENT", "16")
    admission = load_config(path).server.admission
    assert admission.max_concurrent == 16
    assert admission.limits("orders.v1.Orders/Create") == AdmissionLimits(
        max_concurrent=16, rate=20, burst=5
    )


def test_bad_admission_in_a_file_names_the_field(tmp_path: Path) -> None:
    """A refused value is reported at start-up with its dotted field and the rule."""
    path = tmp_path / "tether.yaml"
    path.write_text("service: {name: orders}\nserver: {admission: {max_concurrent: 0}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [problem] = err.value.problems
    assert problem.field == "server.admission.max_concurrent"
    assert problem.value == "0"
    assert ">= 1" in problem.rule
