"""Serving on several cores: ``server.workers`` processes sharing one port, one instance.

:meth:`App.run() <tether.App.run>` calls :func:`serve_in_workers` first. With ``workers: 1``,
or inside a worker, it returns None and the process serves as usual. Otherwise this process
becomes the workers' parent: it serves nothing and holds no event loop; it starts each worker
by running its own command line again (``sys.orig_argv``) with the worker's slot in the
environment, forwards SIGTERM and SIGINT to them, and returns the exit status once they are
all gone.

Why a fresh process and not a bare ``fork()``: by the time ``run()`` is called the App is
built, and with tracing on it already holds an OTLP gRPC channel and gRPC's threads. gRPC
supports ``fork()`` only before any such work; a worker that starts from ``exec`` has never
seen a gRPC object of its parent's, whatever the App built.

What each worker gets, through configuration the App reads anyway (environment beats file):
``service.instance_id`` ``<id>-w<k>`` (its log lines and spans carry it) and, with metrics on a
fixed port, ``metrics.port + k``. Worker 0 registers one instance for the port under ``<id>``;
the others register nothing (see :func:`registered_instance_id` and docs/registry.md).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tether.config import TetherConfig
from tether.errors import ConfigError, ConfigProblem
from tether.log import get_logger

if TYPE_CHECKING:
    from tether.app import App

__all__ = ["WorkerSlot", "current_worker", "registered_instance_id", "serve_in_workers"]

_log = get_logger("tether.workers")

#: Set by the parent in a worker's environment (JSON of a WorkerSlot); outside the TETHER_*
#: namespace of the configuration on purpose.
_SLOT_VAR = "_TETHER_WORKER"
_ID_VAR = "TETHER_SERVICE__INSTANCE_ID"
_METRICS_PORT_VAR = "TETHER_METRICS__PORT"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker this process is, as its parent said.

    Attributes:
        index: 0 to ``count - 1``; worker 0 registers the port's instance.
        count: how many workers share the port.
        group_id: the instance id of the whole group (the parent's); worker k is
            ``<group_id>-w<k>``.
        parent_fd: the read end of a pipe only the parent holds open; end of file means the
            parent is gone.
        environ: the parent's values of the variables set for this worker (None: unset),
            put back once the worker has read its configuration.
    """

    index: int
    count: int
    group_id: str
    parent_fd: int
    environ: dict[str, str | None] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        """This worker's own instance id."""
        return f"{self.group_id}-w{self.index}"


@functools.cache
def current_worker() -> WorkerSlot | None:
    """This process's worker slot, or None when it is not a worker (read once, then cached)."""
    raw = os.environ.get(_SLOT_VAR)
    if raw is None:
        return None
    data = json.loads(raw)
    return WorkerSlot(
        index=int(data["index"]),
        count=int(data["count"]),
        group_id=str(data["group_id"]),
        parent_fd=int(data["parent_fd"]),
        environ=dict(data["environ"]),
    )


def registered_instance_id(instance_id: str) -> str | None:
    """The id this process registers under, or None if it registers nothing.

    Args:
        instance_id: the App's own instance id.

    Returns:
        ``instance_id`` outside workers; the group's id in worker 0, which registers the one
        instance of the port for all; None in the other workers.
    """
    slot = current_worker()
    if slot is None:
        return instance_id
    return slot.group_id if slot.index == 0 else None


def serve_in_workers(app: App) -> int | None:
    """Serve ``app`` in ``server.workers`` processes if this process is to be their parent.

    Args:
        app: the built App whose ``run()`` is starting; its logging is configured.

    Returns:
        None when this process serves by itself (``workers: 1``, or it is a worker, now
        prepared); else, once every worker has exited, the exit status for the process: 0
        when a SIGTERM or SIGINT stopped them and each exited 0.

    Raises:
        ConfigError: ``server.port`` is 0 or in use, the metrics ports run past 65535, the
            command cannot be run again for a worker, or (in a worker) the App did not take
            the worker's instance id from the environment.
    """
    slot = current_worker()
    if slot is not None:
        _prepare_worker(app, slot)
        return None
    if app.config.server.workers == 1:
        return None
    return _Supervisor(app.config, app.instance_id).run()


# ----------------------------------------------------------------------------- worker side


def _prepare_worker(app: App, slot: WorkerSlot) -> None:
    if app.instance_id != slot.instance_id:
        raise ConfigError(
            [
                ConfigProblem(
                    "service.instance_id",
                    repr(app.instance_id),
                    f"worker {slot.index} must be {slot.instance_id!r}: build the App's config "
                    f"with load_config() or TetherConfig(...), which read {_ID_VAR}",
                )
            ]
        )
    # Processes this worker starts must not believe they are workers, nor inherit its id.
    os.environ.pop(_SLOT_VAR, None)
    for name, value in slot.environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    threading.Thread(
        target=_stop_when_parent_exits, args=(slot.parent_fd,), name="tether-parent", daemon=True
    ).start()


