"""The etcd registry: a lease kept alive forever, and a prefix watch that never loses the set."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from tether.config import RegistryConfig
from tether.context import detached_task
from tether.errors import RegistryUnavailable
from tether.log import get_logger
from tether.registry.base import Instance, InstanceWatch, Watcher, sorted_instances
from tether.registry.etcd_client import EtcdConnection, prefix_end
from tether.tls import channel_credentials

__all__ = ["Backoff", "EtcdRegistry"]

_log = get_logger("tether.registry")

# Retry pacing while etcd is away: quick enough to be back within the 2 s bar once it answers.
_BACKOFF_INITIAL = 0.1
_BACKOFF_MAX = 1.0
# Time a graceful deregistration may spend revoking the lease before giving up (it expires).
_REVOKE_TIMEOUT = 1.0


class Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling to a cap.

    Args:
        initial: the first delay's upper bound, in seconds.
        maximum: the cap on the delay.
        rand: the random source (tests pass a seeded one).
    """

    def __init__(
        self,
        initial: float = _BACKOFF_INITIAL,
        maximum: float = _BACKOFF_MAX,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial!r} and {maximum!r}")
        self._initial = initial
        self._maximum = maximum
        self._rand = rand
        self._next = initial

    def next(self) -> float:
        """The next delay, in seconds."""
        bound = self._next
        self._next = min(self._next * 2, self._maximum)
        return self._rand(bound / 2, bound)

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self._next = self._initial


class _StateLog:
    """Logs a loop's state only when it changes, so an outage is one line, not one per retry.

    The one place a loop's state changes, so ``on_change`` (metrics) hears every change too.
    """

    def __init__(self, *, on_change: Callable[[str], None] | None = None, **fields: Any) -> None:
        self.state = "starting"
        self._fields = fields
        self._on_change = on_change

    def enter(
        self,
        state: str,
        message: str | None,
        *,
        warn: bool = False,
        severe: bool = False,
        **fields: Any,
    ) -> None:
        if state == self.state:
            return
        self.state = state
        if message is not None:
            log = _log.error if severe else _log.warning if warn else _log.info
            log(message, **self._fields, **fields)
        if self._on_change is not None:
            try:
                self._on_change(state)
            except Exception as exc:  # a broken metric must not break the registration loop
                _log.error("registration state listener failed", exc_info=exc)


