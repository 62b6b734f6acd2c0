"""The tether demo: start the Greeter example, call it, stop it gracefully, and narrate each step.

Run from the repository root with ``make demo`` (or ``.venv/bin/python examples/demo.py``). All
traffic stays on 127.0.0.1; the service process and the temp files are removed on the way out,
whatever happens. The exit status is 0 only when every step passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import tether
    from tether.codegen import ProtoCompileError, compile_protos
except ImportError as exc:  # run with an interpreter that lacks tether
    sys.exit(f"demo: {exc.name} is not installed here; run `make demo` from the repository root")

EXAMPLES = Path(__file__).resolve().parent
GREETER = EXAMPLES / "greeter"
PROTOS = GREETER / "proto"
SERVICE = "greeter.v1.Greeter"

START_TIMEOUT = 30.0  # python start-up, imports, bind, SERVING; about half a second when healthy
CALL_TIMEOUT = 5.0  # deadline of every call the demo makes
STEP_TIMEOUT = 20.0  # bound on any one step, so a stuck service fails the step, never hangs
DRAIN_SECONDS = 1.0
GRACE_SECONDS = 5.0
UNARY_CALLS = 100
UNARY_CONCURRENCY = 10
LOAD_CALLERS = 4  # callers that keep calling across the SIGTERM

SERVING = health_pb2.HealthCheckResponse.SERVING
STATUS_NAMES = {value: name for name, value in health_pb2.HealthCheckResponse.ServingStatus.items()}
SHUTDOWN_EVENTS = (
    "signal received",
    "stopping",
    "draining",
    "refusing new calls",
    "stopping server",
    "stopped",
)
# Fields every service log line carries; left out when a line is shown.
_COMMON_FIELDS = {"event", "level", "timestamp", "logger_name", "service", "instance_id"}


class StepFailed(Exception):
    """A step's check did not hold; the message is the short reason shown in the summary."""


# --------------------------------------------------------------------------------- output


class Console:
    """Headings, narration and aligned tables on standard output; colour only on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._out = stream
        self._gone = False
        self._colour = (
            stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        )

    def heading(self, text: str) -> None:
        self.line()
        self.line(self._paint(text, "1") if self._colour else text)
        self.line("-" * len(text))

    def say(self, text: str = "") -> None:
        self.line(f"  {text}" if text else "")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """Columns padded to their widest cell; the last column is left unpadded (and may be
        coloured, see :meth:`verdict`) so colour codes never upset the alignment."""
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]

        def render(row: Sequence[str]) -> str:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            return "  " + "  ".join([*cells, row[-1]]).rstrip()

        self.line(render(header))
        for row in rows:
            self.line(render(row))

    def verdict(self, verdict: str) -> str:
        colour = {"PASS": "32", "FAIL": "31", "SKIP": "33"}.get(verdict)
        return self._paint(verdict, colour) if self._colour and colour else verdict

    def line(self, text: str = "") -> None:
        if self._gone:
            return
        try:
            print(text, file=self._out, flush=True)
        except BrokenPipeError:
            # The reader left (`demo | head`): keep going quietly so clean-up still runs.
            self._gone = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._out.fileno())
            os.close(devnull)

    @staticmethod
    def _paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _percentile(samples: Sequence[float], share: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least ``share`` of them at or below."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


def _short(details: str) -> str:
    """gRPC's connection errors run to a paragraph; the demo needs their gist."""
    if "Connection refused" in details:
        return "connection refused (the process has exited)"
    return details if len(details) <= 60 else details[:57] + "..."


def _fields(line: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in line.items() if k not in _COMMON_FIELDS)


# ------------------------------------------------------------------------ the service process


