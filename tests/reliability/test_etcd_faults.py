"""Scenarios 1, 2, 3 and 7 of docs/reliability.md: etcd, or the network to it, fails under load.

Three real Echo processes register in a real etcd on loopback; a tether client in the test
process (:class:`~support.load.Caller`) discovers them and calls them steadily, ``Say``
(idempotent) and ``Hold`` (not idempotent) alike. Calls never touch etcd, so none may fail;
what each scenario checks is that registration and discovery come through the fault.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from support.figures import Figures
from support.load import Caller
from support.membership import leases
from support.processes import EchoFleet, logged_at

from tether.config import RegistryConfig
from tether.registry import EtcdRegistry
from tether.testing import EtcdCluster, EtcdServer, TcpProxy, eventually

TTL = 2
IDS = ("echo-1", "echo-2", "echo-3")
# The bar of DESIGN.md: back in etcd within 2 s of etcd answering again.
BACK_WITHIN = 2.0
# Bound on every wait for an event that a healthy run sees in about a second.
WAIT = 10.0
LOAD = {"callers": 4, "hold_callers": 2, "interval": 0.01}
UNREACHABLE = "registry unreachable; retrying until it answers"


def lines_now(fleet: EchoFleet, ids: tuple[str, ...] = IDS) -> dict[str, int]:
    """How many log lines each instance has written so far: later waits look past them."""
    return {i: len(fleet[i].lines()) for i in ids}


async def back_after(
    fleet: EchoFleet, marks: dict[str, int], events: tuple[str, ...], answered: float
) -> dict[str, float]:
    """Seconds from ``answered`` (Unix time) to each instance's log of one of ``events``."""
    lines = await asyncio.gather(
        *(fleet[i].wait_for_log(events, after=mark, timeout=WAIT) for i, mark in marks.items())
    )
    return {i: logged_at(line) - answered for i, line in zip(marks, lines, strict=True)}


async def test_etcd_down_30_seconds_same_data_dir(
    tmp_path: Path, etcd: EtcdServer, figures: Figures
) -> None:
    """1. etcd killed for 30 s, restarted on its data: no call fails, all renewed within 2 s."""
    outage = 30.0
    async with asyncio.timeout(outage + 60), EchoFleet(tmp_path, ttl_seconds=TTL) as fleet:
        await fleet.start_many(IDS, [etcd.endpoint])
        async with Caller([etcd.endpoint], ttl_seconds=TTL, **LOAD) as client:
            load = client.load
            load.start()
            await load.calls(200)
            marks = lines_now(fleet)
            before = await leases([etcd.endpoint], "echo")
            calls_before = load.total
            await asyncio.to_thread(etcd.kill)
            down = time.monotonic()
            # Each instance notices within a renewal period and an etcd call's timeout.
            await asyncio.gather(
                *(fleet[i].wait_for_log(UNREACHABLE, after=marks[i], timeout=WAIT) for i in IDS)
            )
            await asyncio.sleep(down + outage - time.monotonic())  # the outage itself
            launched = time.monotonic()
            await asyncio.to_thread(etcd.start)
            answered, started_in = time.time(), time.monotonic() - launched
            calls_during = load.total - calls_before
            back = await back_after(fleet, marks, ("registration renewed", "registered"), answered)
            await load.calls(200)
            await load.stop()
            registered = await leases([etcd.endpoint], "echo")
        load.record(figures)
        figures.instances_lost = len(client.membership.missing(IDS))
        figures.extra.update(
            outage_s=outage,
            calls_during_outage=calls_during,
            etcd_start_s=round(started_in, 2),
            reregistered_max_s=round(max(0.0, *back.values()), 2),
            leases_kept=sum(registered.get(i) == lease for i, lease in before.items()),
        )
    assert load.failed == 0, f"calls failed: {load.outcomes()}"
    assert calls_during > 1000, f"the load stalled during the outage: {calls_during} calls"
    assert not client.membership.missing(IDS), "discovery lost an instance during the outage"
    slow = {i: round(s, 2) for i, s in back.items() if s > BACK_WITHIN}
    assert not slow, f"renewed more than {BACK_WITHIN} s after etcd answered: {slow}"
    assert sorted(registered) == list(IDS)


