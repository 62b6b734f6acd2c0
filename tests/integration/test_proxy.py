"""Tests of the fault-injecting TCP proxy: tether.testing.proxy."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tether.testing.proxy import TcpProxy

# Long enough for any loaded machine; only a broken proxy ever waits this out.
_IO_TIMEOUT = 5.0
# How long a blackholed read must stay silent: never waited out by a proxy that works.
_SILENCE = 0.3


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.accepted += 1  # type: ignore[attr-defined]
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            # The proxy resets connections on purpose; that is not an echo server error.
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    accepted = 0


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    """A TCP echo server on a free 127.0.0.1 port, running in a thread."""
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    # shutdown() waits up to one poll interval; the default 0.5 s would add up over the tests.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="echo", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_IO_TIMEOUT)


def address_of(server: _EchoServer) -> str:
    """The echo server's address as ``host:port``."""
    host, port = server.server_address[:2]
    return f"{host!s}:{port}"


@pytest.fixture
def proxy(echo: _EchoServer) -> Iterator[TcpProxy]:
    """A started proxy in front of the echo server, closed after the test."""
    with TcpProxy(address_of(echo)) as proxy:
        yield proxy


@contextmanager
def connect(proxy: TcpProxy) -> Iterator[socket.socket]:
    """A client socket connected to the proxy, every call bounded by _IO_TIMEOUT."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=_IO_TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


def echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and read back as many bytes (fewer only if the stream ends)."""
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(len(payload) - len(received))
        if not chunk:
            break
        received += chunk
    return received


def wait_until(predicate: Callable[[], bool], message: str, timeout: float = _IO_TIMEOUT) -> None:
    """Poll ``predicate`` until it holds; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"{message} (waited {timeout:g} s)")
        time.sleep(0.01)


def assert_reset_or_closed(sock: socket.socket) -> None:
    """The peer ended ``sock``: a read raises a reset or sees end of stream, within _IO_TIMEOUT."""
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    except TimeoutError:
        pytest.fail(f"the connection was neither reset nor closed within {_IO_TIMEOUT:g} s")
    assert data == b"", f"expected the connection to be closed, read {data!r}"


def assert_refused_or_reset(proxy: TcpProxy) -> None:
    """A new connection to the proxy is refused, or reset or closed as soon as it is made."""
    try:
        with connect(proxy) as sock:
            sock.sendall(b"anyone?")
            assert_reset_or_closed(sock)
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
        pass


def test_forwards_bytes_both_ways(proxy: TcpProxy) -> None:
    """What a client sends reaches the upstream, and its answer comes back."""
    with connect(proxy) as sock:
        assert echo_through(sock, b"hello") == b"hello"
        assert echo_through(sock, b"x" * 200_000) == b"x" * 200_000


def test_address_names_the_listening_port(proxy: TcpProxy) -> None:
    """address is 127.0.0.1 and the port the proxy listens on."""
    assert proxy.address == f"127.0.0.1:{proxy.port}"


def test_connections_counts_open_connections(proxy: TcpProxy) -> None:
    """connections follows clients as they connect and leave."""
    with connect(proxy) as first, connect(proxy) as second:
        echo_through(first, b"1")
        echo_through(second, b"2")
        assert proxy.connections == 2
    wait_until(lambda: proxy.connections == 0, "closed clients still counted as connections")


def test_cut_resets_open_connections(proxy: TcpProxy) -> None:
    """cut() resets a connection that was forwarding, and it stops being counted at once."""
    with connect(proxy) as sock:
        assert echo_through(sock, b"before") == b"before"

        proxy.cut()

        assert proxy.connections == 0
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_cut_refuses_new_connections(proxy: TcpProxy, echo: _EchoServer) -> None:
    """After cut() a new connection is reset at once and never reaches the upstream."""
    proxy.cut()

    assert_refused_or_reset(proxy)
    assert echo.accepted == 0


def test_heal_after_cut_forwards_again(proxy: TcpProxy) -> None:
    """heal() after cut() forwards new connections on the same port."""
    port = proxy.port
    proxy.cut()

    proxy.heal()

    assert proxy.port == port
    with connect(proxy) as sock:
        assert echo_through(sock, b"back") == b"back"


def test_blackhole_drops_bytes_without_closing(proxy: TcpProxy) -> None:
    """During blackhole() an open connection stays open but nothing comes back."""
    with connect(proxy) as sock:
        assert echo_through(sock, b"before") == b"before"

        proxy.blackhole()

        sock.sendall(b"lost")
        sock.settimeout(_SILENCE)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert proxy.connections == 1


def test_blackhole_accepts_new_connections_but_forwards_nothing(
    proxy: TcpProxy, echo: _EchoServer
) -> None:
    """A connection made during blackhole() is accepted and kept, but never reaches upstream."""
    proxy.blackhole()

    with connect(proxy) as sock:
        sock.sendall(b"anyone?")
        sock.settimeout(_SILENCE)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert proxy.connections == 1
    assert echo.accepted == 0


def test_heal_resets_blackholed_connections_and_forwards_new_ones(proxy: TcpProxy) -> None:
    """heal() resets the connections that lost bytes; new connections are forwarded again."""
    with connect(proxy) as blackholed:
        echo_through(blackholed, b"before")
        proxy.blackhole()
        blackholed.sendall(b"lost")

        proxy.heal()

        assert_reset_or_closed(blackholed)
    with connect(proxy) as sock:
        assert echo_through(sock, b"healed") == b"healed"


def test_delay_adds_latency(proxy: TcpProxy) -> None:
    """With delay(d) a round trip takes at least d."""
    with connect(proxy) as sock:
        proxy.delay(0.2)
        started = time.monotonic()

        assert echo_through(sock, b"slow") == b"slow"

        assert time.monotonic() - started >= 0.2


def test_delay_rejects_a_negative_value(proxy: TcpProxy) -> None:
    """A negative delay is an error that names the value."""
    with pytest.raises(ValueError, match=r"-1"):
        proxy.delay(-1)


async def test_works_from_an_async_test(proxy: TcpProxy) -> None:
    """Called from an event loop, the proxy forwards and cuts as from a sync test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"async")
        assert await asyncio.wait_for(reader.readexactly(5), _IO_TIMEOUT) == b"async"

        proxy.cut()

        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), _IO_TIMEOUT)
    finally:
        writer.close()


def test_close_ends_the_thread_and_every_connection(echo: _EchoServer) -> None:
    """close() resets open connections and ends the proxy's thread; a second close() is fine."""
    proxy = TcpProxy(address_of(echo))
    proxy.start()
    name = f"TcpProxy to {address_of(echo)}"
    threads = [thread for thread in threading.enumerate() if thread.name == name]
    with connect(proxy) as sock:
        echo_through(sock, b"open")

        proxy.close()

        assert_reset_or_closed(sock)
    assert len(threads) == 1
    assert not threads[0].is_alive()
    proxy.close()


def test_methods_fail_before_start(echo: _EchoServer) -> None:
    """A proxy that was never started says so instead of hanging."""
    proxy = TcpProxy(address_of(echo))

    with pytest.raises(RuntimeError, match="start"):
        proxy.cut()

    proxy.close()


def test_upstream_must_be_on_loopback() -> None:
    """An upstream off loopback is refused when the proxy is made."""
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy("192.0.2.1:80")


def test_upstream_must_be_host_and_port() -> None:
    """An upstream without a port is refused with the expected form."""
    with pytest.raises(ValueError, match="'host:port'"):
        TcpProxy("127.0.0.1")