def _stop_when_parent_exits(fd: int) -> None:
    """Block until the parent's end of the pipe closes, then stop gracefully (SIGTERM)."""
    with contextlib.suppress(OSError):
        while os.read(fd, 64):  # the parent never writes; only end of file matters
            pass
    _log.warning("parent process gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]


class _Supervisor:
    """Starts the workers, forwards stop signals, reaps them; restarts nothing."""

    def __init__(self, config: TetherConfig, group_id: str) -> None:
        self._config = config
        self._group_id = group_id
        self._live: dict[int, _Worker] = {}
        self._stopping = False
        self._status = 0

    def run(self) -> int:
        count = self._config.server.workers
        _check(self._config)
        command = _command(count)
        parent_end, keep_end = os.pipe()  # keep_end stays open here, and only here
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        handlers = {signum: signal.getsignal(signum) for signum in (*_STOP_SIGNALS, signal.SIGCHLD)}
        for signum in handlers:
            signal.signal(signum, _record)  # set_wakeup_fd carries the signal to the loop
        old_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        try:
            _log.info("starting workers", workers=count, port=self._config.server.port)
            try:
                for index in range(count):
                    self._start(command, index, parent_end)
            except BaseException:
                self._forward(signal.SIGTERM)  # the ones already started, then give up
                for worker in self._live.values():
                    worker.proc.wait()
                raise
            self._loop(wake_read)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            for fd in (parent_end, keep_end, wake_read, wake_write):
                os.close(fd)
        _log.info("workers stopped", status=self._status)
        return self._status

    def _start(self, command: list[str], index: int, parent_end: int) -> None:
        cfg = self._config
        overrides = {_ID_VAR: f"{self._group_id}-w{index}"}
        if cfg.metrics.enabled and cfg.metrics.port != 0:
            overrides[_METRICS_PORT_VAR] = str(cfg.metrics.port + index)
        slot = {
            "index": index,
            "count": cfg.server.workers,
            "group_id": self._group_id,
            "parent_fd": parent_end,
            "environ": {name: os.environ.get(name) for name in overrides},
        }
        env = {**os.environ, **overrides, _SLOT_VAR: json.dumps(slot)}
        # A group of its own: a terminal's Ctrl-C (sent to the foreground group) reaches the
        # parent only, which forwards it once, so a worker never takes one Ctrl-C for two.
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, pass_fds=(parent_end,), process_group=0
        )
        self._live[proc.pid] = _Worker(index, proc)
        _log.info("worker started", worker=index, pid=proc.pid, worker_id=overrides[_ID_VAR])

    def _loop(self, wake_read: int) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(wake_read, selectors.EVENT_READ)
            self._reap()  # a worker may have exited before its SIGCHLD could wake us
            while self._live:
                selector.select()
                for signum in os.read(wake_read, 1024):
                    if signum in _STOP_SIGNALS:
                        self._forward(signal.Signals(signum))
                self._reap()

    def _forward(self, signum: signal.Signals) -> None:
        if not self._stopping:
            _log.info("stopping workers", signal=signum.name)
            self._stopping = True
        for pid in self._live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        for pid in list(self._live):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            worker = self._live.pop(pid)
            code = worker.proc.returncode = os.waitstatus_to_exitcode(status)
            if self._stopping:
                _log.info("worker exited", worker=worker.index, pid=pid, code=code)
                if code != 0 and self._status == 0:
                    self._status = _exit_status(code)
            else:
                # Not asked to stop: the group is no longer what was registered; end it whole
                # and let the process supervisor (systemd, Kubernetes) restart it.
                _log.error(
                    "worker exited unexpectedly; stopping the others",
                    worker=worker.index,
                    pid=pid,
                    code=code,
                )
                self._status = _exit_status(code) or 1
                self._forward(signal.SIGTERM)


def _record(signum: int, frame: object) -> None:
    """Signal handler of the parent: nothing to do here; the wakeup fd tells the loop."""


def _exit_status(code: int) -> int:
    """A worker's exit code as a shell reports it: killed by signal N is 128 + N."""
    return 128 - code if code < 0 else code


def _check(config: TetherConfig) -> None:
    """Refuse what cannot work with workers, before any is started."""
    server, metrics = config.server, config.metrics
    problems = []
    if server.port == 0:
        problems.append(
            ConfigProblem(
                "server.port",
                "0",
                f"must be a fixed port with server.workers={server.workers}: the workers share "
                "it, and port 0 would give each its own",
            )
        )
    elif _in_use(server.host, server.port):
        problems.append(
            ConfigProblem(
                "server.port",
                repr(server.port),
                f"cannot bind {server.host}:{server.port} (in use, or not permitted)",
            )
        )
    last = metrics.port + server.workers - 1
    if metrics.enabled and metrics.port != 0 and last > 65535:
        problems.append(
            ConfigProblem(
                "metrics.port",
                repr(metrics.port),
                f"worker k serves metrics on metrics.port + k, and {last} is past 65535",
            )
        )
    if problems:
        raise ConfigError(problems)


def _in_use(host: str, port: int) -> bool:
    """Whether something already listens on the port.

    The workers bind with SO_REUSEPORT, which would let them join another group of this user's
    on the same port without a word; a plain bind here fails instead, as a single process does.
    """
    try:
        family = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return False  # an unresolvable host: the workers' own bind reports it
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listener
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def _command(count: int) -> list[str]:
    """The command line that started this process, to start each worker with."""
    if sys.argv[0] in ("", "-"):  # interactive, or a program read from standard input
        raise ConfigError(
            [
                ConfigProblem(
                    "server.workers",
                    repr(count),
                    "each worker runs this process's command again, and this one read its "
                    "program from standard input; run a script, python -m or an entry point",
                )
            ]
        )
    return [sys.executable, *sys.orig_argv[1:]]