async def test_etcd_restarted_with_wiped_data_dir(
    tmp_path: Path, etcd: EtcdServer, figures: Figures
) -> None:
    """2. etcd restarted empty: each instance is back under a new lease within TTL + 2 s."""
    async with asyncio.timeout(60), EchoFleet(tmp_path, ttl_seconds=TTL) as fleet:
        await fleet.start_many(IDS, [etcd.endpoint])
        async with Caller([etcd.endpoint], ttl_seconds=TTL, **LOAD) as client:
            load = client.load
            load.start()
            await load.calls(200)
            marks = lines_now(fleet)
            await asyncio.to_thread(etcd.restart, True)  # wipe=True
            answered, answered_mono = time.time(), time.monotonic()
            # From outside: the keys are in the emptied etcd again.
            await eventually(
                lambda: _registered_all(etcd.endpoint),
                within=TTL + BACK_WITHIN,
                message="every instance registered again in the wiped etcd",
            )
            in_etcd = time.monotonic() - answered_mono
            # From each instance: its lease was gone, and it took a new one.
            back = await back_after(fleet, marks, ("registered",), answered)
            await asyncio.gather(
                *(
                    fleet[i].wait_for_log("lease lost; registering again", after=marks[i])
                    for i in IDS
                )
            )
            await load.calls(200)
            await load.stop()
        load.record(figures)
        figures.instances_lost = len(client.membership.missing(IDS))
        figures.extra.update(
            all_in_etcd_s=round(in_etcd, 2), reregistered_max_s=round(max(0.0, *back.values()), 2)
        )
    assert load.failed == 0, f"calls failed: {load.outcomes()}"
    assert not client.membership.missing(IDS), "discovery dropped an instance etcd forgot"
    slow = {i: round(s, 2) for i, s in back.items() if s > TTL + BACK_WITHIN}
    assert not slow, f"registered more than TTL + {BACK_WITHIN} s after etcd answered: {slow}"


async def _registered_all(endpoint: str) -> bool:
    return sorted(await leases([endpoint], "echo")) == list(IDS)


async def test_leader_of_three_member_cluster_killed(
    tmp_path: Path, etcd_cluster: EtcdCluster, figures: Figures
) -> None:
    """3. The leader of a 3-member etcd is killed: no instance leaves discovery, no call fails.

    Every process lists the leader first, so each has to fail over; a fourth instance started
    after the election is discovered and called, so registration and watches carry on.
    """
    async with asyncio.timeout(90), EchoFleet(tmp_path, ttl_seconds=TTL) as fleet:
        leader = await asyncio.to_thread(etcd_cluster.wait_for_leader)
        survivors = [m.endpoint for m in etcd_cluster.members if m is not leader]
        endpoints = [leader.endpoint, *survivors]
        await fleet.start_many(IDS, endpoints)
        async with Caller(endpoints, ttl_seconds=TTL, **LOAD) as client:
            load = client.load
            load.start()
            await load.calls(200)
            before = await leases(endpoints, "echo")
            killed = time.monotonic()
            await asyncio.to_thread(leader.kill)
            await asyncio.to_thread(etcd_cluster.wait_for_leader, 15)
            elected = time.monotonic()
            await fleet.start("echo-4", endpoints)
            await client.membership.wait(
                lambda ids: "echo-4" in ids, within=WAIT, message="echo-4 discovered"
            )
            await load.served_by("echo-4")
            # An observed span, not a synchronisation: a lease not renewed for one TTL expires,
            # and discovery would publish the delete. Three TTLs after the election, none did.
            await asyncio.sleep(max(0.0, elected + 3 * TTL - time.monotonic()))
            await load.stop()
            after = await leases(survivors, "echo")
        load.record(figures)
        lost = client.membership.missing(IDS, since=killed)
        figures.instances_lost = len(lost)
        figures.extra.update(
            election_s=round(elected - killed, 2),
            leases_kept=sum(after.get(i) == lease for i, lease in before.items()),
        )
    assert load.failed == 0, f"calls failed: {load.outcomes()}"
    assert not lost, f"lost from discovery after the leader was killed: {lost}"
    assert sorted(after) == [*IDS, "echo-4"]


async def test_partition_then_compaction_while_cut_off(
    tmp_path: Path, etcd: EtcdServer, figures: Figures
) -> None:
    """7. One service blackholed from etcd past its TTL, then healed; then the client's
    discovery cut off while instances change and etcd compacts: its cache equals a fresh get.

    echo-1 reaches etcd through one proxy, the client's discovery through another; echo-2 and
    echo-3 go direct. In the second half echo-3 stops while the client cannot see it leave.
    """
    with TcpProxy(etcd.endpoint) as service_path, TcpProxy(etcd.endpoint) as client_path:
        await _partition_then_compaction(tmp_path, etcd, service_path, client_path, figures)