class ServiceProcess:
    """The Greeter run as ``python -m greeter``; its log lines are collected as they arrive.

    The service writes JSON lines on standard output; anything else (standard error, a line that
    is not JSON) is kept as ``{"event": <text>}`` so a failure can show it.
    """

    def __init__(self, proc: asyncio.subprocess.Process, target: str) -> None:
        self.proc = proc
        self.target = target
        self.lines: list[dict[str, Any]] = []
        self._raw: list[str] = []
        self._arrived = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, config: Path, port: int) -> ServiceProcess:
        # The demo's config must win: drop TETHER_* variables the caller may have set.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}
        env["TETHER_CONFIG"] = str(config)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GREETER), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "greeter",
            cwd=GREETER,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc, f"127.0.0.1:{port}")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            line = parsed if isinstance(parsed, dict) else {"event": text}
            async with self._arrived:
                self._raw.append(text)
                self.lines.append(line)
                self._arrived.notify_all()

    async def wait_for(self, event: str, within: float, **match: Any) -> dict[str, Any] | None:
        """The first line with ``event`` and the ``match`` fields; None after ``within`` seconds."""

        def found() -> dict[str, Any] | None:
            for line in self.lines:
                if line.get("event") == event and all(line.get(k) == v for k, v in match.items()):
                    return line
            return None

        try:
            async with asyncio.timeout(within), self._arrived:
                await self._arrived.wait_for(lambda: found() is not None or self._reader.done())
        except TimeoutError:
            pass
        return found()

    async def finish_reading(self, within: float) -> None:
        """Wait until the process's output is read to its end, at most ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), within)

    def tail(self, count: int = 8) -> list[str]:
        """The last lines the service wrote; JSON lines shortened to time, level, event, fields."""
        shown = []
        for text, line in zip(self._raw[-count:], self.lines[-count:], strict=True):
            if "timestamp" in line:
                text = f"{str(line['timestamp'])[11:23]} {line.get('level', '?'):<7} "
                text += f"{line.get('event')}  {_fields(line)}"
            shown.append(text)
        return shown

    async def close(self) -> None:
        """Kill the process if it still runs (by its own pid only) and stop reading."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        try:
            async with asyncio.timeout(2):
                await self._reader
        except (TimeoutError, asyncio.CancelledError):
            self._reader.cancel()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(directory: Path, port: int) -> Path:
    path = directory / "tether.yaml"
    path.write_text(
        "service: {name: greeter, version: demo}\n"
        f"server: {{host: 127.0.0.1, port: {port}, drain_seconds: {DRAIN_SECONDS}, "
        f"grace_seconds: {GRACE_SECONDS}}}\n"
        "registry: {backend: none}\n"
        "tracing: {enabled: false}\n"
        "metrics: {enabled: false}\n"
        "logging: {level: info, format: json}\n"
    )
    return path


def _generate_if_stale() -> str:
    """Compile greeter.proto into ``greeter/v1`` unless the generated modules are newer."""
    sources = sorted(PROTOS.rglob("*.proto"))
    newest = max(source.stat().st_mtime_ns for source in sources)
    outputs = [
        GREETER / f"{source.relative_to(PROTOS).with_suffix('')}{suffix}"
        for source in sources
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ]
    if all(out.exists() and out.stat().st_mtime_ns >= newest for out in outputs):
        return "up to date"
    try:
        generated = compile_protos(sources, GREETER, proto_path=PROTOS)
    except ProtoCompileError as exc:
        raise StepFailed(str(exc)) from None
    return f"generated {len(generated)} modules"


# --------------------------------------------------------------------------------- the demo


@dataclass
class Outcome:
    """One line of the summary."""

    step: str
    verdict: str
    result: str


@dataclass
class CallRecord:
    """One call made across the shutdown: when it started and how it ended."""

    started: float
    code: grpc.StatusCode
    details: str


