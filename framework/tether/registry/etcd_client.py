"""An asyncio connection to an etcd cluster: endpoint failover, auth token, TLS.

tether talks to etcd through the protocol stubs of the ``etcd3`` package (distribution
``python3-etcd3``) on ``grpc.aio`` channels. The package's own client is synchronous, keeps its
only endpoint locked out for 300 s after one failure, and its watch thread dies silently when the
stream breaks (``watch.py`` calls an un-imported ``six``); the registry needs none of that, only the
messages and stubs, driven from the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from etcd3 import etcdrpc
from google.protobuf.message import Message

from tether.errors import RegistryUnavailable

__all__ = ["EtcdConnection", "prefix_end"]

#: Bound on every unary etcd call, so a blackholed endpoint costs seconds, not forever.
CALL_TIMEOUT = 2.0

# Failures that say "this endpoint cannot serve now": try the next one.
_ENDPOINT_FAILURES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
)

_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # grpc's default reconnect backoff grows to 120 s; an etcd that comes back must be used
    # within about a second, so the instance re-registers within the 2 s bar.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    # A partition sends no RST: pings find a dead peer under a long-lived watch. etcd refuses
    # pings more often than every 5 s (--grpc-keepalive-min-time), so 10 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key starting with ``prefix`` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS towards etcd; ``ca`` alone verifies the server only."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files into channel credentials.

        Raises:
            OSError: a file cannot be read.
        """
        ca = self.ca.read_bytes() if self.ca else None
        key = self.key.read_bytes() if self.key else None
        cert = self.cert.read_bytes() if self.cert else None
        return grpc.ssl_channel_credentials(ca, key, cert)


class _Endpoint:
    """One etcd member: its channel, stubs and auth token, made on first use."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.address = address
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self.stubs: dict[str, Any] = {}
        self.token: str | None = None

    def stub(self, name: str) -> Any:
        stub = self.stubs.get(name)
        if stub is None:
            if self._channel is None:
                options = list(_CHANNEL_OPTIONS)
                self._channel = (
                    grpc.aio.insecure_channel(self.address, options=options)
                    if self._credentials is None
                    else grpc.aio.secure_channel(self.address, self._credentials, options=options)
                )
            stub = self.stubs[name] = getattr(etcdrpc, f"{name}Stub")(self._channel)
        return stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._channel = None
        self.stubs.clear()
        self.token = None


class EtcdConnection:
    """Calls etcd on one endpoint at a time and moves to the next when one fails.

    Args:
        endpoints: ``(host, port)`` of every member; one is enough, a whole cluster is better.
        username: etcd user; with ``password``, every call carries an auth token.
        password: the user's password.
        tls: PEM files; plaintext when omitted.
        credentials: channel credentials already made (read once by :mod:`tether.tls`);
            used when ``tls`` is omitted.
        timeout: seconds allowed to each unary call.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if tls is not None:
            credentials = tls.credentials()
        self._endpoints = [
            _Endpoint(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", credentials)
            for host, port in endpoints
        ]
        self._current = 0
        self._username = username
        self._password = password
        self.timeout = timeout

    @property
    def endpoints(self) -> list[str]:
        """The member addresses, in the order they are tried."""
        return [endpoint.address for endpoint in self._endpoints]

    async def call(
        self,
        stub: str,
        method: str,
        request: Any,
        *,
        attempt_timeout: float | None = None,
        streaming: bool = False,
    ) -> Any:
        """Send one request, trying each endpoint once, starting with the current one.

        Args:
            stub: ``KV``, ``Lease``, ``Maintenance``... (``etcdrpc.<stub>Stub``).
            method: the RPC, e.g. ``Range``.
            request: its request message.
            attempt_timeout: seconds for each attempt; the connection's default if omitted.
            streaming: the RPC is a stream (``LeaseKeepAlive``): send ``request`` alone on it
                and return the first response.

        Returns:
            The response message.

        Raises:
            RegistryUnavailable: no endpoint answered.
            grpc.aio.AioRpcError: etcd answered with an error that is not about availability.
        """
        last: grpc.aio.AioRpcError | None = None
        for endpoint in self._rotation():
            try:
                metadata = await self._metadata(endpoint)
                rpc = getattr(endpoint.stub(stub), method)
                if not streaming:
                    return await rpc(
                        request, timeout=attempt_timeout or self.timeout, metadata=metadata
                    )
                call = rpc(
                    _once(request), timeout=attempt_timeout or self.timeout, metadata=metadata
                )
                try:
                    response = await call.read()
                finally:
                    call.cancel()
                if not isinstance(response, Message):  # grpc.aio.EOF: the stream ended
                    raise RegistryUnavailable(f"etcd at {endpoint.address} ended {method} early")
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNAUTHENTICATED and endpoint.token:
                    endpoint.token = None  # expired token: the next attempt authenticates again
                elif exc.code() not in _ENDPOINT_FAILURES:
                    raise
                last = exc
                self._failed(endpoint)
        raise RegistryUnavailable(_describe(self.endpoints, last)) from last

    async def open_watch(self, requests: asyncio.Queue[Any]) -> tuple[Any, str]:
        """Open a Watch stream on the current endpoint, fed from ``requests``.

        The stream asks for a member with a leader (clientv3's ``WithRequireLeader``), so a
        member cut off from its cluster ends the watch instead of going quiet.

        Returns:
            The stream call and the endpoint address it runs on.

        Raises:
            RegistryUnavailable: authentication failed on every endpoint.
        """
        last: grpc.aio.AioRpcError | None = None
        for endpoint in self._rotation():
            try:
                metadata = (*(await self._metadata(endpoint) or ()), ("hasleader", "true"))
            except grpc.aio.AioRpcError as exc:
                last = exc
                self._failed(endpoint)
                continue
            call = endpoint.stub("Watch").Watch(_drain(requests), metadata=metadata)
            return call, endpoint.address
        raise RegistryUnavailable(_describe(self.endpoints, last)) from last

    def failed(self, address: str) -> None:
        """Report that a stream on ``address`` broke, so the next call starts elsewhere."""
        for endpoint in self._endpoints:
            if endpoint.address == address:
                self._failed(endpoint)

    async def close(self) -> None:
        """Close every channel."""
        for endpoint in self._endpoints:
            await endpoint.close()

    def _rotation(self) -> list[_Endpoint]:
        start = self._current
        return self._endpoints[start:] + self._endpoints[:start]

    def _failed(self, endpoint: _Endpoint) -> None:
        index = self._endpoints.index(endpoint)
        if self._current == index:
            self._current = (index + 1) % len(self._endpoints)

    async def _metadata(self, endpoint: _Endpoint) -> tuple[tuple[str, str], ...] | None:
        if self._username is None:
            return None
        if endpoint.token is None:
            request = etcdrpc.AuthenticateRequest(
                name=self._username, password=self._password or ""
            )
            response = await endpoint.stub("Auth").Authenticate(request, timeout=self.timeout)
            endpoint.token = response.token
        return (("token", endpoint.token),)


async def _once(request: Any) -> AsyncIterator[Any]:
    yield request


async def _drain(requests: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        request = await requests.get()
        if request is None:
            return
        yield request


def _describe(endpoints: list[str], error: grpc.aio.AioRpcError | None) -> str:
    reason = "no answer" if error is None else f"{error.code().name}: {error.details()}"
    return f"etcd unreachable at {', '.join(endpoints)} ({reason})"