async def _partition_then_compaction(
    tmp_path: Path,
    etcd: EtcdServer,
    service_path: TcpProxy,
    client_path: TcpProxy,
    figures: Figures,
) -> None:
    async with asyncio.timeout(90), EchoFleet(tmp_path, ttl_seconds=TTL) as fleet:
        await asyncio.gather(
            fleet.start("echo-1", [service_path.address]),
            fleet.start_many(IDS[1:], [etcd.endpoint]),
        )
        fresh = EtcdRegistry(RegistryConfig(endpoints=(etcd.endpoint,)))
        try:
            async with Caller([client_path.address], ttl_seconds=TTL, **LOAD) as client:
                load, membership = client.load, client.membership
                load.start()
                await load.calls(200)
                lease = (await leases([etcd.endpoint], "echo"))["echo-1"]
                mark = len(fleet["echo-1"].lines())

                # Part 1: echo-1 cannot reach etcd for longer than its TTL.
                cut = time.monotonic()
                await asyncio.to_thread(service_path.blackhole)
                removed = await membership.wait(
                    lambda ids: "echo-1" not in ids,
                    within=TTL + WAIT,
                    message="echo-1's lease expired while it was cut off",
                )
                await asyncio.sleep(max(0.0, cut + TTL + 0.5 - time.monotonic()))  # the cut
                await asyncio.to_thread(service_path.heal)
                healed, healed_mono = time.time(), time.monotonic()
                [back] = (
                    await back_after(fleet, {"echo-1": mark}, ("registered",), healed)
                ).values()
                await membership.wait(
                    lambda ids: "echo-1" in ids, within=WAIT, message="echo-1 discovered again"
                )
                new_lease = (await leases([etcd.endpoint], "echo"))["echo-1"]
                await load.served_by("echo-1")
                part_1 = time.monotonic()

                # Part 2: the client's discovery is cut off; instances change; etcd compacts.
                await asyncio.to_thread(client_path.cut)
                stopping = time.monotonic()
                assert await fleet["echo-3"].stop() == 0
                await fleet.start("echo-4", [etcd.endpoint])
                await asyncio.to_thread(_compact, etcd)
                stale = [i.id for i in await client.discovery.get("echo")]
                await asyncio.to_thread(client_path.heal)
                reconnected = time.monotonic()
                await eventually(
                    lambda: _same(client.discovery, fresh),
                    within=WAIT,
                    message="the client's cache equals a fresh get after the cut",
                )
                synced = time.monotonic() - reconnected
                await load.served_by("echo-4")
                await load.stop()
            load.record(figures)
            # echo-1 leaving while cut off is the fault itself; no other instance may leave
            # while it runs (echo-3 until it was stopped).
            lost = membership.missing(["echo-2"]) | membership.missing(["echo-3"], until=part_1)
            figures.instances_lost = len(lost)
            figures.extra.update(
                removed_after_cut_s=round(removed - cut, 2),
                cut_s=round(healed_mono - cut, 2),
                back_after_heal_s=round(max(0.0, back), 2),
                cache_synced_s=round(synced, 2),
            )
        finally:
            await fresh.close()
    # Cut off, the client cannot see echo-3 leave and keeps calling it while it stops: it
    # learns from echo-3's refusals, sends those calls again elsewhere, and stops picking it.
    when = [(round(at - stopping, 3), method, code) for at, method, code in load.failures]
    assert load.failed == 0, f"calls failed (s after echo-3's SIGTERM): {when}; {load.outcomes()}"
    assert not lost, f"lost from discovery: {lost}"
    assert new_lease != lease, "echo-1 should be back under a new lease"
    assert back <= BACK_WITHIN, f"echo-1 registered {back:.2f} s after the heal"
    assert stale == list(IDS), f"cut off, discovery should keep what it knew: {stale}"


def _compact(etcd: EtcdServer) -> None:
    """Compact etcd's history up to now: a watch resumed from before it is refused."""
    client = etcd.client()
    try:
        client.compact(client.put("/unrelated", "x").header.revision)
    finally:
        client.close()


async def _same(discovery: EtcdRegistry, fresh: EtcdRegistry) -> bool:
    expected = await fresh.get("echo")
    return [i.id for i in expected] == ["echo-1", "echo-2", "echo-4"] and (
        await discovery.get("echo") == expected
    )
