"""The service lifecycle: build the governed server, serve, shut down without dropping a call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, overload

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from tether.access_log import log_calls
from tether.admission import admit
from tether.channel import Channel
from tether.client import dial
from tether.config import ServerConfig, TetherConfig, load_config
from tether.deadline import enforce_deadline
from tether.errors import ConfigError, ConfigProblem, RegistryUnavailable
from tether.fallback import FallbackFn, Fallbacks
from tether.health import SERVING, HealthService
from tether.interceptors import ChainServerInterceptor
from tether.log import configure_logging, get_logger
from tether.metrics import Metrics, MetricsEndpoint, observe_server, serve_metrics
from tether.middleware import Middleware
from tether.recovery import recover
from tether.registry import Instance, Registry, registry_from_config
from tether.tls import ClientTls, client_tls, server_credentials
from tether.tracing import SpanEvents, Tracing, trace_server
from tether.workers import registered_instance_id, serve_in_workers

__all__ = ["App", "Hook", "default_server_middleware"]

_log = get_logger("tether.app")

#: Largest inbound metadata (headers) a server accepts, as gRPC counts it: name + value + 32
#: bytes per entry. gRPC's own defaults refuse a call at random between a soft limit (8 KiB)
#: and a hard one (16 KiB); both are set to 16 KiB so the outcome is decided by size alone:
#: at or under, served; over, RESOURCE_EXHAUSTED before any tether code runs.
MAX_METADATA_BYTES = 16 * 1024

#: Least time a stopping server refuses new calls before ``server.stop()`` (within the grace
#: period). A caller that cannot see the instance leave (cut off from the registry, or dialling
#: a fixed address) learns it from a refusal, which tether clients send again elsewhere and
#: which takes the instance out of their rotation; calls that race ``server.stop()`` itself
#: are cancelled by grpc-core, and nothing tells a client whether those ran.
_REFUSE_SECONDS = 0.1

_Stub = TypeVar("_Stub")

#: A fallback function, as :meth:`App.fallback` declares it.
_Fn = TypeVar("_Fn", bound=FallbackFn)

#: A lifecycle hook: an async function given the app.
Hook = Callable[["App"], Awaitable[None]]

#: What grpcio-tools generates as ``add_FooServicer_to_server``.
AddServicer = Callable[[Any, Any], None]


def default_server_middleware(
    config: TetherConfig, metrics: Metrics | None = None, tracing: Tracing | None = None
) -> list[Middleware]:
    """The server chain every tether service runs, outermost first.

    This literal list is the one place the order is decided: call metrics (with ``metrics``)
    outermost, so they count the status the caller gets, INTERNAL from recovery included;
    tracing next, so the call's span and trace context cover everything inside (every log
    line below carries its ``trace_id``); the access log and slow-call warning
    (``logging.access_log``, ``slow_call_seconds``), which also see recovery's status;
    recovery, so nothing escapes as a stack trace; the deadline check before admission, so an
    expired call takes no slot; admission control last, around the handler.

    Args:
        config: the service's configuration.
        metrics: where :func:`~tether.metrics.observe_server` records calls; none if None.
        tracing: the spans' pipeline (an App's ``app.tracing``); if None, the inbound trace
            context is still bound for logs and outbound calls, and no span is recorded.

    Returns:
        A new list; callers may extend it.
    """

    def admission_refused(method: str, limit: str) -> None:
        SpanEvents.admission_refused(method, limit)
        if metrics is not None:
            metrics.admission_rejected(method, limit)

    return [
        *([] if metrics is None else [observe_server(metrics)]),
        trace_server(tracing if tracing is not None else Tracing()),
        log_calls(config.logging),
        recover,
        enforce_deadline,
        admit(config.server.admission, on_reject=admission_refused),
    ]


class _RecordingServer:
    """Stands in for the server while a servicer registers, to learn the services it adds."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name):
                self.services.append(name())
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.services.append(service)
        # grpcio >= 1.63 generates this call; grpc-stubs does not know it yet.
        getattr(self._server, "add_registered_method_handlers")(service, handlers)  # noqa: B009

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class App:
    """One gRPC service: its config, its servicers, its server chain and its lifecycle.

    Start-up: ``before_start`` hooks, fallbacks checked (:attr:`fallbacks`), server bound and
    started, health SERVING,
    ``after_start`` hooks, then the instance registers in the registry.
    Shutdown (SIGTERM, SIGINT, or :meth:`stop`): health NOT_SERVING, the instance deregisters
    (watchers see it leave at once), ``before_stop`` hooks, ``server.drain_seconds`` of drain so
    callers route away, new calls refused with UNAVAILABLE while in-flight ones finish within
    ``server.grace_seconds`` (and for at least 0.1 s of it), ``server.stop()``, ``after_stop``
    hooks, the registry closes, and the spans still buffered are exported. A second SIGINT
    (Ctrl-C) skips what is left of the drain and grace period; a repeated SIGTERM is ignored.

    Args:
        config: the service's configuration; loaded with :func:`tether.load_config` if omitted.
        middleware: the server chain; :func:`default_server_middleware` if omitted.
        registry: where to register and discover; by default the one ``registry.backend``
            names, which the app closes when it stops. A registry passed in (for example one
            :class:`~tether.registry.MemoryRegistry` shared by several apps) is left open.
        tracing: where spans go; by default :class:`~tether.tracing.Tracing` built from the
            ``tracing`` section, named after the service. Flushed when the app stops.

    With ``metrics.enabled``, :attr:`metrics` records the server chain (when ``middleware`` is
    omitted), every ``app.client()`` channel and the registration, and :meth:`start` serves
    them at ``http://metrics.host:metrics.port/metrics`` until the app stops.
    """

    def __init__(
        self,
        config: TetherConfig | None = None,
        *,
        middleware: Sequence[Middleware] | None = None,
        registry: Registry | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config if config is not None else load_config()
        self._owns_registry = registry is None
        self.registry: Registry | None = (
            registry if registry is not None else registry_from_config(self.config.registry)
        )
        self.instance: Instance | None = None
        #: This app's Prometheus metrics; None when ``metrics.enabled`` is false.
        self.metrics: Metrics | None = Metrics() if self.config.metrics.enabled else None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._clients: dict[str, Channel] = {}
        self.instance_id = self.config.service.instance_id or _new_instance_id(
            self.config.service.name
        )
        #: This app's tracing: its spans' pipeline and the trace context its calls carry.
        self.tracing = (
            tracing
            if tracing is not None
            else Tracing.for_service(
                self.config.tracing,
                service=self.config.service.name,
                version=self.config.service.version,
                instance_id=self.instance_id,
            )
        )
        self.middleware: tuple[Middleware, ...] = tuple(
            default_server_middleware(self.config, self.metrics, self.tracing)
            if middleware is None
            else middleware
        )
        self.health = HealthService()
        #: Fallbacks of the methods this service calls; checked against the protos at start-up.
        self.fallbacks = Fallbacks()
        self.services: list[str] = []
        self._servicers: list[tuple[AddServicer, object]] = []
        self._hooks: dict[str, list[Hook]] = {
            "before_start": [],
            "after_start": [],
            "before_stop": [],
            "after_stop": [],
        }
        self._server: grpc.aio.Server | None = None
        # TLS material, read from its files once (see _load_tls); "" keys client.tls itself.
        self._tls_loaded = False
        self._server_credentials: grpc.ServerCredentials | None = None
        self._client_tls: dict[str, ClientTls | None] = {}
        self._interceptor: ChainServerInterceptor | None = None
        self._port: int | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()
        self._hurried: asyncio.Future[None] | None = None

    # ----------------------------------------------------------------- building

    def add_servicer(self, add_to_server: AddServicer, servicer: object) -> None:
        """Serve ``servicer``, registered with the ``add_XServicer_to_server`` grpcio-tools made."""
        if self._server is not None:
            raise RuntimeError("add servicers before the app starts")
        self._servicers.append((add_to_server, servicer))

    def before_start(self, hook: Hook) -> Hook:
        """Register ``hook`` to run before the server binds; usable as a decorator."""
        self._hooks["before_start"].append(hook)
        return hook

    def after_start(self, hook: Hook) -> Hook:
        """Register ``hook`` to run once the server is serving and healthy."""
        self._hooks["after_start"].append(hook)
        return hook

    def before_stop(self, hook: Hook) -> Hook:
        """Register ``hook`` to run right after health goes NOT_SERVING, before the drain."""
        self._hooks["before_stop"].append(hook)
        return hook

    def after_stop(self, hook: Hook) -> Hook:
        """Register ``hook`` to run after the server stopped (flush, close clients)."""
        self._hooks["after_stop"].append(hook)
        return hook

    @overload
    def fallback(
        self, method: str, *, returns: type[Message] | None = None
    ) -> Callable[[_Fn], _Fn]: ...

    @overload
    def fallback(self, method: str, fn: _Fn, *, returns: type[Message] | None = None) -> _Fn: ...

    @overload
    def fallback(self, method: str, *, response: str | Message) -> None: ...

    def fallback(
        self,
        method: str,
        fn: FallbackFn | None = None,
        *,
        response: str | Message | None = None,
        returns: type[Message] | None = None,
    ) -> Any:
        """Declare the fallback of a method this service calls; usable as a decorator.

        ``@app.fallback("users.v1.Users/Get")`` over ``def get(request, error) -> User``, or
        ``app.fallback("users.v1.Users/Get", response='name: "unknown"')``. Checked against the
        proto when the app starts (see :meth:`tether.fallback.Fallbacks.add`).

        Args:
            method: ``package.Service/Method``.
            fn: ``fn(request, error) -> Output``, sync or async; omitted for the decorator.
            response: a fixed answer: an output message, or its protobuf text format.
            returns: the output class, for a function without a return annotation.

        Returns:
            ``fn``; the decorator when neither ``fn`` nor ``response`` is given; else None.
        """
        if fn is None and response is None:
            return self.fallbacks.method(method, returns=returns)
        self.fallbacks.add(method, fn, response=response, returns=returns)
        return fn

    @overload
    def client(self, service: str) -> Channel: ...

    @overload
    def client(self, service: str, stub: Callable[[Channel], _Stub]) -> _Stub: ...

    def client(self, service: str, stub: Callable[[Channel], Any] | None = None) -> Any:
        """A governed channel to ``service``, found through this app's registry, or a stub on it.

        ``app.client("users", users_pb2_grpc.UsersStub)`` gives a stub whose every method runs
        the client chain (deadline, fallback, breaker, limiter, retry, load balancing).
        One channel per service, made on first use and closed after the server stops (so
        handlers still running can finish their outbound calls).

        Args:
            service: the name the dependency registers under.
            stub: a generated stub class (or any callable taking the channel).

        Returns:
            The channel, or ``stub(channel)``.

        Raises:
            ConfigError: the app has no registry (``registry.backend: none``).
        """
        channel = self._clients.get(service)
        if channel is None:
            if self.registry is None:
                raise ConfigError(
                    [
                        ConfigProblem(
                            "registry.backend",
                            repr(self.config.registry.backend),
                            f"cannot discover {service!r}; use etcd or memory, or "
                            "tether.dial('host:port') for a fixed address",
                        )
                    ]
                )
            tls = self._tls_of(service)
            channel = dial(
                f"discovery:///{service}",
                discovery=self.registry,
                config=self.config.client,
                options=() if tls is None else tls.options,
                credentials=None if tls is None else tls.credentials,
                fallbacks=self.fallbacks,
                metrics=self.metrics,
                tracing=self.tracing,
            )
            self._clients[service] = channel
        return channel if stub is None else stub(channel)

    def _tls_of(self, service: str) -> ClientTls | None:
        """The TLS of calls to ``service`` (``client.tls`` unless it has an override), read once."""
        policy = self.config.client.services.get(service)
        key = service if policy is not None and policy.tls is not None else ""
        if key not in self._client_tls:
            field = f"client.services.{key}.tls" if key else "client.tls"
            self._client_tls[key] = client_tls(self.config.client.tls_for(key or None), field=field)
        return self._client_tls[key]

    def _load_tls(self) -> None:
        """Read and check every TLS file the configuration names, once per process.

        Raises:
            ConfigError: a file cannot be read, is not PEM, or a key is not its certificate's.
        """
        if self._tls_loaded:
            return
        self._server_credentials = server_credentials(self.config.server.tls)
        for service in ("", *self.config.client.services):
            self._tls_of(service)
        self._tls_loaded = True

    # ----------------------------------------------------------------- running

    @property
    def port(self) -> int:
        """The port the server is bound to (useful with ``server.port: 0``)."""
        if self._port is None:
            raise RuntimeError("the app has not started")
        return self._port

    @property
    def metrics_port(self) -> int:
        """The port the metrics endpoint is bound to (useful with ``metrics.port: 0``)."""
        if self._metrics_endpoint is None:
            raise RuntimeError("the app has not started, or metrics.enabled is false")
        return self._metrics_endpoint.port

    @property
    def target(self) -> str:
        """A loopback ``host:port`` a local client can dial."""
        host = self.config.server.host
        if host in ("0.0.0.0", "", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Build and start the server; returns once it is serving and marked SERVING.

        Raises:
            ConfigError: the configured address (or, with metrics enabled, the metrics
                address) cannot be bound, a fallback does not match its method's output
                type, or a TLS file (``server.tls``, ``client.tls``) cannot be used.
        """
        if self._server is not None:
            raise RuntimeError("the app has already started")
        cfg = self.config.server
        await self._run_hooks("before_start")
        self.fallbacks.check()
        self._load_tls()
        self._interceptor = interceptor = ChainServerInterceptor(self.middleware)
        server = grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
                # Off, so a port in use fails the bind; on for server.workers, which share it.
                ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        recorder = _RecordingServer(server)
        for add_to_server, servicer in self._servicers:
            add_to_server(servicer, recorder)
        self.services = list(dict.fromkeys(recorder.services))  # generated code adds each twice
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.serves_reflection:
            reflection.enable_server_reflection(
                (*self.services, "grpc.health.v1.Health", reflection.SERVICE_NAME), server
            )
        address = f"{cfg.host}:{cfg.port}"
        unbindable = ConfigError(
            [
                ConfigProblem(
                    "server.port",
                    repr(cfg.port),
                    f"cannot bind {address} (in use, or not permitted)",
                )
            ]
        )
        # Metrics bind first: a gRPC server that never started keeps its port until the
        # process ends, while the metrics endpoint can be closed if the gRPC bind fails.
        if self.metrics is not None:
            self._metrics_endpoint = self._serve_metrics(self.metrics)
        try:
            try:
                port = (
                    server.add_insecure_port(address)
                    if self._server_credentials is None
                    else server.add_secure_port(address, self._server_credentials)
                )
            except RuntimeError as exc:  # newer grpcio raises; older ones return 0
                raise unbindable from exc
            if port == 0:
                raise unbindable
        except ConfigError:
            if self._metrics_endpoint is not None:
                await self._metrics_endpoint.close()
                self._metrics_endpoint = None
            raise
        self._server = server
        self._port = port
        await server.start()
        for service in ("", *self.services):
            self.health.set(service, SERVING)
        _log.info(
            "serving",
            address=f"{cfg.host}:{port}",
            services=self.services,
            tls=_tls_mode(cfg),
            environment=self.config.service.environment,
            reflection=self.config.serves_reflection,
        )
        await self._run_hooks("after_start")
        await self._register()

    def _serve_metrics(self, metrics: Metrics) -> MetricsEndpoint:
        cfg = self.config.metrics
        try:
            return serve_metrics(metrics, host=cfg.host, port=cfg.port)
        except OSError as exc:
            field, value = (
                ("metrics.host", cfg.host)
                if isinstance(exc, socket.gaierror)
                else ("metrics.port", cfg.port)
            )
            raise ConfigError(
                [
                    ConfigProblem(
                        field,
                        repr(value),
                        f"cannot bind {cfg.host}:{cfg.port} for metrics (in use, not "
                        "permitted, or not an address of this machine)",
                    )
                ]
            ) from exc

    async def _register(self) -> None:
        instance_id = registered_instance_id(self.instance_id)  # None: another worker does
        if self.registry is None or instance_id is None:
            return
        svc = self.config.service
        self.instance = Instance(
            id=instance_id,
            service=svc.name,
            address=f"{advertised_host(self.config.server)}:{self.port}",
            version=svc.version,
            zone=svc.zone,
            weight=svc.weight,
            metadata=svc.metadata,
        )
        try:
            on_state = None if self.metrics is None else self.metrics.observe_registration
            await self.registry.register(self.instance, on_state=on_state)
        except RegistryUnavailable:
            self.instance = None
            await self.stop(drain=0, grace=0)
            raise

    async def stop(self, *, drain: float | None = None, grace: float | None = None) -> None:
        """Shut down in order; safe to call more than once (later calls wait for the first).

        Args:
            drain: seconds between NOT_SERVING and stopping the server; config if None.
            grace: seconds in-flight calls may take to finish; config if None.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown(drain, grace))
        await asyncio.shield(self._stopping)

    async def _shutdown(self, drain: float | None, grace: float | None) -> None:
        cfg = self.config.server
        drain = cfg.drain_seconds if drain is None else drain
        grace = cfg.grace_seconds if grace is None else grace
        _log.info("stopping", drain_seconds=drain, grace_seconds=grace)
        self.health.shutdown()
        try:
            if self.registry is not None and self.instance is not None:
                await self.registry.deregister(self.instance)  # on_state hears it
            await self._run_hooks("before_stop")
            if drain > 0 and not self._hurry.is_set():
                # Time for balancers and watchers to route away; hurry() cuts it short.
                _log.info("draining", seconds=drain)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), drain)
            if self._server is not None:
                await self._finish_in_flight(grace)
            await self._run_hooks("after_stop")
            for channel in self._clients.values():
                await channel.close()
            if self.registry is not None and self._owns_registry:
                await self.registry.close()
        finally:
            await self.tracing.shutdown()  # the last spans, the shutdown's included
            if self._metrics_endpoint is not None:
                await self._metrics_endpoint.close()
            self._stopped.set()
        _log.info("stopped")

    async def _finish_in_flight(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace``, then stop the server."""
        assert self._server is not None and self._interceptor is not None
        interceptor = self._interceptor
        interceptor.refuse_new_calls()
        started = asyncio.get_running_loop().time()
        if not self._hurry.is_set():
            _log.info("refusing new calls", in_flight=interceptor.in_flight)
            idle = asyncio.ensure_future(interceptor.wait_idle())
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait((idle, hurry), timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            hurry.cancel()
            refusing = min(_REFUSE_SECONDS, grace) - (asyncio.get_running_loop().time() - started)
            if refusing > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), refusing)
        left = (
            0.0
            if self._hurry.is_set()
            else max(grace - (asyncio.get_running_loop().time() - started), 0.0)
        )
        _log.info("stopping server", grace_seconds=round(left, 3), in_flight=interceptor.in_flight)
        await self._server.stop(left)

    def hurry(self) -> None:
        """Cut a shutdown short: end the drain now and cancel calls still in flight."""
        self._hurry.set()
        if self._server is not None and self._stopping is not None:
            # Cancels calls still running if the server is already stopping with a grace period.
            self._hurried = asyncio.ensure_future(self._server.stop(0))

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()

    async def serve(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then shut down in order."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if not signalled.is_set():
                _log.info("signal received", signal=name)
                signalled.set()
            elif signum == signal.SIGINT:
                # A person pressing Ctrl-C again. A repeated SIGTERM is not: supervisors and
                # `timeout` may deliver one stop request twice (to the process and its group).
                _log.warning("second signal: stopping now", signal=name)
                self.hurry()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await self.start()
            await signalled.wait()
            await self.stop()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    def run(self) -> None:
        """Configure logging and serve until a signal; then return, so the process exits 0.

        With ``server.workers`` > 1 this process serves nothing itself: it starts the workers,
        forwards SIGTERM and SIGINT to them and exits with their status (:mod:`tether.workers`).

        Raises:
            SystemExit: with status 2 and the problems on stderr when start-up refuses the
                configuration (for example the port cannot be bound); with status 1 when
                ``registry.required`` is set and the registry did not answer.
        """
        cfg = self.config
        configure_logging(
            cfg.logging.level,
            cfg.log_format,
            static={"service": cfg.service.name, "instance_id": self.instance_id},
        )
        if self.tracing.provider is not None:
            # The process's own spans (opentelemetry.trace.get_tracer) join this pipeline.
            trace.set_tracer_provider(self.tracing.provider)
        try:
            self._load_tls()  # before any worker starts: a bad file is refused once, here
            status = serve_in_workers(self)  # None: this process serves
            if status is not None:
                raise SystemExit(status)
            asyncio.run(self.serve())
        except ConfigError as exc:
            print(f"{cfg.service.name}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except RegistryUnavailable as exc:
            print(f"{cfg.service.name}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    @classmethod
    def main(cls, factory: Callable[[], App]) -> None:
        """Entry point for ``python -m yourservice``: build the app with ``factory`` and run it.

        A configuration refused while building or starting exits with status 2 and the
        problems on stderr, never a traceback.
        """
        try:
            app = factory()
        except ConfigError as exc:
            print(f"{sys.argv[0]}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        app.run()

    async def _run_hooks(self, phase: str) -> None:
        for hook in self._hooks[phase]:
            await hook(self)


def advertised_host(server: ServerConfig) -> str:
    """The host peers dial: ``advertise_host``, else ``host``, else this machine's address."""
    if server.advertise_host:
        return server.advertise_host
    host = server.host
    if host not in ("0.0.0.0", "", "[::]", "::"):
        return f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _tls_mode(server: ServerConfig) -> str:
    """How the port is served, for the "serving" log line: plaintext, tls or mtls."""
    if not server.tls.enabled:
        return "plaintext"
    return "mtls" if server.tls.client_auth == "require" else "tls"


def _new_instance_id(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
