"""A real etcd cluster of several members on free loopback ports, for fault-injection tests."""

from __future__ import annotations

import collections
import http.client
import json
import secrets
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.testing._managed import Managed
from tether.testing.etcd import (
    _DIRECT,
    _HEALTH_POLL_INTERVAL,
    _HEALTH_REQUEST_TIMEOUT,
    _HOST,
    _PORT_ATTEMPTS,
    _SIGNAL_WAIT,
    EtcdServer,
    _await_launches,
    _fail_launch,
    _Failure,
    _free_ports,
    _Launch,
    _terminate,
    find_etcd_binary,
)

if TYPE_CHECKING:
    import etcd3

__all__ = ["EtcdCluster"]

_LEADER_POLL_INTERVAL = 0.05
# Maintenance.Status through etcd's JSON gateway names both the member that answers
# (header.member_id) and the leader it follows; etcd3's status() drops the header.
_STATUS_PATH = "/v3/maintenance/status"


@dataclass(frozen=True)
class _Status:
    """What one member says: its own raft id, and the leader it follows (0 for none)."""

    member_id: int
    leader_id: int


def _read_status(member: EtcdServer) -> _Status | None:
    """Ask one member for its status; None when it does not answer (stopped, paused, starting)."""
    if not member.is_running:
        return None
    url = member.client_url + _STATUS_PATH
    try:
        with _DIRECT.open(url, data=b"{}", timeout=_HEALTH_REQUEST_TIMEOUT) as response:
            body = json.load(response)
        # The gateway writes uint64 fields as strings and leaves out the ones that are zero.
        return _Status(int(body["header"]["member_id"]), int(body.get("leader", 0)))
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        return None


def _serves_peers(launch: _Launch) -> bool:
    """Whether a launched member answers on its peer URL, even with an error status."""
    url = f"http://{_HOST}:{launch.ports[1]}/version"
    try:
        with _DIRECT.open(url, timeout=_HEALTH_REQUEST_TIMEOUT):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, http.client.HTTPException):
        return False


def _await_peer_service(launch: _Launch, deadline: float, timeout: float) -> _Failure | None:
    """Wait until a launched member serves its peers; on failure stop it and say why."""
    while launch.process.poll() is None:
        if _serves_peers(launch):
            return None
        if time.monotonic() >= deadline:
            return _fail_launch(launch, f"its peer URL did not answer within {timeout:g} s")
        time.sleep(_HEALTH_POLL_INTERVAL)
    return _fail_launch(launch, "it exited")