class EtcdRegistry:
    """A :class:`~tether.registry.Registry` on etcd.

    Each registered instance is the key ``{prefix}/{service}/{id}`` holding its JSON, under a
    lease of ``ttl_seconds`` renewed every third of it. Whatever happens to etcd, the instance
    is put back under a new lease as soon as etcd answers again. Discovery reads the whole prefix
    at a revision, watches from the next one, and reads again after any break; an unreachable
    etcd leaves the last known instances in place.

    Args:
        config: the registry section of the service's configuration.
        connection: an :class:`EtcdConnection` to use instead of one built from ``config``.

    Raises:
        ConfigError: a file of ``registry.tls`` cannot be read, is not PEM, or its key is not
            its certificate's.
    """

    def __init__(self, config: RegistryConfig, *, connection: EtcdConnection | None = None) -> None:
        self.config = config
        tls = config.tls
        self._conn = connection or EtcdConnection(
            config.addresses,
            username=config.username,
            password=config.password.get_secret_value() if config.password else None,
            credentials=(
                channel_credentials(
                    ca_file=tls.ca_file,
                    cert_file=tls.cert_file,
                    key_file=tls.key_file,
                    field="registry.tls",
                )
                if tls.ca_file or tls.cert_file
                else None
            ),
        )
        self._prefix = config.prefix.encode() + b"/"
        self._registrations: dict[str, _Registration] = {}
        self._follower: _PrefixFollower | None = None

    def key(self, instance: Instance) -> bytes:
        """The etcd key of ``instance``."""
        return self._prefix + f"{instance.service}/{instance.id}".encode()

    # ---------------------------------------------------------------- Registrar

    async def register(
        self, instance: Instance, *, on_state: Callable[[str], None] | None = None
    ) -> None:
        """Publish ``instance`` and keep it published, through any etcd outage.

        Returns once the first attempt is over: registered, or (unless ``required``) left to
        the background loop, which registers as soon as etcd answers.

        Args:
            instance: what to publish.
            on_state: told each change of the registration's state (metrics): ``registered``,
                ``unreachable``, ``lost``, ``failing``, and ``deregistered`` at the end; must
                not block.

        Raises:
            RegistryUnavailable: ``required`` is set and etcd did not answer within the TTL.
        """
        if instance.id in self._registrations:
            raise RuntimeError(f"instance {instance.id!r} is already registered")
        registration = _Registration(
            self._conn, self.key(instance), instance, self.config, on_state=on_state
        )
        self._registrations[instance.id] = registration
        registration.start()
        if self.config.required:
            try:
                await asyncio.wait_for(registration.registered.wait(), self.config.ttl_seconds)
            except TimeoutError:
                refusal = registration.refusal
                await self.deregister(instance)
                why = (
                    f"; etcd refused: {refusal} on {self.key(instance).decode()}" if refusal else ""
                )
                raise RegistryUnavailable(
                    f"could not register in etcd within {self.config.ttl_seconds} s "
                    f"at {', '.join(self._conn.endpoints)} (registry.required is true{why})"
                ) from None
        else:
            await registration.first_attempt.wait()

    async def deregister(self, instance: Instance) -> None:
        """Stop renewing and revoke the lease, so watchers see the key deleted at once."""
        registration = self._registrations.pop(instance.id, None)
        if registration is not None:
            await registration.stop()

    # ---------------------------------------------------------------- Discovery

    async def get(self, service: str) -> list[Instance]:
        """The instances of ``service``: from the watch cache once it is loaded, else from etcd.

        Raises:
            RegistryUnavailable: the cache is not loaded and etcd did not answer.
        """
        if self._follower is not None and self._follower.synced.is_set():
            return self._follower.instances(service)
        prefix = self._prefix + service.encode() + b"/"
        request = etcdrpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._conn.call("KV", "Range", request)
        return sorted_instances(
            instance
            for kv in response.kvs
            if (instance := _parse(kv.key, kv.value, self._prefix)) is not None
        )

    def watch(self, service: str) -> Watcher:
        """Follow ``service``; the first :meth:`~Watcher.next` returns once etcd has been read."""
        if self._follower is None:
            # Instances lost with etcd's data get two TTLs to register again before they go.
            hold = 2.0 * self.config.ttl_seconds
            self._follower = _PrefixFollower(self._conn, self._prefix, hold_seconds=hold)
            self._follower.start()
        return self._follower.subscribe(service)

    async def listing(self, service: str | None = None) -> list[tuple[Instance, int]]:
        """Every registered instance (of ``service``, or all) with its lease's seconds left.

        Reads etcd directly, not the watch cache: this is what ``tether instances`` shows.
        A key without a lease shows -1.

        Raises:
            RegistryUnavailable: etcd did not answer.
        """
        prefix = self._prefix + (service.encode() + b"/" if service else b"")
        request = etcdrpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._conn.call("KV", "Range", request)
        rows: list[tuple[Instance, int]] = []
        for kv in response.kvs:
            instance = _parse(kv.key, kv.value, self._prefix)
            if instance is None:
                continue
            ttl = -1
            if kv.lease:
                lease = await self._conn.call(
                    "Lease", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=kv.lease)
                )
                ttl = int(lease.TTL)
            rows.append((instance, ttl))
        return sorted(rows, key=lambda row: (row[0].service, row[0].id))

    async def close(self) -> None:
        """Deregister every instance, stop watching and close the connection."""
        for registration in list(self._registrations.values()):
            await self.deregister(registration.instance)
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None
        await self._conn.close()


