"""Scenarios 8 and 9: a dependency turns slow, or fails every call, and its caller stays up.

The dependency is the shop's ``users`` example as a real process (``python -m users``, its
code generated into a temporary directory), found through a real etcd. The caller, ``front``,
is an in-process tether App: its handler calls ``users.v1.Users/GetUser`` through
``app.client("users")``, the governed client chain under test, whose breaker state and
fallback counts the test reads straight from the App's metrics registry. The load comes from
plain ``grpc.aio`` clients of ``front`` over loopback, so latency is measured as front's own
callers see it.

- Scenario 8: a TCP proxy between front and users (registered in etcd as users' only
  instance) starts delaying every byte. Front's deadline for users cuts each slow call short,
  the proto's fallback answers, the breaker opens and later calls are answered at once.
- Scenario 9: users answers UNAVAILABLE to every call (``UsersAdmin/SetFault``). The breaker
  opens, the fallback answers; users heals right after a failed probe (the worst moment), and
  the breaker must close within its reset timeout plus one probe call.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.figures import Figures
from support.processes import EchoProcess

import tether
from tether.codegen import compile_protos
from tether.config import RegistryConfig
from tether.registry import EtcdRegistry, Instance
from tether.testing import EtcdServer, TcpProxy, eventually, loopback_config, running

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "users"
GET_USER = "users.v1.Users/GetUser"
WAIT = 20.0  # bound on start-up waits; a healthy run needs a second or two
CALL_TIMEOUT = 5.0  # front's callers wait this long: longer than anything front should take
PACE = 0.02  # each load worker's pause between calls (4 workers: at most about 200 calls/s)


# --------------------------------------------------------------------------- the users service


@dataclass(frozen=True)
class UsersCode:
    """The users example, its protos compiled, in a directory of its own."""

    root: Path
    pb: ModuleType
    pb_grpc: ModuleType


@pytest.fixture(scope="module")
def users_code(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UsersCode]:
    """Copy ``examples/users``' package, generate its gRPC code there, and import it.

    A copy, so the test never writes into the example (the demo generates code there too).
    The generated modules are imported into this process for front's stub and the admin
    stub, and removed from ``sys.modules`` and ``sys.path`` afterwards.
    """
    root = tmp_path_factory.mktemp("users-example")
    package = root / "users"
    package.mkdir()
    for name in ("__init__.py", "__main__.py", "service.py"):
        shutil.copy(EXAMPLE / "users" / name, package / name)
    proto = EXAMPLE / "proto"
    compile_protos(sorted(proto.rglob("*.proto")), root, proto_path=proto)
    sys.path.insert(0, str(root))
    try:
        from users.v1 import users_pb2, users_pb2_grpc

        yield UsersCode(root, users_pb2, users_pb2_grpc)
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "users" or n.startswith("users.")]:
            del sys.modules[name]


async def start_users(
    code: UsersCode, directory: Path, instance_id: str, *, etcd_endpoint: str | None
) -> EchoProcess:
    """``python -m users`` on a free loopback port; registered in etcd when an endpoint is given.

    Returns once it serves (and registered); the returned handle stops or kills it.
    """
    registry = (
        f"registry: {{backend: etcd, endpoints: ['{etcd_endpoint}'], ttl_seconds: 5}}\n"
        if etcd_endpoint
        else "registry: {backend: none}\n"
    )
    config = directory / f"{instance_id}.yaml"
    config.write_text(
        f"service: {{name: users, instance_id: {instance_id}}}\n"
        "server: {host: 127.0.0.1, port: 0, drain_seconds: 0, grace_seconds: 5}\n"
        f"{registry}"
        "metrics: {enabled: false}\n"
        "logging: {format: json}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_CONFIG"] = str(config)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code.root), env.get("PYTHONPATH")) if p)
    log_path = directory / f"{instance_id}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "users",
            cwd=code.root,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    process = EchoProcess(proc, log_path, instance_id)
    try:
        process.target = (await process.wait_for_log("serving", timeout=WAIT))["address"]
        if etcd_endpoint:
            await process.wait_for_log("registered", timeout=WAIT)
    except BaseException:
        await process.kill()
        raise
    return process


async def stop_process(process: EchoProcess) -> None:
    """SIGTERM and wait; SIGKILL if it does not exit in time."""
    try:
        await process.stop(timeout=WAIT)
    except TimeoutError:
        await process.kill()


# --------------------------------------------------------------------------- the caller


class Front(echo_pb2_grpc.EchoServicer):
    """Answers ``Say(text=<user id>)`` with the user's name, from users (or its fallback)."""

    def __init__(self, users: Any, code: UsersCode) -> None:
        self._users = users
        self._pb = code.pb

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        user = await self._users.GetUser(self._pb.GetUserRequest(id=request.text))
        return echo_pb2.SayReply(
            text=user.name, seen={"degraded": "yes" if user.degraded else "no"}
        )