@dataclass
class Demo:
    """The steps, in order; each returns its one-line result or raises StepFailed."""

    console: Console
    workdir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    service: ServiceProcess | None = None
    channel: grpc.aio.Channel | None = None
    pb2: ModuleType | None = None  # greeter.v1.greeter_pb2, once generated
    make_stub: Callable[[grpc.aio.Channel], Any] | None = None  # greeter_pb2_grpc.GreeterStub
    stub: Any = None  # a GreeterStub on `channel`
    _tail_shown: bool = False

    async def run(self) -> bool:
        c = self.console
        c.line("tether demo: the Greeter example, governed")
        c.say("Starts examples/greeter as its own process on 127.0.0.1, calls it through a tether")
        c.say("channel, then stops it with SIGTERM the way an orchestrator would.")
        steps: list[tuple[str, str, Callable[[], Awaitable[str]], float]] = [
            ("generate code", "Generate code from greeter.proto", self.generate, STEP_TIMEOUT),
            ("start service", "Start the service, wait for SERVING", self.start, START_TIMEOUT + 5),
            ("1. unary calls", f"Step 1: {UNARY_CALLS} SayHello calls", self.unary_calls, 30),
            ("2. server stream", "Step 2: SayHelloStream", self.server_stream, STEP_TIMEOUT),
            ("3. bad request", "Step 3: a bad request", self.bad_request, STEP_TIMEOUT),
            ("4. graceful stop", "Step 4: SIGTERM, drain, exit", self.graceful_stop, 30),
        ]
        started = time.perf_counter()
        for name, heading, step, limit in steps:
            if self.outcomes and self.outcomes[-1].verdict != "PASS":
                self.outcomes.append(Outcome(name, "SKIP", "not run: an earlier step failed"))
                continue
            c.heading(heading)
            self.outcomes.append(await self._attempt(name, step, limit))
        self.summarise(time.perf_counter() - started)
        return all(outcome.verdict == "PASS" for outcome in self.outcomes)

    async def _attempt(
        self, name: str, step: Callable[[], Awaitable[str]], limit: float
    ) -> Outcome:
        """Run one step; any failure becomes a FAIL line with a short reason, never a traceback."""
        try:
            async with asyncio.timeout(limit):
                result = await step()
        except StepFailed as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"timed out after {limit:g} s"
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            self.console.say(f"-> {self.console.verdict('PASS')}  {result}")
            return Outcome(name, "PASS", result)
        if self.service is not None and not self._tail_shown:
            self._show_tail(self.service)
        self.console.say(f"-> {self.console.verdict('FAIL')}  {reason}")
        return Outcome(name, "FAIL", reason)

    def summarise(self, elapsed: float) -> None:
        c = self.console
        c.heading("Summary")
        rows = [(o.step, o.result, c.verdict(o.verdict)) for o in self.outcomes]
        c.table(("step", "result", ""), rows)
        passed = sum(o.verdict == "PASS" for o in self.outcomes)
        c.say()
        c.say(f"{passed} of {len(self.outcomes)} steps passed in {elapsed:.1f} s")

    def request(self, name: str) -> Any:
        """A ``HelloRequest``; its module exists once the code is generated."""
        assert self.pb2 is not None
        return self.pb2.HelloRequest(name=name)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=None)
        if self.service is not None:
            await self.service.close()

    # ----------------------------------------------------------------------------- steps

    async def generate(self) -> str:
        self.console.say("tether.codegen compiles proto/greeter/v1/greeter.proto into the")
        self.console.say("greeter.v1 package beside the hand-written service (gitignored).")
        result = await asyncio.to_thread(_generate_if_stale)
        sys.path.insert(0, str(GREETER))
        from greeter.v1 import greeter_pb2, greeter_pb2_grpc

        self.pb2 = greeter_pb2
        self.make_stub = greeter_pb2_grpc.GreeterStub
        return f"greeter.v1 {result}"

    async def start(self) -> str:
        c = self.console
        port = _free_port()
        config = _write_config(self.workdir, port)
        c.say(f"config: 127.0.0.1:{port}, drain {DRAIN_SECONDS:g} s, grace {GRACE_SECONDS:g} s,")
        c.say("JSON logs, registry none (etcd registration comes later)")
        began = time.perf_counter()
        self.service = service = await ServiceProcess.start(config, port)
        c.say(f"started `python -m greeter`, pid {service.proc.pid}")
        # Short reconnect backoff: the first attempts race the server's bind.
        self.channel = tether.dial(
            service.target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500),
            ],
        )
        assert self.make_stub is not None
        self.stub = self.make_stub(self.channel)
        await self._wait_serving(service, began + START_TIMEOUT)
        took = time.perf_counter() - began
        c.say(f"health Check({SERVICE}) = SERVING after {took:.2f} s")
        return f"SERVING on {service.target} after {took:.2f} s"

    async def _wait_serving(self, service: ServiceProcess, deadline: float) -> None:
        assert self.channel is not None
        health = health_pb2_grpc.HealthStub(self.channel)
        last = "no answer yet"
        while time.perf_counter() < deadline:
            if service.proc.returncode is not None:
                await service.finish_reading(within=1)
                self._show_tail(service)
                raise StepFailed(f"the service exited with status {service.proc.returncode}")
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=1
                )
            except grpc.aio.AioRpcError as exc:
                last = exc.code().name
            else:
                if reply.status == SERVING:
                    return
                last = STATUS_NAMES.get(reply.status, str(reply.status))
            await asyncio.sleep(0.1)
        self._show_tail(service)
        raise StepFailed(f"not SERVING after {START_TIMEOUT:g} s (last answer: {last})")

    def _show_tail(self, service: ServiceProcess) -> None:
        self._tail_shown = True
        self.console.say("the service's last lines:")
        for text in service.tail() or ["(nothing)"]:
            self.console.say(f"  | {text}")

    async def unary_calls(self) -> str:
        c = self.console
        assert self.service is not None
        c.say(
            f"{UNARY_CALLS} calls from {UNARY_CONCURRENCY} concurrent callers through tether.dial,"
        )
        c.say(f"each with a {CALL_TIMEOUT:g} s deadline")
        latencies: list[float] = []
        failures: dict[str, int] = {}
        first_reply = ""
        queue = iter(range(UNARY_CALLS))

        async def caller() -> None:
            nonlocal first_reply
            for i in queue:
                began = time.perf_counter()
                try:
                    reply = await self.stub.SayHello(
                        self.request(f"caller-{i}"), timeout=CALL_TIMEOUT
                    )
                except grpc.aio.AioRpcError as exc:
                    failures[exc.code().name] = failures.get(exc.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - began)
                first_reply = first_reply or reply.message

        await asyncio.gather(*(caller() for _ in range(UNARY_CONCURRENCY)))
        c.say()
        ok = len(latencies)
        if latencies:
            p50, p99, top = (_percentile(latencies, s) for s in (0.5, 0.99, 1.0))
            timings = [_ms(p50), _ms(p99), _ms(top)]
        else:
            timings = ["-", "-", "-"]
        c.table(
            ("calls", "ok", "failed", "p50", "p99", "max"),
            [(str(UNARY_CALLS), str(ok), str(UNARY_CALLS - ok), *timings)],
        )
        c.say()
        c.say(f"a reply: {first_reply!r}")
        logged = await self.service.wait_for("said hello", within=2, name="caller-0")
        if logged is not None:
            c.say("the service logged, with the call's method added by the framework:")
            c.say(f"  {logged['event']}  {_fields(logged)}")
        if failures:
            shown = ", ".join(f"{n} {code}" for code, n in sorted(failures.items()))
            raise StepFailed(f"{ok}/{UNARY_CALLS} OK; failed: {shown}")
        return f"{ok}/{UNARY_CALLS} OK, p50 {timings[0]}, p99 {timings[1]}"

    async def server_stream(self) -> str:
        c = self.console
        from greeter.service import GREETINGS

        c.say("one request, one reply per language the service knows:")
        began = time.perf_counter()
        messages = []
        call = self.stub.SayHelloStream(self.request("Ada"), timeout=CALL_TIMEOUT)
        async for reply in call:
            messages.append(reply.message)
            c.say(f"  +{_ms(time.perf_counter() - began):>9}  {reply.message}")
        c.say(f"stream ended with status {(await call.code()).name}")
        expected = [f"{greeting}, Ada!" for _, greeting in GREETINGS]
        if messages != expected:
            raise StepFailed(f"got {messages}, expected {expected}")
        return f"{len(messages)} replies: " + ", ".join(m.split(",")[0] for m in messages)

    async def bad_request(self) -> str:
        c = self.console
        assert self.service is not None and self.channel is not None
        c.say("SayHello with an empty name; the handler raises tether.InvalidArgument:")
        try:
            await self.stub.SayHello(self.request(""), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
        else:
            raise StepFailed("the call succeeded; expected INVALID_ARGUMENT")
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=CALL_TIMEOUT
        )
        health_status = STATUS_NAMES.get(reply.status, str(reply.status))
        crashed = await self.service.wait_for("handler raised", within=0.2)
        c.say()
        c.table(
            ("what", "seen"),
            [
                ("status", code.name),
                ("details", repr(details)),
                (
                    "error logged by the service",
                    "yes" if crashed else "no (an answer, not a crash)",
                ),
                ("health afterwards", health_status),
            ],
        )
        c.say()
        if code != grpc.StatusCode.INVALID_ARGUMENT or details != "name is required":
            raise StepFailed(f"got {code.name} {details!r}, expected INVALID_ARGUMENT")
        if crashed or reply.status != SERVING:
            raise StepFailed("the service treated the bad request as a failure")
        return f'{code.name} "{details}", service still SERVING'

    async def graceful_stop(self) -> str:
        c = self.console
        assert self.service is not None and self.channel is not None
        service = self.service
        health = health_pb2_grpc.HealthStub(self.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=STEP_TIMEOUT)
        first = await watch.read()
        if first is grpc.aio.EOF or first.status != SERVING:
            raise StepFailed("the health Watch did not start with SERVING")
        c.say(f"health Watch({SERVICE}) says SERVING; {LOAD_CALLERS} callers keep calling SayHello")
        c.say("(the Greeter has no slow method: this shows what happens to calls that keep")
        c.say("arriving while the service drains, not one long call held open)")

        records: list[CallRecord] = []
        loop = asyncio.get_running_loop()

        async def keep_calling(caller: int) -> None:
            while True:
                started = loop.time()
                try:
                    await self.stub.SayHello(self.request(f"load-{caller}"), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    records.append(CallRecord(started, exc.code(), exc.details() or ""))
                    return  # refused: a real caller would now pick another instance
                records.append(CallRecord(started, grpc.StatusCode.OK, ""))
                await asyncio.sleep(0.02)

        callers = [asyncio.ensure_future(keep_calling(i)) for i in range(LOAD_CALLERS)]
        try:
            await asyncio.sleep(0.3)
            signalled = loop.time()
            service.proc.send_signal(signal.SIGTERM)
            c.say(f"sent SIGTERM to pid {service.proc.pid}")
            changes: list[tuple[float, str]] = []
            while (reply := await watch.read()) is not grpc.aio.EOF:
                changes.append((loop.time() - signalled, STATUS_NAMES.get(reply.status, "?")))
            async with asyncio.timeout(STEP_TIMEOUT):
                status = await service.proc.wait()
            exited = loop.time() - signalled
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(*callers)
        finally:
            for task in callers:
                task.cancel()
        await service.wait_for("stopped", within=2)

        after = [r for r in records if r.started >= signalled]
        answered = sum(r.code == grpc.StatusCode.OK for r in after)
        refusals: dict[str, int] = {}
        for r in after:
            if r.code == grpc.StatusCode.UNAVAILABLE:
                refusals[r.details] = refusals.get(r.details, 0) + 1
        # Before SIGTERM every call must succeed; after it, UNAVAILABLE is the honest refusal.
        broken = [r for r in records if r.started < signalled and r.code != grpc.StatusCode.OK]
        broken += [
            r for r in after if r.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
        ]
        went = ", ".join(f"{name} after {_ms(t)}" for t, name in changes) or "no change"
        c.say()
        c.table(
            ("after SIGTERM", "seen"),
            [
                ("health Watch", f"{went}; then the stream ended"),
                ("calls answered while draining", f"{answered} OK"),
                *(
                    ("calls refused once drained", f"{n} UNAVAILABLE: {_short(details)}")
                    for details, n in sorted(refusals.items())
                ),
                ("calls failed any other way", str(len(broken))),
                ("exit status", f"{status}, {exited:.2f} s after SIGTERM"),
            ],
        )
        c.say()
        lines = self._shutdown_lines(service)
        if lines:
            c.say("what the service logged while it stopped:")
            c.table(("time (UTC)", "since signal", "event", "fields"), lines)
            c.say()

        events = [line.get("event") for line in service.lines]
        order = [event for event in events if event in SHUTDOWN_EVENTS]
        stopping_server = next(
            (x for x in service.lines if x.get("event") == "stopping server"), {}
        )
        problems = []
        if [name for _, name in changes][:1] != ["NOT_SERVING"]:
            problems.append("health did not go NOT_SERVING")
        if status != 0:
            problems.append(f"exit status {status}")
        if order != list(SHUTDOWN_EVENTS):
            problems.append(f"shutdown logged {order}")
        if stopping_server.get("in_flight") != 0:
            problems.append(f"{stopping_server.get('in_flight')} calls in flight at stop")
        if broken:
            problems.append(f"{len(broken)} calls failed with {broken[0].code.name}")
        if answered == 0:
            problems.append("no call was answered during the drain")
        if problems:
            raise StepFailed("; ".join(problems))
        return f"NOT_SERVING, {answered} calls answered while draining, exit {status}"

    @staticmethod
    def _shutdown_lines(service: ServiceProcess) -> list[tuple[str, str, str, str]]:
        lines = [x for x in service.lines if x.get("event") in SHUTDOWN_EVENTS]
        try:
            stamps = [datetime.fromisoformat(x["timestamp"]) for x in lines]
        except (KeyError, ValueError):
            return [("?", "?", str(x.get("event")), _fields(x)) for x in lines]
        zero = stamps[0] if stamps else None
        return [
            (
                stamp.strftime("%H:%M:%S.%f")[:-3],
                f"+{(stamp - zero).total_seconds() * 1000:.0f} ms" if zero else "",
                str(line["event"]),
                _fields(line),
            )
            for stamp, line in zip(stamps, lines, strict=True)
        ]


async def main() -> int:
    """Run the demo; return 0 when every step passed, 1 otherwise."""
    # SIGTERM (CI cancelling the job) unwinds like Ctrl-C: the finally below still runs.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    console = Console(sys.stdout)
    workdir = Path(tempfile.mkdtemp(prefix="tether-demo-"))
    demo = Demo(console, workdir)
    try:
        passed = await demo.run()
    finally:
        await demo.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ndemo: interrupted; the service it started has been stopped", file=sys.stderr)
        sys.exit(130)
