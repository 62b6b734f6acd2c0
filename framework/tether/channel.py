"""The governed outbound channel: every call runs the client chain, then is balanced over instances.

grpcio takes no custom resolver, and a ``grpc.aio`` interceptor's continuation is bound to one
channel, so a per-attempt choice of instance cannot live under interceptors. :class:`Channel`
therefore implements the part of the ``grpc.aio.Channel`` API that generated stubs use and runs
the chain itself. Its terminal handler picks a :class:`~tether.subchannel.Subchannel` (one real
``grpc.aio`` channel per instance address) with a :class:`~tether.balancer.Balancer` and sends
the attempt there. Membership comes from a :class:`~tether.registry.base.Discovery` watch, or
from a static ``host:port`` list.

This is the client half of the gRPC adapter (``interceptors.py`` is the server half): the call
context is built here, ``AioRpcError`` becomes ``RemoteError`` inside the chain and a
``TetherError`` leaving the chain becomes ``AioRpcError`` for the caller, who keeps the
``grpc.aio`` experience (await the call, read its code, details and metadata; the call objects
are in :mod:`tether.calls`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType, TracebackType
from typing import Any, cast

import grpc
from grpc.aio import AioRpcError

from tether.balancer import Balancer, P2CBalancer, RoundRobinBalancer
from tether.calls import Invocation, MethodSpec, make_multicallable, method_spec, to_aio_error
from tether.config import ClientConfig
from tether.context import CallContext, Metadata, Side, _current, detached_task
from tether.errors import DeadlineExceeded, RemoteError, TetherError, Unavailable
from tether.interceptors import EXEMPT_SERVICES, UNPROCESSED_TRAILER
from tether.log import get_logger
from tether.middleware import Handler, Middleware, chain
from tether.registry.base import DEFAULT_WEIGHT, Discovery, WatchClosed, Watcher
from tether.subchannel import Subchannel
from tether.tracing import note_peer

__all__ = ["DISCOVERY_SCHEME", "Channel"]

_log = get_logger("tether.channel")

#: Targets of the form ``discovery:///name`` follow the instances of service ``name``.
DISCOVERY_SCHEME = "discovery:///"

_READY = grpc.ChannelConnectivity.READY
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# What grpcio 1.85 says when a call failed because no connection could be made, so the request
# never left this process: "failed to connect to all addresses; last error: UNKNOWN:
# ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused", and for a name that
# does not resolve "errors resolving host:port: ...". A server killed mid-call gives
# "Stream removed (Socket closed)" or "Stream removed (recvmsg:Connection reset by peer (104))":
# the request was sent, so those stay sent.
_NOT_SENT_PREFIXES = ("failed to connect to all addresses", "errors resolving ")


# --------------------------------------------------------------------------- the terminal

#: The per-call state of the call running in this task, for the terminal handler.
_invocation: ContextVar[Invocation] = ContextVar("tether_invocation")


def _remote_error(subchannel: Subchannel, exc: AioRpcError) -> RemoteError:
    """Map a failed attempt into the chain, ejecting the subchannel on UNAVAILABLE."""
    code = exc.code()
    details = exc.details() or ""
    trailers = tuple(cast(Metadata, exc.trailing_metadata() or ()))
    sent = True
    if code is _UNAVAILABLE:
        subchannel.eject()
        # Never connected, or refused by a tether server shutting down before any handler ran.
        sent = not (
            details.startswith(_NOT_SENT_PREFIXES)
            or any(key == UNPROCESSED_TRAILER for key, _ in trailers)
        )
    return RemoteError(code, details, trailing_metadata=trailers, sent=sent)


async def _relay(call: Any, subchannel: Subchannel) -> AsyncIterator[Any]:
    """A response stream as the chain sees it: peer failures arrive as RemoteError."""
    try:
        async for message in call:
            yield message
    except AioRpcError as exc:
        raise _remote_error(subchannel, exc) from exc


# --------------------------------------------------------------------------- the channel


class Channel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` for generated stubs that balances calls over many instances.

    Every call runs the client middleware chain; the terminal picks an instance for each
    attempt, avoiding the instances this call already tried, and sends the attempt there with
    the remaining deadline. Background work starts with the first call (or
    :meth:`channel_ready`), so a channel may be made outside a running event loop.

    Args:
        target: ``host:port``, a comma-separated list of them, or ``discovery:///name``.
        discovery: where ``discovery:///`` targets are looked up.
        config: client settings (default deadline, balancer); ``ClientConfig()`` if None.
        middleware: the client chain, outermost first.
        options: extra grpc channel options for every subchannel.
        credentials: TLS credentials; insecure if None.
        balancer: the pick policy; made from ``config.balancer`` if None.
        on_members: called with the number of instances after each membership update
            (metrics); must not raise or block.

    Raises:
        ValueError: the target is empty, or names discovery without a ``discovery``.
    """

    def __init__(
        self,
        target: str,
        *,
        discovery: Discovery | None = None,
        config: ClientConfig | None = None,
        middleware: Sequence[Middleware] = (),
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        balancer: Balancer | None = None,
        on_members: Callable[[int], None] | None = None,
    ) -> None:
        cfg = config or ClientConfig()
        self._target = target
        self._service, self._static = _parse_target(target, discovery)
        self._discovery = discovery
        self._timeout = cfg.timeout_seconds
        self._balancer: Balancer = balancer or (
            P2CBalancer() if cfg.balancer == "p2c" else RoundRobinBalancer()
        )
        self._options = tuple(options)
        self._credentials = credentials
        wrap = chain(middleware)
        self._unary: Handler = wrap(self._send_unary)
        self._stream: Handler = wrap(self._send_stream)
        self._subchannels: dict[str, Subchannel] = {}
        self._endpoints: tuple[Subchannel, ...] = ()
        self._retiring: dict[Subchannel, asyncio.Task[None]] = {}
        self._started = False
        self._closed = False
        self._resolved = asyncio.Event()
        self._changed = asyncio.Event()
        self._watch_error: str | None = None
        self._follower: asyncio.Task[None] | None = None
        self._watcher: Watcher | None = None
        self._on_members = on_members

    # ----------------------------------------------------------------- inspection

    @property
    def target(self) -> str:
        """What was dialled."""
        return self._target

    @property
    def subchannels(self) -> Mapping[str, Subchannel]:
        """The current members by address (a read-only snapshot)."""
        return MappingProxyType(dict(self._subchannels))

    # ----------------------------------------------------------------- grpc.aio.Channel API

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        """A callable for a unary-unary method, as ``grpc.aio.Channel.unary_unary``."""
        spec = method_spec(
            "unary_unary", method, request_serializer, response_deserializer, _registered_method
        )
        return make_multicallable(self, spec)  # type: ignore[no-any-return]

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        """A callable for a server-streaming method."""
        spec = method_spec(
            "unary_stream", method, request_serializer, response_deserializer, _registered_method
        )
        return make_multicallable(self, spec)  # type: ignore[no-any-return]

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        """A callable for a client-streaming method."""
        spec = method_spec(
            "stream_unary", method, request_serializer, response_deserializer, _registered_method
        )
        return make_multicallable(self, spec)  # type: ignore[no-any-return]

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        """A callable for a bidirectional-streaming method."""
        spec = method_spec(
            "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )
        return make_multicallable(self, spec)  # type: ignore[no-any-return]

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY if any instance is connected, else the most hopeful state among them.

        Args:
            try_to_connect: start connecting (the first call does so as well).
        """
        if self._closed:
            return _SHUTDOWN
        if try_to_connect:
            self._start()
        states = {sub.state for sub in self._endpoints}
        for state in (
            _READY,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        ):
            if state in states:
                return state
        return grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Return once :meth:`get_state` differs from ``last_observed_state``."""
        while self.get_state() == last_observed_state:
            await self._changed.wait()

    async def channel_ready(self) -> None:
        """Wait until at least one instance is connected; wrap in ``asyncio.timeout`` to bound it.

        Raises:
            grpc.aio.UsageError: the channel was closed while waiting.
        """
        self._start()
        while (state := self.get_state()) is not _READY:
            if state is _SHUTDOWN:
                raise grpc.aio.UsageError("the channel was closed")
            await self._changed.wait()

    async def close(self, grace: float | None = None) -> None:
        """Stop every background task and close every subchannel; safe to call twice.

        Args:
            grace: seconds in-flight calls may take to finish; None cancels them at once.
        """
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
        # Taken first: a cancelled retirement drops its subchannel from _retiring as it ends.
        subchannels = [*self._subchannels.values(), *self._retiring]
        tasks = [t for t in (self._follower, *self._retiring.values()) if t is not None]
        self._subchannels, self._endpoints = {}, ()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await asyncio.gather(*(sub.close(grace) for sub in subchannels))
        self._resolved.set()  # calls still waiting for discovery fail now
        self._notify()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------- running a call

    def _context(self, spec: MethodSpec, timeout: float | None, metadata: Any) -> CallContext:
        # The caller's timeout, if any: the deadline middleware of the chain applies the
        # per-method default and the inbound call's deadline; the terminal applies
        # client.timeout_seconds to a unary-response call that still has none.
        deadline = None if timeout is None else time.monotonic() + timeout
        if not metadata:
            pairs: Metadata = ()
        elif type(metadata) is tuple:
            pairs = metadata
        else:
            pairs = tuple(metadata)  # grpc.aio.Metadata iterates as (key, value) pairs
        parent = _current.get()
        if parent is not None and parent.side is Side.CLIENT:
            parent = parent.parent  # a call made inside another call's client chain
        return CallContext(
            method=spec.name,
            side=Side.CLIENT,
            metadata=pairs,
            deadline=deadline,
            peer=self._target,
            request_streaming=spec.request_streaming,
            response_streaming=spec.response_streaming,
            parent=parent,
        )

    async def _run(self, ctx: CallContext, inv: Invocation, request: Any) -> Any:
        """Run one call through the chain, with its context bound; errors leave as AioRpcError.

        Health and reflection calls skip the chain (but are still balanced), as they do on the
        server: probes are not traffic, and a probe loop waiting for a starting server must
        not trip a breaker or drain a limiter.
        """
        handler: Handler
        if ctx.method.qualified_service in EXEMPT_SERVICES:
            handler = self._send_stream if inv.spec.response_streaming else self._send_unary
        else:
            handler = self._stream if inv.spec.response_streaming else self._unary
        token = _current.set(ctx)
        inv_token = _invocation.set(inv)
        try:
            return await handler(request)
        except TetherError as err:
            raise to_aio_error(err) from None
        finally:
            _invocation.reset(inv_token)
            _current.reset(token)

    def _pick(self, inv: Invocation) -> Subchannel:
        """Choose the subchannel for this attempt among the members known now."""
        if self._closed:
            raise grpc.aio.UsageError("the channel is closed")
        if inv.cancelled:
            raise asyncio.CancelledError
        sub = self._balancer.pick(self._endpoints, inv.tried)
        if sub is None:
            raise Unavailable(
                f"no instances of {self._service!r}"
                + (f" ({self._watch_error})" if self._watch_error else "")
            )
        inv.tried.add(sub.address)
        return sub

    async def _wait_resolved(self, ctx: CallContext) -> None:
        """Wait for discovery's first answer, within the call's deadline."""
        self._start()
        try:
            async with asyncio.timeout_at(_loop_deadline(ctx.deadline)):
                await self._resolved.wait()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no instances of {self._service!r} were discovered before the deadline"
            ) from None
        if self._closed:
            raise grpc.aio.UsageError("the channel is closed")

    async def _send_unary(self, request: Any) -> Any:
        """Terminal for unary responses: pick, send with the remaining deadline, map failures."""
        inv = _invocation.get()
        ctx = _current.get()
        assert ctx is not None
        if ctx.deadline is None:
            # A chain without the deadline middleware still sends no call without a deadline.
            ctx = ctx.replace(deadline=time.monotonic() + self._timeout)
        if not self._resolved.is_set():
            await self._wait_resolved(ctx)
        sub = self._pick(inv)
        note_peer(sub.address)
        timeout = _remaining(ctx)
        sub.in_flight += 1
        try:
            call = sub.multicallable(inv.spec)(
                request,
                timeout=timeout,
                metadata=ctx.metadata,
                credentials=inv.credentials,
                wait_for_ready=inv.wait_for_ready,
                compression=inv.compression,
            )
            inv.call = call
            response = await call
        except AioRpcError as exc:
            raise _remote_error(sub, exc) from exc
        finally:
            sub.finished_one()
        inv.response = response
        return response

    async def _send_stream(self, request: Any) -> Any:
        """Terminal for streamed responses: as :meth:`_send_unary`, never retried."""
        inv = _invocation.get()
        ctx = _current.get()
        assert ctx is not None
        if not self._resolved.is_set():
            await self._wait_resolved(ctx)
        sub = self._pick(inv)
        note_peer(sub.address)
        timeout = _remaining(ctx)
        sub.in_flight += 1
        try:
            call = sub.multicallable(inv.spec)(
                request,
                timeout=timeout,
                metadata=ctx.metadata,
                credentials=inv.credentials,
                wait_for_ready=inv.wait_for_ready,
                compression=inv.compression,
            )
        except BaseException:
            sub.finished_one()
            raise
        call.add_done_callback(lambda _: sub.finished_one())
        inv.call = call
        inv.response = stream = _relay(call, sub)
        return stream

    # ----------------------------------------------------------------- membership

    def _start(self) -> None:
        """Begin following membership (needs a running loop); does nothing after the first call."""
        if self._started or self._closed:
            return
        self._started = True
        if self._static is not None:
            self._apply({address: DEFAULT_WEIGHT for address in self._static})
            return
        assert self._discovery is not None and self._service is not None
        self._watcher = self._discovery.watch(self._service)
        self._follower = detached_task(
            self._follow(self._watcher), name=f"tether discovery {self._service}"
        )

    async def _follow(self, watcher: Watcher) -> None:
        try:
            while True:
                instances = await watcher.next()
                weights: dict[str, int] = {}
                for instance in instances:
                    weights.setdefault(instance.address, instance.weight)
                self._apply(weights)
        except WatchClosed:
            if not self._closed:
                self._watch_error = "the discovery watch was closed"
                _log.warning("discovery watch closed", dependency=self._service)
        except Exception as exc:  # a backend failure must not kill calls silently
            self._watch_error = f"discovery failed: {type(exc).__name__}"
            _log.error("discovery watch failed", dependency=self._service, exc_info=exc)
        finally:
            watcher.close()
            # Keep the last membership (never empty it because discovery stopped), but let
            # calls waiting for a first answer fail instead of waiting out their deadline.
            self._resolved.set()

    def _apply(self, weights: Mapping[str, int]) -> None:
        """Make the members exactly ``weights``' addresses; unchanged ones keep their connection."""
        if self._closed:
            return
        current = self._subchannels
        members: dict[str, Subchannel] = {}
        for address, weight in weights.items():
            sub = current.get(address)
            if sub is None:
                sub = Subchannel(
                    address,
                    weight=weight,
                    options=self._options,
                    credentials=self._credentials,
                    on_change=self._notify,
                )
            else:
                sub.weight = weight
            members[address] = sub
        gone = [sub for address, sub in current.items() if address not in members]
        # Removed instances stop receiving picks now; their calls in flight finish first.
        self._subchannels = members
        self._endpoints = tuple(members.values())
        if self._on_members is not None:
            self._on_members(len(members))
        for sub in gone:
            task = detached_task(sub.retire(), name=f"tether retire {sub.address}")
            self._retiring[sub] = task
            task.add_done_callback(lambda _, sub=sub: self._retiring.pop(sub, None))  # type: ignore[misc]
        self._resolved.set()
        self._notify()
        added = [address for address in members if address not in current]
        if added or gone:
            _log.info(
                "instances changed",
                target=self._target,
                added=added,
                removed=[sub.address for sub in gone],
                now=len(members),
            )

    def _notify(self) -> None:
        """Wake everything waiting for a state or membership change."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _parse_target(target: str, discovery: Discovery | None) -> tuple[str, list[str] | None]:
    """Return the service name and, for a static target, its addresses."""
    if target.startswith(DISCOVERY_SCHEME):
        service = target[len(DISCOVERY_SCHEME) :]
        if not service or "/" in service:
            raise ValueError(f"target {target!r} must be discovery:///<service name>")
        if discovery is None:
            raise ValueError(f"target {target!r} needs a discovery (pass discovery=...)")
        return service, None
    addresses = [part.strip() for part in target.split(",")]
    if not target.strip() or not all(addresses):
        raise ValueError(
            f"target {target!r} must be host:port, a comma-separated list of them, "
            "or discovery:///<service name>"
        )
    return target, addresses


def _loop_deadline(deadline: float | None) -> float | None:
    """A ``time.monotonic()`` deadline on the event loop's clock."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _remaining(ctx: CallContext) -> float | None:
    """Seconds left for the attempt; refuse locally once the deadline has passed."""
    if ctx.deadline is None:
        return None
    left = ctx.deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded before the call was sent")
    return left
