"""The Echo servicer used across the tests, in-process and as a subprocess (``python -m``)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from echo.v1 import echo_pb2, echo_pb2_grpc
from opentelemetry import trace

import tether
from tether import current_call, get_logger
from tether.registry import Registry
from tether.tracing import Tracing

log = get_logger("echo")

# Metadata the servicer reports back (besides x-*), for propagation tests.
_PROPAGATED = ("grpc-previous-rpc-attempts", "traceparent", "tracestate", "baggage")


class BoomError(Exception):
    """An unexpected failure carrying internals that must never reach a client."""


def _seen() -> dict[str, str]:
    call = current_call()
    if call is None:
        return {"call": "none"}
    seen = {
        "method": call.method.full,
        "service": call.method.qualified_service,
        "side": call.side.value,
        "deadline": "yes" if call.deadline is not None else "no",
    }
    for key, value in call.metadata:
        if key.startswith("x-") or key in _PROPAGATED:
            seen[key] = value if isinstance(value, str) else value.hex()
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        seen["trace_id"] = format(span.trace_id, "032x")
    return seen


def _maybe_fail(fail: str) -> None:
    if fail == "boom":
        raise BoomError("secret-internal-detail at /srv/app.py:42")
    if fail == "not-found":
        raise tether.NotFound("no such thing")
    if fail == "exhausted":
        raise tether.ResourceExhausted("slow down", retry_after=1.5)


class EchoServicer(echo_pb2_grpc.EchoServicer):
    """Echo, with failures on request and a call that waits for a release signal.

    Args:
        label: names this instance in every reply's ``seen["instance"]``, so tests that run
            several instances can tell which one answered.
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        #: The app serving this servicer: "via:" requests call onwards through its clients.
        self.app: tether.App | None = None
        self.release = asyncio.Event()
        self.holding = 0  # Hold calls waiting for the release right now
        self.says = 0  # Say calls whose handler ran
        self.cancelled = 0  # calls whose handler was cancelled ("slow:<seconds>" outlived)

    def _seen(self) -> dict[str, str]:
        seen = _seen()
        if self.label:
            seen["instance"] = self.label
        return seen

    def _maybe_unavailable(self, fail: str) -> None:
        # "unavailable:<label>" fails on that instance only, so a retry elsewhere succeeds.
        if self.label and fail == f"unavailable:{self.label}":
            raise tether.Unavailable(f"instance {self.label} is unavailable")

    async def _relay(self, request: Any) -> Any:
        """``fail="via:b,c"``: call service b (which calls c) through this app's client, and log
        from the handler, a task it starts, and two threads (helper and bound target)."""
        assert self.app is not None, "relaying needs build_app()"
        hops = request.fail.removeprefix("via:").split(",")
        onward = ",".join(hops[1:])
        log.info("relaying", to=hops[0])

        async def in_task() -> None:
            log.info("relay task")

        await asyncio.create_task(in_task())
        await tether.to_thread(log.info, "relay thread")
        worker = threading.Thread(target=tether.in_context(log.info), args=("relay bound thread",))
        worker.start()
        await tether.to_thread(worker.join)
        stub = echo_pb2_grpc.EchoStub(self.app.client(hops[0]))
        reply = await stub.Say(
            echo_pb2.SayRequest(text=request.text, fail=f"via:{onward}" if onward else "")
        )
        seen = self._seen()
        seen.update({f"{hops[0]}.{k}": v for k, v in reply.seen.items()})
        return echo_pb2.SayReply(text=reply.text, seen=seen)

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.says += 1
        if request.fail.startswith("via:"):
            return await self._relay(request)
        _maybe_fail(request.fail)
        if request.fail.startswith("slow:"):
            # "slow:<seconds>": a handler that takes that long, unless it is cancelled first.
            try:
                await asyncio.sleep(float(request.fail.removeprefix("slow:")))
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self._maybe_unavailable(request.fail)
        if request.fail == "abort":
            await context.abort(tether.InvalidArgument.code, "aborted by servicer")
        log.info("say", text=request.text)
        return echo_pb2.SayReply(text=request.text, seen=self._seen())

    async def Hold(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._maybe_unavailable(request.fail)
        _maybe_fail(request.fail)
        log.info("hold started")
        self.holding += 1
        try:
            await self.release.wait()
        finally:
            self.holding -= 1
        log.info("hold released")
        return echo_pb2.SayReply(text=request.text, seen=self._seen())

    async def Split(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        for i, word in enumerate(request.text.split()):
            if i == 1:
                _maybe_fail(request.fail)
            yield echo_pb2.SayReply(text=word, seen=self._seen())

    async def Join(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        texts = []
        async for request in request_iterator:
            _maybe_fail(request.fail)
            texts.append(request.text)
        return echo_pb2.SayReply(text=" ".join(texts), seen=self._seen())

    async def Chat(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for request in request_iterator:
            _maybe_fail(request.fail)
            yield echo_pb2.SayReply(text=request.text, seen=self._seen())


def build_app(
    config: tether.TetherConfig | None = None,
    servicer: EchoServicer | None = None,
    registry: Registry | None = None,
    tracing: Tracing | None = None,
) -> tether.App:
    """An App serving Echo (``servicer``, or one labelled with the instance id).

    SIGUSR1 releases every held call.
    """
    app = tether.App(config, registry=registry, tracing=tracing)
    servicer = servicer or EchoServicer(label=app.instance_id)
    servicer.app = app
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)

    @app.after_start
    async def release_on_sigusr1(_: tether.App) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, servicer.release.set)

    return app


if __name__ == "__main__":
    tether.App.main(build_app)
