"""Serving with ``server.workers``: real processes sharing one port, stopped as one service."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from support.processes import json_lines, spawn_echo
from support.tls import make_pki

from tether.config import RegistryConfig, load_config
from tether.errors import ConfigError
from tether.registry import EtcdRegistry
from tether.testing import EtcdServer

pytestmark = pytest.mark.slow

WAIT = 20.0  # bound on each wait; a healthy run needs well under a second
# Each channel its own connection: SO_REUSEPORT spreads connections, not calls.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie, exited but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Group:
    """``python -m support.echo_service`` with ``server.workers``; every process writes to one
    log file, whose JSON lines tell the workers apart by ``instance_id``."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, group_id: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.group_id = group_id

    @classmethod
    async def start(
        cls,
        directory: Path,
        group_id: str,
        *,
        port: int,
        workers: int = 2,
        registry: str = "{backend: none}",
        metrics: str = "{enabled: false}",
        tls: str = "{}",
    ) -> Group:
        """Start the parent; return at once (see :meth:`wait_serving`)."""
        config = directory / f"{group_id}.yaml"
        config.write_text(
            f"service: {{name: echo, instance_id: {group_id}}}\n"
            f"server: {{host: 127.0.0.1, port: {port}, workers: {workers}, "
            f"drain_seconds: 0.2, grace_seconds: 10, tls: {tls}}}\n"
            f"registry: {registry}\n"
            f"metrics: {metrics}\n"
            "logging: {format: json}\n"
        )
        log_path = directory / f"{group_id}.log"
        return cls(await spawn_echo(config, log_path), log_path, group_id)

    def worker_id(self, index: int) -> str:
        return f"{self.group_id}-w{index}"

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines written so far (with ``event``, if given)."""
        return [
            line
            for line in json_lines(self.log_path)
            if event is None or line.get("event") == event
        ]

    @property
    def worker_pids(self) -> dict[str, int]:
        """Worker instance id -> pid, from the parent's "worker started" lines."""
        return {line["worker_id"]: line["pid"] for line in self.lines("worker started")}

    async def wait_until(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            if time.monotonic() > deadline:
                seen = [(line.get("instance_id"), line.get("event")) for line in self.lines()]
                raise AssertionError(f"never {what} within {WAIT:g} s; the log has {seen}")
            await asyncio.sleep(0.02)

    def logged_by(self, event: str) -> set[str]:
        """The instance ids that logged ``event``."""
        return {line["instance_id"] for line in self.lines(event)}

    async def wait_serving(self, workers: int = 2) -> None:
        expected = {self.worker_id(k) for k in range(workers)}
        await self.wait_until("all workers serving", lambda: self.logged_by("serving") >= expected)

    async def wait_exit(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), WAIT)

    async def kill(self) -> None:
        """Stop every process of the group for sure: the parent, then each worker it started."""
        pids = list(self.worker_pids.values())
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def groups() -> AsyncIterator[list[Group]]:
    """Groups a test starts; each one killed at the end, whatever happened."""
    started: list[Group] = []
    try:
        yield started
    finally:
        for group in started:
            await group.kill()


