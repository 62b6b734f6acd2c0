"""A loopback TCP proxy that can cut, blackhole or delay connections, for fault-injection tests."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import math
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tether.testing._managed import Managed

__all__ = ["TcpProxy"]

_T = TypeVar("_T")

_HOST = "127.0.0.1"
# Bounds every call into the proxy's thread, so a wedged proxy fails a test, never hangs it.
_CALL_TIMEOUT = 5.0
_CHUNK_SIZE = 64 * 1024
# Chunks read but not yet sent, per direction: enough for latency without buffering a flood.
_QUEUED_CHUNKS = 64
# SO_LINGER on with a zero timeout: closing the socket sends RST at once instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


class _Mode(enum.Enum):
    FORWARD = "forward"
    CUT = "cut"
    BLACKHOLE = "blackhole"


def _parse_upstream(upstream: str) -> tuple[str, int]:
    """Split ``host:port`` and resolve the host to a loopback IP address."""
    host, sep, port_text = upstream.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"upstream must be 'host:port' with a port in 1-65535, got {upstream!r}")
    port = int(port_text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"upstream host {host!r} does not resolve: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(ipaddress.ip_address(ip).is_loopback for ip in addresses):
        raise ValueError(
            f"upstream must be on loopback (127.0.0.0/8 or ::1), got {upstream!r} -> {addresses}"
        )
    # A numeric address spares asyncio a getaddrinfo() in an executor thread per connection.
    return addresses[0], port


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST, as a crashed peer or a firewall would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


async def _hold() -> None:
    """Wait until cancelled: keeps a blackholed connection open until heal() or close()."""
    await asyncio.get_running_loop().create_future()


class _Link:
    """One accepted connection, its upstream connection, and the task that pumps between them."""

    def __init__(self, client: asyncio.StreamWriter, *, blackholed: bool) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = blackholed
        self.task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()


class TcpProxy(Managed):
    """A TCP proxy from a free 127.0.0.1 port to a loopback upstream, with faults on demand.

    It runs its own event loop in a daemon thread, so it keeps forwarding while the test's
    thread or event loop is blocked, and it serves sync and async tests alike. Every method is
    thread-safe and returns once its change is in effect; call them from any thread but the
    proxy's own (an async test's event loop is blocked for the few milliseconds a call takes).

    Use it as a context manager (start on enter, close on exit), or call ``start()`` and
    ``close()``. Modes: forwarding (the default, back with ``heal()``), ``cut()`` and
    ``blackhole()``; ``delay()`` adds latency in any mode.
    """

    def __init__(self, upstream: str) -> None:
        """Prepare a proxy; nothing listens until ``start()``.

        Args:
            upstream: where to forward, as ``host:port``; the host must be a loopback address
                or a name that resolves only to loopback (``localhost``).

        Raises:
            ValueError: ``upstream`` is not ``host:port``, or its host is not on loopback.
        """
        self._upstream_name = upstream
        self._upstream = _parse_upstream(upstream)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._port: int | None = None
        # Touched only on the proxy's own thread.
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._mode = _Mode.FORWARD
        self._delay = 0.0

    def __repr__(self) -> str:
        where = self.address if self._port is not None else "not listening"
        return f"<TcpProxy {where} -> {self._upstream_name}>"

    @property
    def port(self) -> int:
        """The port the proxy listens on; raises ``RuntimeError`` before ``start()``."""
        if self._port is None:
            raise RuntimeError("the proxy has no port before start()")
        return self._port

    @property
    def address(self) -> str:
        """The address to connect to instead of the upstream, as ``127.0.0.1:port``."""
        return f"{_HOST}:{self.port}"

    @property
    def connections(self) -> int:
        """How many accepted connections are open now (blackholed ones included)."""
        return self._call(self._count_links)

    def start(self) -> None:
        """Start the proxy's thread and listen on a free 127.0.0.1 port.

        Raises:
            RuntimeError: the proxy was started before, or closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this TcpProxy is closed; make a new one")
            if self._thread is not None:
                raise RuntimeError("the proxy is already started; a TcpProxy starts once")
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._run_loop,
                args=(loop,),
                name=f"TcpProxy to {self._upstream_name}",
                daemon=True,
            )
            self._loop = loop
            self._thread.start()
        self._port = self._call(self._listen)

    def close(self) -> None:
        """Reset every connection, stop listening and end the proxy's thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shut_down(), loop).result(_CALL_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CALL_TIMEOUT)

    def cut(self) -> None:
        """Reset every open connection with RST, and reset new ones as soon as they connect.

        New connections are accepted and reset at once rather than refused, so the port stays
        the proxy's and ``heal()`` never has to bind it again. Lasts until ``heal()``.
        """
        self._call(self._cut)

    def blackhole(self) -> None:
        """Drop every byte in both directions, on open and new connections, until ``heal()``.

        Connections stay open and no RST or FIN gets through, as in a network partition:
        peers learn of the fault only through their own timeouts or keepalives.
        """
        self._call(self._blackhole)

    def heal(self) -> None:
        """Forward normally again, for new connections.

        Connections that were blackholed are reset: the bytes they dropped cannot be replayed,
        and resuming would give each peer a stream with a hole in it, which real TCP never
        does. The reset makes peers reconnect, as after a partition long enough for their
        keepalives to give up. Connections accepted before a ``cut()`` are gone already.
        """
        self._call(self._heal)

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` after it arrived, in both directions; 0 removes it.

        It adds latency, not a bandwidth limit: chunks read together leave together. It
        applies to chunks read from now on, in every mode.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {seconds!r}")

        async def set_delay() -> None:
            self._delay = seconds

        self._call(set_delay)

    def _call(self, action: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        loop, thread = self._loop, self._thread
        if self._closed or loop is None or thread is None:
            raise RuntimeError("the proxy is not running: start() it first, and not after close()")
        if threading.current_thread() is thread:
            raise RuntimeError("TcpProxy methods cannot be called from the proxy's own thread")
        return asyncio.run_coroutine_threadsafe(action(), loop).result(_CALL_TIMEOUT)

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # Everything below runs on the proxy's thread.

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, _HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _shut_down(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_links(lambda link: True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _count_links(self) -> int:
        return len(self._links)

    async def _cut(self) -> None:
        self._mode = _Mode.CUT
        await self._reset_links(lambda link: True)

    async def _blackhole(self) -> None:
        self._mode = _Mode.BLACKHOLE
        for link in self._links:
            link.blackholed = True

    async def _heal(self) -> None:
        self._mode = _Mode.FORWARD
        await self._reset_links(lambda link: link.blackholed)

    async def _reset_links(self, chosen: Callable[[_Link], bool]) -> None:
        for link in [link for link in self._links if chosen(link)]:
            link.reset()
            self._links.discard(link)
        # The aborted transports close their sockets in callbacks already queued: let them run,
        # so a caller that goes on to read sees the reset.
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode is _Mode.CUT:
            _reset(writer)
            return
        link = _Link(writer, blackholed=self._mode is _Mode.BLACKHOLE)
        self._links.add(link)
        # A task of its own, which the set of links keeps alive: Python 3.11 logs a spurious
        # error when the task start_server() runs this callback in is cancelled.
        link.task = asyncio.create_task(self._run(link, reader))

    async def _run(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            await self._serve(link, reader)
        except* OSError:
            # One side reset the connection, or the upstream refused it: reset the other.
            link.reset()
        finally:
            link.close()
            self._links.discard(link)

    async def _serve(self, link: _Link, client: asyncio.StreamReader) -> None:
        if link.blackholed:
            # Accepted during a partition: never reaches the upstream.
            while await client.read(_CHUNK_SIZE):
                pass
            await _hold()
        upstream, link.upstream = await asyncio.open_connection(*self._upstream)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pump(link, client, link.upstream))
            group.create_task(self._pump(link, upstream, link.client))

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """Copy one direction until EOF: each chunk ``delay`` late, dropped while blackholed."""
        loop = asyncio.get_running_loop()
        # Reading goes on while earlier chunks wait out their delay, so latency never adds up.
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUED_CHUNKS)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._send(link, chunks, sink))
            while data := await source.read(_CHUNK_SIZE):
                if not link.blackholed:
                    await chunks.put((loop.time() + self._delay, data))
            await chunks.put(None)
        if link.blackholed:
            # A partition drops FINs too: the other side must not learn of this close.
            await _hold()

    async def _send(
        self,
        link: _Link,
        chunks: asyncio.Queue[tuple[float, bytes] | None],
        sink: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        while (chunk := await chunks.get()) is not None:
            due, data = chunk
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            # Checked after the delay: a blackhole that began meanwhile drops queued chunks too.
            if not link.blackholed:
                sink.write(data)
                await sink.drain()
        if not link.blackholed and sink.can_write_eof():
            # Forward a half-close; the other direction may still be talking.
            sink.write_eof()