def front_app(
    code: UsersCode, etcd: EtcdServer, *, timeout: float, fail_max: int, reset: float
) -> tether.App:
    """The caller: registered in etcd, finding users there, with metrics to read the breaker."""
    config = loopback_config(
        "front",
        registry={"backend": "etcd", "endpoints": [etcd.endpoint], "ttl_seconds": 5},
        metrics={"enabled": True, "host": "127.0.0.1", "port": 0},
        client={
            "services": {
                "users": {
                    "timeout_seconds": timeout,
                    "breaker": {"fail_max": fail_max, "reset_timeout_seconds": reset},
                }
            }
        },
    )
    app = tether.App(config)
    users = app.client("users", code.pb_grpc.UsersStub)
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, Front(users, code))
    return app


def metric(app: tether.App, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in the app's registry whose labels include ``labels``."""
    assert app.metrics is not None
    total = 0.0
    for family in app.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def breaker_state(app: tether.App) -> str:
    value = metric(app, "tether_breaker_state", target="users")
    return {0.0: "closed", 1.0: "half-open", 2.0: "open"}[value]


def breaker_entered(app: tether.App, state: str) -> int:
    """How many times front's breaker for users entered ``state``."""
    return int(metric(app, "tether_breaker_transitions_total", target="users", to=state))


# --------------------------------------------------------------------------- load and health


@dataclass(frozen=True)
class Call:
    started: float  # time.monotonic()
    seconds: float
    code: str  # "OK" or the status name
    degraded: bool  # answered by the fallback


@dataclass
class FrontLoad:
    """Paced callers of front, each call's outcome kept; health checked alongside."""

    target: str
    calls: list[Call] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)

    def since(self, moment: float) -> list[Call]:
        return [call for call in self.calls if call.started >= moment]

    async def _worker(self, stub: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Say(echo_pb2.SayRequest(text="u1"), timeout=CALL_TIMEOUT)
                outcome = ("OK", reply.seen.get("degraded") == "yes")
            except grpc.aio.AioRpcError as exc:
                outcome = (exc.code().name, False)
            self.calls.append(Call(started, time.monotonic() - started, *outcome))
            await asyncio.sleep(PACE)

    async def _prober(self, health: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            self.health.append((time.monotonic(), status))
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self, workers: int = 4) -> AsyncIterator[FrontLoad]:
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            tasks = [asyncio.create_task(self._worker(stub, stop)) for _ in range(workers)]
            tasks.append(asyncio.create_task(self._prober(health, stop)))
            try:
                yield self
            finally:
                stop.set()
                # Every call is bounded by CALL_TIMEOUT; this bounds the wait for the last ones.
                async with asyncio.timeout(CALL_TIMEOUT + 5):
                    await asyncio.gather(*tasks)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --------------------------------------------------------------------------- scenario 8


async def test_a_slow_dependency_leaves_the_caller_fast_and_serving(
    users_code: UsersCode, etcd: EtcdServer, tmp_path: Path, figures: Figures
) -> None:
    """Scenario 8: users turns slow behind a proxy; front's deadline and breaker bound its p99,
    the fallback answers every call, and front's health stays SERVING throughout."""
    timeout, reset, delay = 0.25, 1.0, 1.5  # users' calls now take 2 x delay: far past timeout
    async with contextlib.AsyncExitStack() as stack:
        users = await start_users(users_code, tmp_path, "users-1", etcd_endpoint=None)
        stack.push_async_callback(stop_process, users)
        proxy = TcpProxy(users.target)
        proxy.start()
        stack.callback(proxy.close)
        # The proxy is users' only advertised address, as a sidecar's would be.
        registrar = EtcdRegistry(RegistryConfig(backend="etcd", endpoints=(etcd.endpoint,)))
        stack.push_async_callback(registrar.close)
        await registrar.register(Instance(id="users-1", service="users", address=proxy.address))

        front = await stack.enter_async_context(
            running(front_app(users_code, etcd, timeout=timeout, fail_max=5, reset=reset))
        )
        load = FrontLoad(front.target)
        async with load.running():
            await eventually(
                lambda: sum(c.code == "OK" and not c.degraded for c in load.calls) >= 40,
                within=WAIT,
                message="40 calls answered by users itself before the fault",
            )
            slow_from = time.monotonic()
            proxy.delay(delay)
            await eventually(
                lambda: breaker_entered(front, "open") >= 1,
                within=WAIT,
                message="front's breaker for users opened once users turned slow",
            )
            opened_at = time.monotonic()
            # Through at least one failed probe (half-open, then open again), and past it.
            await eventually(
                lambda: breaker_entered(front, "open") >= 2,
                within=reset + WAIT,
                message="a half-open probe of the slow users failed and reopened the breaker",
            )
            await eventually(
                lambda: len(load.since(opened_at)) >= 150,
                within=WAIT,
                message="150 calls to front after the breaker opened",
            )
            slow_until = time.monotonic()

    before = [c for c in load.calls if c.started < slow_from]
    slow = [c for c in load.since(slow_from) if c.started < slow_until]
    while_open = [c for c in slow if c.started >= opened_at]
    health = [status for at, status in load.health if slow_from <= at <= slow_until]
    failed = [c for c in load.calls if c.code != "OK"]
    figures.calls = len(load.calls)
    figures.failed = len(failed)
    figures.fallback = sum(c.degraded for c in load.calls)
    figures.extra.update(
        {
            "delay_s": delay,
            "deadline_s": timeout,
            "p99_before_ms": ms(percentile([c.seconds for c in before], 0.99)),
            "p99_slow_ms": ms(percentile([c.seconds for c in slow], 0.99)),
            "max_slow_ms": ms(max(c.seconds for c in slow)),
            "p50_open_ms": ms(percentile([c.seconds for c in while_open], 0.5)),
            "opened": breaker_entered(front, "open"),
            "health_checks": len(health),
        }
    )

    assert not failed, f"{len(failed)} calls to front failed, e.g. {failed[0]}"
    assert all(c.degraded for c in slow), "a call in the slow phase was not the fallback's"
    # Bounded by the deadline (0.25 s) plus scheduling, never by users' 3 s.
    p99 = percentile([c.seconds for c in slow], 0.99)
    assert p99 <= timeout + 0.5, f"front's p99 while users was slow: {p99:.3f} s"
    assert max(c.seconds for c in slow) < 2 * delay, "a call waited for the slow dependency"
    # With the breaker open, calls are not held for the deadline at all.
    p50_open = percentile([c.seconds for c in while_open], 0.5)
    assert p50_open < timeout / 2, f"median while open: {p50_open:.3f} s"
    assert len(health) >= 10, f"only {len(health)} health checks in the slow phase"
    assert set(health) == {"SERVING"}, f"front's health while users was slow: {set(health)}"


# --------------------------------------------------------------------------- scenario 9


async def test_a_failing_dependency_opens_the_breaker_and_it_closes_after_healing(
    users_code: UsersCode, etcd: EtcdServer, tmp_path: Path, figures: Figures
) -> None:
    """Scenario 9: users fails every call; front's breaker opens and the fallback answers; users
    heals right after a failed probe, and the breaker closes within reset timeout + one probe."""
    timeout, reset = 1.0, 1.0
    async with contextlib.AsyncExitStack() as stack:
        users = await start_users(users_code, tmp_path, "users-1", etcd_endpoint=etcd.endpoint)
        stack.push_async_callback(stop_process, users)
        admin_channel = await stack.enter_async_context(grpc.aio.insecure_channel(users.target))
        admin = users_code.pb_grpc.UsersAdminStub(admin_channel)

        async def set_fault(failing: bool) -> None:
            request = users_code.pb.SetFaultRequest(failing=failing)
            await admin.SetFault(request, timeout=CALL_TIMEOUT)

        front = await stack.enter_async_context(
            running(front_app(users_code, etcd, timeout=timeout, fail_max=3, reset=reset))
        )
        load = FrontLoad(front.target)
        async with load.running():
            await eventually(
                lambda: sum(c.code == "OK" and not c.degraded for c in load.calls) >= 20,
                within=WAIT,
                message="20 calls answered by users itself before the fault",
            )
            await set_fault(True)
            failing_from = time.monotonic()
            await eventually(
                lambda: breaker_state(front) == "open",
                within=WAIT,
                message="front's breaker for users opened while users failed every call",
            )
            opened_after = time.monotonic() - failing_from
            # Heal at the worst moment: just after a probe failed and the breaker reopened.
            await eventually(
                lambda: breaker_entered(front, "open") >= 2 and breaker_state(front) == "open",
                within=reset + WAIT,
                message="a half-open probe failed and reopened the breaker",
            )
            healed_at = time.monotonic()
            await set_fault(False)
            await eventually(
                lambda: breaker_state(front) == "closed",
                within=reset + timeout + WAIT,
                message="front's breaker closed after users healed",
                interval=0.005,
            )
            closed_after = time.monotonic() - healed_at
            await eventually(
                lambda: any(not c.degraded for c in load.since(healed_at + closed_after)),
                within=WAIT,
                message="a call answered by users itself once the breaker closed",
            )

    during = [c for c in load.since(failing_from) if c.started < healed_at]
    failed = [c for c in load.calls if c.code != "OK"]
    figures.calls = len(load.calls)
    figures.failed = len(failed)
    figures.fallback = sum(c.degraded for c in load.calls)
    figures.extra.update(
        {
            "reset_s": reset,
            "deadline_s": timeout,
            "opened_after_s": round(opened_after, 2),
            "probes": breaker_entered(front, "half-open"),
            "closed_after_heal_s": round(closed_after, 3),
            "bar_s": reset + timeout,
        }
    )

    assert not failed, f"{len(failed)} calls to front failed, e.g. {failed[0]}"
    assert during and all(c.degraded for c in during if c.started > failing_from + opened_after)
    # One reset timeout from the failed probe (just before healing), then one probe call,
    # which its deadline bounds.
    assert closed_after <= reset + timeout, (
        f"the breaker closed {closed_after:.3f} s after users healed; "
        f"the bar is reset timeout + one probe = {reset + timeout:g} s"
    )
    assert breaker_entered(front, "closed") == 1