class _Registration:
    """Keeps one instance's key alive: lease, put, keepalive; on any loss, start over."""

    def __init__(
        self,
        conn: EtcdConnection,
        key: bytes,
        instance: Instance,
        config: RegistryConfig,
        *,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.instance = instance
        self.registered = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self._conn = conn
        self._key = key
        self._value = instance.to_json()
        self._ttl = config.ttl_seconds
        self._user = config.username
        #: Why etcd refused the last attempt (permission denied...), or None.
        self.refusal: str | None = None
        self._lease: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = _StateLog(
            on_change=on_state, registered_service=instance.service, registered_id=instance.id
        )

    def start(self) -> None:
        self._task = detached_task(self._run(), name=f"tether-register-{self.instance.id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._state.enter("deregistered", None)  # logged below, once the lease is revoked
        if self._lease is None:
            return
        try:
            await self._conn.call(
                "Lease",
                "LeaseRevoke",
                etcdrpc.LeaseRevokeRequest(ID=self._lease),
                attempt_timeout=_REVOKE_TIMEOUT,
            )
            _log.info(
                "deregistered",
                registered_service=self.instance.service,
                registered_id=self.instance.id,
            )
        except (RegistryUnavailable, grpc.aio.AioRpcError) as exc:
            _log.warning(
                "deregistration failed; the key expires with its lease",
                registered_id=self.instance.id,
                ttl_seconds=self._ttl,
                error=str(exc),
            )
        self._lease = None

    async def _run(self) -> None:
        backoff = Backoff()
        healthy = False  # the last step succeeded: wait a renewal period, not a backoff
        while True:
            if healthy:
                await asyncio.sleep(self._ttl / 3)
            try:
                await self._step()
            except (RegistryUnavailable, grpc.aio.AioRpcError) as exc:
                reason = _refusal(exc)
                self.refusal = reason
                if reason is not None:
                    # Who we are, not where etcd is: say so, once, with what to grant.
                    self._state.enter(
                        "refused",
                        "registration refused by etcd; retrying",
                        severe=True,
                        reason=reason,
                        key_prefix=self._key[: self._key.rfind(b"/") + 1].decode(),
                        user=self._user,
                    )
                else:
                    self._state.enter(
                        "unreachable",
                        "registry unreachable; retrying until it answers",
                        warn=True,
                        error=_brief(exc),
                    )
            except Exception as exc:  # never give up: a bug here must not unregister us for good
                self._state.enter(
                    "failing", "registration failed; retrying", warn=True, error=_brief(exc)
                )
                _log.exception("registration loop error", registered_id=self.instance.id)
            else:
                healthy = True
                self.refusal = None
                backoff.reset()
                continue
            healthy = False
            self.first_attempt.set()
            await asyncio.sleep(backoff.next())

    async def _step(self) -> None:
        """Register under a new lease if there is none, else renew the lease once."""
        if self._lease is None:
            await self._put_under_new_lease()
            return
        if not await self._keep_alive():
            self._lease = None
            self.registered.clear()
            self._state.enter("lost", "lease lost; registering again", warn=True)
            await self._put_under_new_lease()
            return
        await self._ensure_key()
        self._state.enter("registered", "registration renewed")

    async def _put_under_new_lease(self) -> None:
        grant = await self._conn.call(
            "Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=self._ttl)
        )
        await self._conn.call(
            "KV", "Put", etcdrpc.PutRequest(key=self._key, value=self._value, lease=grant.ID)
        )
        self._lease = grant.ID
        self.registered.set()
        self.first_attempt.set()
        self._state.enter(
            "registered",
            "registered",
            address=self.instance.address,
            lease=f"{grant.ID:x}",
            ttl_seconds=self._ttl,
        )

    async def _keep_alive(self) -> bool:
        """Renew the lease once; False when etcd no longer knows it."""
        assert self._lease is not None
        request = etcdrpc.LeaseKeepAliveRequest(ID=self._lease)
        response = await self._conn.call("Lease", "LeaseKeepAlive", request, streaming=True)
        return bool(response.TTL > 0)

    async def _ensure_key(self) -> None:
        """Put the key back if someone deleted it while the lease lived on."""
        response = await self._conn.call(
            "KV", "Range", etcdrpc.RangeRequest(key=self._key, keys_only=True)
        )
        if response.kvs and response.kvs[0].lease == self._lease:
            return
        await self._conn.call(
            "KV", "Put", etcdrpc.PutRequest(key=self._key, value=self._value, lease=self._lease)
        )
        _log.warning(
            "registration key was deleted or overwritten; put it back",
            registered_service=self.instance.service,
            registered_id=self.instance.id,
        )


# What etcd answers when it refuses the caller rather than being away: a missing permission
# (PERMISSION_DENIED), a wrong password (INVALID_ARGUMENT "authentication failed"), a user given
# to an etcd without auth (FAILED_PRECONDITION "authentication is not enabled").
_REFUSALS = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def _refusal(exc: BaseException) -> str | None:
    """etcd's reason when it refused the request for who sent it, else None."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _REFUSALS:
        details = exc.details() or exc.code().name
        return details.removeprefix("etcdserver: ")[:200]
    return None


def _brief(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


def _parse(key: bytes, value: bytes, prefix: bytes) -> Instance | None:
    """The instance a key holds, or None (logged) when the key or value is malformed."""
    service, _, instance_id = key[len(prefix) :].decode(errors="replace").partition("/")
    try:
        instance = Instance.from_json(value)
    except ValueError as exc:
        _log.warning(
            "ignoring a malformed registry value",
            key=key[:200].decode(errors="replace"),
            error=str(exc)[:200],
        )
        return None
    if instance.service != service or instance.id != instance_id:
        _log.warning(
            "ignoring a registry value whose key does not match it",
            key=key[:200].decode(errors="replace"),
        )
        return None
    return instance


class _PrefixFollower:
    """Mirrors every instance under the prefix: read at revision R, watch from R + 1, repeat.

    When etcd comes back with an older revision than one already seen, it lost its data (a
    wiped or restored member): the instances missing from it did not leave, they will register
    again within a renewal period. They are held for ``hold_seconds`` instead of being dropped
    at once, so callers keep their instances; any that do not come back are dropped then.
    """

    def __init__(self, conn: EtcdConnection, prefix: bytes, *, hold_seconds: float) -> None:
        self.synced = asyncio.Event()
        self._conn = conn
        self._prefix = prefix
        self._hold_seconds = hold_seconds
        self._revision = 0
        self._held: dict[bytes, Instance] = {}
        self._timers: list[asyncio.TimerHandle] = []
        self._by_key: dict[bytes, Instance] = {}
        self._watches: dict[str, set[InstanceWatch]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._state = _StateLog(prefix=prefix.decode(errors="replace"))

    def start(self) -> None:
        self._task = detached_task(self._run(), name="tether-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for timer in self._timers:
            timer.cancel()
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.close()

    def instances(self, service: str) -> list[Instance]:
        return sorted_instances(i for i in self._by_key.values() if i.service == service)

    def subscribe(self, service: str) -> Watcher:
        watch = InstanceWatch(service, on_close=self._forget)
        self._watches[service].add(watch)
        if self.synced.is_set():
            watch.publish(self.instances(service))
        return watch

    def _forget(self, watch: InstanceWatch) -> None:
        self._watches[watch.service].discard(watch)

    def _publish(self, services: Iterable[str]) -> None:
        for service in services:
            watches = self._watches.get(service)
            if watches:
                current = self.instances(service)
                for watch in watches:
                    watch.publish(current)

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                revision = await self._relist()
                backoff.reset()
                await self._follow(revision + 1)
            except (RegistryUnavailable, grpc.aio.AioRpcError) as exc:
                reason = _refusal(exc)
                if reason is not None:
                    self._state.enter(
                        "refused",
                        "discovery refused by etcd; keeping the last known instances",
                        severe=True,
                        reason=reason,
                    )
                else:
                    self._state.enter(
                        "unreachable",
                        "registry unreachable; keeping the last known instances",
                        warn=True,
                        error=_brief(exc),
                    )
            except Exception as exc:  # keep following: the cache must not freeze on a bug
                self._state.enter(
                    "failing", "discovery failed; retrying", warn=True, error=_brief(exc)
                )
                _log.exception("discovery loop error")
            await asyncio.sleep(backoff.next())

    async def _relist(self) -> int:
        """Read the whole prefix and apply the difference from the cache; return the revision."""
        request = etcdrpc.RangeRequest(key=self._prefix, range_end=prefix_end(self._prefix))
        response = await self._conn.call("KV", "Range", request)
        fresh: dict[bytes, Instance] = {}
        for kv in response.kvs:
            instance = _parse(kv.key, kv.value, self._prefix)
            if instance is not None:
                fresh[kv.key] = instance
        revision = int(response.header.revision)
        if revision < self._revision:
            self._hold_missing(fresh, revision)
        for key in list(self._held):
            if key in fresh:
                del self._held[key]  # registered again
            else:
                fresh[key] = self._held[key]
        changed = {
            instance.service
            for key in self._by_key.keys() | fresh.keys()
            for instance in (self._by_key.get(key), fresh.get(key))
            if instance is not None and self._by_key.get(key) != fresh.get(key)
        }
        self._by_key = fresh
        self._revision = revision
        first = not self.synced.is_set()
        self.synced.set()
        self._publish(self._watches.keys() if first else changed)
        self._state.enter("watching", "discovery in sync", revision=revision)
        return revision

    def _hold_missing(self, fresh: dict[bytes, Instance], revision: int) -> None:
        """Keep the instances etcd forgot for a while, and drop those not back by then."""
        missing = {key: inst for key, inst in self._by_key.items() if key not in fresh}
        _log.warning(
            "etcd lost its data; holding the instances it forgot while they register again",
            revision_before=self._revision,
            revision_now=revision,
            held=len(missing),
            hold_seconds=self._hold_seconds,
        )
        self._held.update(missing)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self._hold_seconds, self._release, dict(missing)))

    def _release(self, held: dict[bytes, Instance]) -> None:
        """Drop held instances that never registered again (their keys were not written)."""
        changed: set[str] = set()
        for key, instance in held.items():
            if self._held.get(key) is instance:
                del self._held[key]
                if self._by_key.get(key) is instance:
                    del self._by_key[key]
                    changed.add(instance.service)
        self._publish(changed)

    async def _follow(self, start_revision: int) -> None:
        """Apply watch events until the stream ends, breaks or is compacted past."""
        requests: asyncio.Queue[Any] = asyncio.Queue()
        create = etcdrpc.WatchCreateRequest(
            key=self._prefix, range_end=prefix_end(self._prefix), start_revision=start_revision
        )
        requests.put_nowait(etcdrpc.WatchRequest(create_request=create))
        call, address = await self._conn.open_watch(requests)
        try:
            async for response in call:
                if response.compact_revision or response.canceled:
                    # Events were compacted away, or etcd ended the watch: read everything again.
                    _log.info(
                        "watch ended by etcd; reading the prefix again",
                        compact_revision=response.compact_revision,
                        reason=response.cancel_reason or None,
                    )
                    return
                self._revision = max(self._revision, int(response.header.revision))
                self._apply(response.events)
        except grpc.aio.AioRpcError:
            self._conn.failed(address)
            raise
        finally:
            requests.put_nowait(None)
            call.cancel()

    def _apply(self, events: Iterable[Any]) -> None:
        changed: set[str] = set()
        for event in events:
            key = bytes(event.kv.key)
            self._held.pop(key, None)  # etcd speaks for this key again
            if event.type == kv_pb2.Event.DELETE:
                gone = self._by_key.pop(key, None)
                if gone is not None:
                    changed.add(gone.service)
                continue
            instance = _parse(key, event.kv.value, self._prefix)
            old = self._by_key.pop(key, None)
            if old is not None:
                changed.add(old.service)
            if instance is not None:
                self._by_key[key] = instance
                changed.add(instance.service)
        self._publish(changed)
