"""The Echo service as a real process, registered in etcd, with its JSON log read from a file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
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
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


class EchoProcess:
    """``python -m support.echo_service`` with its own config; stdout goes to a log file."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, instance_id: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.instance_id = instance_id
        self.target = ""

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
    ) -> EchoProcess:
        """Start one instance and return once it logged "serving" (and "registered" with etcd).

        With ``tracing_endpoint``, tracing is on and exports there (OTLP gRPC).
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
            "logging: {format: json}\n"
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
        return json_lines(self.log_path)

    async def wait_for_log(
        self, event: str, *, after: int = 0, timeout: float = WAIT
    ) -> dict[str, Any]:
        """The first log line with ``event`` (skipping the first ``after`` lines); fail if none."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines()[after:]:
                if line.get("event") == event:
                    return line
            if self.proc.returncode is not None or time.monotonic() > deadline:
                seen = [line.get("event") for line in self.lines()]
                raise AssertionError(
                    f"{self.instance_id} never logged {event!r} within {timeout:g} s "
                    f"(exit code {self.proc.returncode}); it logged {seen}"
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
