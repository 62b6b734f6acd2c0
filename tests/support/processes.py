"""The Echo service as a real process, registered in etcd, with its JSON log read from a file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

WAIT = 20.0  # bound on each wait; a healthy run needs well under a second


async def spawn_echo(config: Path, log_path: Path) -> asyncio.subprocess.Process:
    """``python -m support.echo_service`` with ``config``; stdout and stderr to ``log_path``.

    A file, not a pipe: a service logging under load never blocks on a reader that is busy.
    """
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "support.echo_service",
            env={**os.environ, "TETHER_CONFIG": str(config)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines in ``path`` so far (other output is skipped)."""
    return _parse(path.read_bytes().splitlines())


def _parse(raw_lines: Sequence[bytes]) -> list[dict[str, Any]]:
    lines = []
    for raw in raw_lines:
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def logged_at(line: dict[str, Any]) -> float:
    """When a log line was written, as Unix time (its ISO ``timestamp`` field)."""
    return datetime.fromisoformat(line["timestamp"]).timestamp()


class EchoProcess:
    """``python -m support.echo_service`` with its own config; stdout goes to a log file."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, instance_id: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.instance_id = instance_id
        self.target = ""
        # The log is read incrementally: a service under load writes a line per call, and
        # parsing the whole file at every poll would starve a 2-core machine.
        self._lines: list[dict[str, Any]] = []
        self._read = 0
        self._partial = b""

    @classmethod
    async def start(
        cls,
        directory: Path,
        instance_id: str,
        *,
        etcd_endpoints: tuple[str, ...] = (),
        ttl_seconds: int = 2,
        drain_seconds: float = 0.2,
        service: str = "echo",
        tracing_endpoint: str | None = None,
        access_log: bool = False,
    ) -> EchoProcess:
        """Start one instance and return once it logged "serving" (and "registered" with etcd).

        With ``tracing_endpoint``, tracing is on and exports there (OTLP gRPC); with
        ``access_log``, every served call is logged (``logging.access_log``).
        """
        directory.mkdir(parents=True, exist_ok=True)
        registry = (
            f"registry: {{backend: etcd, endpoints: {json.dumps(list(etcd_endpoints))}, "
            f"ttl_seconds: {ttl_seconds}}}\n"
            if etcd_endpoints
            else "registry: {backend: none}\n"
        )
        config = directory / f"{instance_id}.yaml"
        config.write_text(
            f"service: {{name: {service}, instance_id: {instance_id}}}\n"
            f"server: {{host: 127.0.0.1, port: 0, drain_seconds: {drain_seconds}, "
            "grace_seconds: 10}\n"
            f"{registry}"
            "metrics: {enabled: false}\n"
            f"logging: {{format: json, access_log: {json.dumps(access_log)}}}\n"
            + (
                f"tracing: {{enabled: true, endpoint: '{tracing_endpoint}'}}\n"
                if tracing_endpoint
                else ""
            )
        )
        log_path = directory / f"{instance_id}.log"
        process = cls(await spawn_echo(config, log_path), log_path, instance_id)
        try:
            process.target = (await process.wait_for_log("serving"))["address"]
            if etcd_endpoints:
                await process.wait_for_log("registered")
        except BaseException:
            await process.kill()
            raise
        return process

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (other output is skipped)."""
        with self.log_path.open("rb") as log:
            log.seek(self._read)
            data = log.read()
        self._read += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self._lines.extend(_parse(complete))
        return list(self._lines)

    async def wait_for_log(
        self, event: str | Collection[str], *, after: int = 0, timeout: float = WAIT
    ) -> dict[str, Any]:
        """The first log line with ``event`` (or any of several), skipping the first ``after``
        lines; fail if none comes within ``timeout``."""
        events = {event} if isinstance(event, str) else set(event)
        deadline = time.monotonic() + timeout
        checked = after
        while True:
            lines = self.lines()
            for line in lines[checked:]:
                if line.get("event") in events:
                    return line
            checked = max(checked, len(lines))
            if self.proc.returncode is not None or time.monotonic() > deadline:
                seen = [e for line in lines[after:] if (e := line.get("event")) != "say"]
                raise AssertionError(
                    f"{self.instance_id} never logged {event!r} within {timeout:g} s "
                    f"(exit code {self.proc.returncode}); since line {after} it logged "
                    f"(the last 40, per-call lines left out) {seen[-40:]}"
                )
            await asyncio.sleep(0.02)

    def send(self, signum: signal.Signals) -> None:
        """Send a signal to this process (only ever a process this object started)."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signum)

    async def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM and wait for the exit status."""
        self.send(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case it is paused) and reap."""
        if self.proc.returncode is None:
            self.send(signal.SIGCONT)
            self.proc.kill()
        await self.proc.wait()


class EchoFleet:
    """The Echo processes of one test, every one killed at the end (an async context manager).

    Args:
        directory: where configs and logs go.
        ttl_seconds: the lease TTL of every instance, unless ``start`` says otherwise.
        release_holds: SIGUSR1 each instance once started, so ``Hold`` answers at once and is
            a plain non-idempotent call (see ``EchoServicer``).
    """

    def __init__(self, directory: Path, *, ttl_seconds: int = 2, release_holds: bool = True):
        self.directory = directory
        self.ttl_seconds = ttl_seconds
        self.release_holds = release_holds
        self.processes: dict[str, EchoProcess] = {}

    def __getitem__(self, instance_id: str) -> EchoProcess:
        return self.processes[instance_id]

    async def start(
        self, instance_id: str, endpoints: Sequence[str], *, ttl_seconds: int | None = None
    ) -> EchoProcess:
        """Start one instance registered through ``endpoints``; return once it is registered."""
        process = await EchoProcess.start(
            self.directory,
            instance_id,
            etcd_endpoints=tuple(endpoints),
            ttl_seconds=ttl_seconds or self.ttl_seconds,
        )
        self.processes[instance_id] = process
        if self.release_holds:
            # Safe now: the SIGUSR1 handler is installed before the instance registers.
            process.send(signal.SIGUSR1)
        return process

    async def start_many(
        self, instance_ids: Sequence[str], endpoints: Sequence[str]
    ) -> list[EchoProcess]:
        """Start several instances at once, all registered through ``endpoints``.

        If one fails to start, the others are cancelled, and a cancelled start kills its process.
        """
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.start(i, endpoints)) for i in instance_ids]
        return [task.result() for task in tasks]

    async def close(self) -> None:
        """Kill every process still running (SIGKILL, after SIGCONT) and reap it."""
        for process in self.processes.values():
            await process.kill()

    async def __aenter__(self) -> EchoFleet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