class EtcdCluster(Managed):
    """A real etcd cluster on 127.0.0.1: ``size`` members, each an ``EtcdServer`` of its own.

    Use it as a context manager (start on enter, close on exit), or call ``start()`` and
    ``close()``. Every member's ports are picked before any member starts, so each knows all
    its peers; a member keeps its ports and data dir across ``stop()``/``kill()`` and
    ``start()``, and rejoins the cluster. ``restart(wipe=True)`` of a member fails: etcd
    refuses to bootstrap again a member its peers already know. Members left running are
    stopped when they are garbage-collected or when the interpreter exits, as an
    ``EtcdServer`` is.
    """

    def __init__(
        self, size: int = 3, *, binary: str | None = None, startup_timeout: float = 30.0
    ) -> None:
        """Prepare a cluster; nothing runs until ``start()``.

        Args:
            size: the number of members.
            binary: the etcd executable; by default ``find_etcd_binary()``.
            startup_timeout: seconds ``start()`` waits for every member to report healthy,
                and then again for a leader.

        Raises:
            EtcdNotFound: no binary was given and none was found.
            ValueError: ``size`` is below 1, or ``startup_timeout`` is not positive.
        """
        if size < 1:
            raise ValueError(f"size must be at least 1 member, got {size!r}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout!r}")
        self._size = size
        self._binary = binary if binary is not None else find_etcd_binary()
        self._startup_timeout = startup_timeout
        # A token of its own keeps members of two clusters from ever taking each other as peers.
        self._token = f"tether-{secrets.token_hex(4)}"
        self._members: list[EtcdServer] = []
        self._closed = False

    def __repr__(self) -> str:
        running = sum(member.is_running for member in self._members)
        return f"<EtcdCluster {self._size} members, {running} running>"

    @property
    def members(self) -> list[EtcdServer]:
        """The members, in a fixed order; raises ``RuntimeError`` before the first start."""
        if not self._members:
            raise RuntimeError("the etcd cluster has no members before its first start()")
        return list(self._members)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every member's client address as ``host:port``, in the order of ``members``."""
        return tuple(member.endpoint for member in self.members)

    def start(self) -> None:
        """Start every member that is not running, then wait for a leader.

        The first start creates the members; later ones bring stopped members back on their
        ports and data dirs. Every member is started before any is waited on for health, since
        none turns healthy before a quorum runs.

        Raises:
            RuntimeError: the cluster was closed.
            EtcdStartError: a member exited or was not healthy within ``startup_timeout``; the
                members this call started are stopped before this is raised.
            TimeoutError: the members are healthy but agree on no leader in time.
        """
        if self._closed:
            raise RuntimeError("this EtcdCluster is closed; make a new one")
        if self._members:
            failure = self._launch([member for member in self._members if not member.is_running])
            if failure is not None:
                raise failure.error
        else:
            self._members = self._create()
        self.wait_for_leader(self._startup_timeout)

    def close(self) -> None:
        """Kill every member and delete their temp dirs. Idempotent.

        Members are killed, not stopped gracefully: their data is deleted anyway, and etcd 3.5
        takes about a second to stop gracefully while it has live peers.
        """
        self._closed = True
        for member in self._members:
            member.kill()
            member.close()

    def leader(self) -> EtcdServer | None:
        """The member that is the raft leader now, or None during an election or without quorum.

        A member counts as leader when it says so itself and a quorum of members (itself
        included) follow it, so a deposed leader that has not yet heard of the new term is
        never returned. Members that do not answer within 0.5 s count as not following.
        """
        statuses = {member: _read_status(member) for member in self.members}
        followers = collections.Counter(
            status.leader_id for status in statuses.values() if status is not None
        )
        quorum = self._size // 2 + 1
        for member, status in statuses.items():
            if status is None or status.leader_id != status.member_id:
                continue
            if followers[status.member_id] >= quorum:
                return member
        return None

    def wait_for_leader(self, timeout: float = 10.0) -> EtcdServer:
        """Wait until a quorum of members follows one leader, and return that leader.

        Args:
            timeout: seconds to wait.

        Returns:
            The leader.

        Raises:
            TimeoutError: no leader within ``timeout``; the message says what each member saw.
        """
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None:
                return leader
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the etcd cluster elected no leader within {timeout:g} s "
                    f"(a quorum is {self._size // 2 + 1} of {self._size}):\n" + self._describe()
                )
            time.sleep(_LEADER_POLL_INTERVAL)

    def client(self, timeout: float = 5.0) -> etcd3.Etcd3Client:
        """A new ``etcd3`` client on the first member that answers, calls bounded by ``timeout``.

        As ``EtcdServer.client()``, the client retries its endpoint as soon as it answers
        again. Close it.

        Raises:
            RuntimeError: no member answers.
        """
        for member in self.members:
            if _read_status(member) is not None:
                return member.client(timeout)
        raise RuntimeError("no member of the etcd cluster answers:\n" + self._describe())

    def _create(self) -> list[EtcdServer]:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            members = self._new_members()
            try:
                failure = self._launch(members)
            except BaseException:
                for member in members:
                    member.close()
                raise
            if failure is None:
                return members
            for member in members:
                member.close()
            # Another process can take a port we picked before etcd binds it: pick again.
            if not failure.taken_ports or attempt == _PORT_ATTEMPTS:
                raise failure.error
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _new_members(self) -> list[EtcdServer]:
        # Every port is picked before any member exists, so each member names all its peers.
        ports = _free_ports(2 * self._size, taken=set())
        names = [f"tether-{index}" for index in range(self._size)]
        client_ports, peer_ports = ports[: self._size], ports[self._size :]
        peers = {
            name: f"http://{_HOST}:{port}" for name, port in zip(names, peer_ports, strict=True)
        }
        return [
            EtcdServer(
                binary=self._binary,
                name=name,
                startup_timeout=self._startup_timeout,
                client_port=client_port,
                peer_port=peer_port,
                initial_cluster=peers,
                cluster_token=self._token,
            )
            for name, client_port, peer_port in zip(names, client_ports, peer_ports, strict=True)
        ]

    def _launch(self, members: Sequence[EtcdServer]) -> _Failure | None:
        # Every process is started before any is waited on for health: a member alone never
        # turns healthy. Each is started only once the one before serves its peers, though: a
        # member new to a cluster asks each peer, with a 1 s timeout, whether it was bootstrapped
        # before, and a peer that listens but does not serve yet holds the question that long.
        # Started all at once, a first start took 0.2 to 2.4 s; one after the other, 0.2-0.3 s.
        deadline = time.monotonic() + self._startup_timeout
        launches: list[_Launch] = []
        for member in members:
            launch = member._spawn(member._choose_ports())
            if isinstance(launch, _Failure):
                failure: _Failure | None = launch
            else:
                launches.append(launch)
                failure = _await_peer_service(launch, deadline, self._startup_timeout)
            if failure is not None:
                for started in launches:
                    _terminate(started.process, _SIGNAL_WAIT)
                return failure
        return _await_launches(launches, self._startup_timeout, deadline=deadline)

    def _describe(self) -> str:
        lines = []
        for member in self._members:
            status = _read_status(member)
            if not member.is_running:
                seen = "stopped"
            elif status is None:
                seen = "does not answer"
            elif status.leader_id:
                seen = f"is {status.member_id:x}, follows leader {status.leader_id:x}"
            else:
                seen = f"is {status.member_id:x}, knows no leader"
            lines.append(f"  {member!r}: {seen}")
        return "\n".join(lines)