async def answering_instance(
    target: str, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """Which worker answers one Say call on a new connection (over TLS with ``credentials``)."""
    async with (
        grpc.aio.insecure_channel(target, options=_OWN_CONNECTION)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials, options=_OWN_CONNECTION)
    ) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Say(
            echo_pb2.SayRequest(text="hi"), timeout=WAIT
        )
    return str(reply.seen["instance"])


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("workers", "rule"),
    [("0", "must be >= 1"), ("65", "must be <= 64"), ("auto", "must be an integer")],
)
def test_workers_out_of_range_refused(tmp_path: Path, workers: str, rule: str) -> None:
    """server.workers is a number from 1 to 64; the error names the field, value and rule."""
    config = tmp_path / "tether.yaml"
    config.write_text(f"service: {{name: echo}}\nserver: {{workers: {workers}}}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    shown = repr(int(workers)) if workers.isdigit() else repr(workers)
    assert f"server.workers={shown}: {rule}" in str(refused.value)


def test_one_worker_by_default(tmp_path: Path) -> None:
    """Without server.workers, one process serves (the App's own)."""
    config = tmp_path / "tether.yaml"
    config.write_text("service: {name: echo}\n")
    assert load_config(config).server.workers == 1


# ------------------------------------------------------------------------ processes


async def test_both_workers_answer_on_one_port(tmp_path: Path, groups: list[Group]) -> None:
    """Connections to the one port are answered by both workers, each with its own id and pid."""
    port = free_port()
    group = await Group.start(tmp_path, "echo-g", port=port)
    groups.append(group)
    await group.wait_serving()
    pids = group.worker_pids
    assert len(set(pids.values())) == 2 and group.proc.pid not in pids.values()
    addresses = {line["address"] for line in group.lines("serving")}
    assert addresses == {f"127.0.0.1:{port}"}
    seen: set[str] = set()
    for _ in range(64):  # all 64 on one worker: odds of 2**-63
        seen.add(await answering_instance(f"127.0.0.1:{port}"))
        if len(seen) == 2:
            break
    assert seen == {"echo-g-w0", "echo-g-w1"}
    group.proc.send_signal(signal.SIGTERM)
    assert await group.wait_exit() == 0
    assert group.logged_by("stopped") == {"echo-g-w0", "echo-g-w1"}
    assert not any(running(pid) for pid in pids.values())


async def test_sigterm_drains_calls_in_flight_on_every_worker(
    tmp_path: Path, groups: list[Group]
) -> None:
    """SIGTERM to the parent: each worker drains, finishes its held call, and all exit 0."""
    port = free_port()
    group = await Group.start(tmp_path, "echo-d", port=port)
    groups.append(group)
    await group.wait_serving()
    channels: list[grpc.aio.Channel] = []
    held: list[asyncio.Future[Any]] = []
    try:
        for _ in range(64):  # new connections until each worker holds a call
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_OWN_CONNECTION)
            channels.append(channel)
            before = len(group.lines("hold started"))
            held.append(
                asyncio.ensure_future(
                    echo_pb2_grpc.EchoStub(channel).Hold(
                        echo_pb2.SayRequest(text=f"held {len(held)}"), timeout=WAIT
                    )
                )
            )
            await group.wait_until(
                "the call was held", lambda n=before: len(group.lines("hold started")) > n
            )
            if len(group.logged_by("hold started")) == 2:
                break
        assert group.logged_by("hold started") == {"echo-d-w0", "echo-d-w1"}

        group.proc.send_signal(signal.SIGTERM)
        await group.wait_until(
            "both workers refusing new calls",
            lambda: len(group.logged_by("refusing new calls")) == 2,
        )
        assert not any(call.done() for call in held), "a held call ended before its release"
        assert all(line["in_flight"] >= 1 for line in group.lines("refusing new calls"))
        for pid in group.worker_pids.values():
            os.kill(pid, signal.SIGUSR1)  # release the held calls
        replies = await asyncio.wait_for(asyncio.gather(*held), WAIT)
    finally:
        for call in held:
            call.cancel()
        for channel in channels:
            await channel.close()
    assert sorted(reply.text for reply in replies) == sorted(f"held {i}" for i in range(len(held)))
    assert {reply.seen["instance"] for reply in replies} == {"echo-d-w0", "echo-d-w1"}
    assert await group.wait_exit() == 0
    assert group.logged_by("stopped") == {"echo-d-w0", "echo-d-w1"}
    assert [line["code"] for line in group.lines("worker exited")] == [0, 0]


async def test_workers_register_one_instance_for_the_port(
    tmp_path: Path, etcd: EtcdServer, groups: list[Group]
) -> None:
    """Worker 0 registers the group's id at the port; worker 1 registers nothing; SIGTERM
    removes the instance at once."""
    port = free_port()
    discovery = EtcdRegistry(RegistryConfig(endpoints=(etcd.endpoint,)))
    try:
        watch = discovery.watch("echo")
        assert await asyncio.wait_for(watch.next(), WAIT) == []
        group = await Group.start(
            tmp_path,
            "echo-r",
            port=port,
            registry=f"{{backend: etcd, endpoints: ['{etcd.endpoint}'], ttl_seconds: 2}}",
        )
        groups.append(group)
        await group.wait_serving()
        [instance] = await asyncio.wait_for(watch.next(), WAIT)
        assert instance.id == "echo-r"
        assert instance.address == f"127.0.0.1:{port}"
        await group.wait_until("registered", lambda: bool(group.lines("registered")))
        assert len(group.lines("registered")) == 1
        assert [i.id for i in await discovery.get("echo")] == ["echo-r"]

        group.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(watch.next(), 1.0) == []  # before the 0.2 s drain ends
        assert await group.wait_exit() == 0
    finally:
        await discovery.close()


async def test_each_worker_serves_its_metrics_on_port_plus_its_index(
    tmp_path: Path, groups: list[Group]
) -> None:
    """Worker k serves its own metrics on metrics.port + k, counting the calls it answered."""
    port, metrics_port = free_port(), free_port()
    group = await Group.start(
        tmp_path, "echo-m", port=port, metrics=f"{{host: 127.0.0.1, port: {metrics_port}}}"
    )
    groups.append(group)
    await group.wait_serving()
    answered = Counter([await answering_instance(f"127.0.0.1:{port}") for _ in range(16)])
    async with httpx.AsyncClient(timeout=WAIT) as http:
        for k in range(2):
            text = (await http.get(f"http://127.0.0.1:{metrics_port + k}/metrics")).text
            ok = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("tether_server_calls_total{") and 'code="OK"' in line
            )
            assert ok == answered[f"echo-m-w{k}"]
    group.proc.send_signal(signal.SIGTERM)
    assert await group.wait_exit() == 0


async def test_workers_need_a_fixed_port(tmp_path: Path, groups: list[Group]) -> None:
    """server.workers > 1 with port 0: refused at start-up, exit 2, server.port named."""
    group = await Group.start(tmp_path, "echo-z", port=0)
    groups.append(group)
    assert await group.wait_exit() == 2
    output = group.log_path.read_text()
    assert "server.port=0: must be a fixed port with server.workers=2" in output
    assert not group.lines("worker started")


async def test_port_in_use_refused_before_any_worker(
    tmp_path: Path, groups: list[Group], listening_port: int
) -> None:
    """A port something listens on is refused (exit 2), not silently shared by SO_REUSEPORT."""
    group = await Group.start(tmp_path, "echo-u", port=listening_port)
    groups.append(group)
    assert await group.wait_exit() == 2
    assert f"server.port={listening_port}: cannot bind" in group.log_path.read_text()
    assert not group.lines("worker started")


async def test_every_worker_serves_tls_on_the_shared_port(
    tmp_path: Path, groups: list[Group]
) -> None:
    """server.tls applies to each worker: both answer over TLS, neither answers plaintext."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    tls = json.dumps(pki.server_tls())
    group = await Group.start(tmp_path, "echo-t", port=port, tls=tls)
    groups.append(group)
    await group.wait_serving()
    assert {line["tls"] for line in group.lines("serving")} == {"tls"}
    credentials = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())
    seen: set[str] = set()
    for _ in range(64):  # all 64 on one worker: odds of 2**-63
        seen.add(await answering_instance(f"127.0.0.1:{port}", credentials))
        if len(seen) == 2:
            break
    assert seen == {"echo-t-w0", "echo-t-w1"}
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await answering_instance(f"127.0.0.1:{port}")
    assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE
    group.proc.send_signal(signal.SIGTERM)
    assert await group.wait_exit() == 0


async def test_unusable_tls_refused_before_any_worker(tmp_path: Path, groups: list[Group]) -> None:
    """A TLS file that cannot be read stops the parent (exit 2, field and path) before it
    starts any worker, rather than every worker failing alike."""
    missing = tmp_path / "missing.crt"
    tls = json.dumps({"cert_file": str(missing), "key_file": str(missing)})
    group = await Group.start(tmp_path, "echo-b", port=free_port(), tls=tls)
    groups.append(group)
    assert await group.wait_exit() == 2
    output = group.log_path.read_text()
    assert f"server.tls.cert_file='{missing}': cannot be read: No such file" in output
    assert not group.lines("worker started")


async def test_crashed_worker_stops_the_group(tmp_path: Path, groups: list[Group]) -> None:
    """A worker killed stops the others gracefully; the parent exits with 128 + the signal."""
    group = await Group.start(tmp_path, "echo-c", port=free_port())
    groups.append(group)
    await group.wait_serving()
    pids = group.worker_pids
    os.kill(pids["echo-c-w1"], signal.SIGKILL)
    assert await group.wait_exit() == 128 + signal.SIGKILL
    [crash] = group.lines("worker exited unexpectedly; stopping the others")
    assert crash["worker"] == 1 and crash["code"] == -signal.SIGKILL
    assert group.logged_by("stopped") == {"echo-c-w0"}
    assert not any(running(pid) for pid in pids.values())


async def test_workers_stop_when_the_parent_dies(tmp_path: Path, groups: list[Group]) -> None:
    """With the parent killed, each worker notices and stops gracefully by itself."""
    group = await Group.start(tmp_path, "echo-o", port=free_port())
    groups.append(group)
    await group.wait_serving()
    pids = group.worker_pids
    group.proc.kill()
    await group.wait_exit()
    await group.wait_until("both workers stopped", lambda: group.logged_by("stopped") == set(pids))
    assert group.logged_by("parent process gone; stopping") == set(pids)
    await group.wait_until(
        "both worker processes gone", lambda: not any(running(pid) for pid in pids.values())
    )
