"""Scenarios 4, 5 and 6 of docs/reliability.md: a service instance stops, crashes or freezes.

Three real Echo processes register in a real etcd on loopback; a tether client in the test
process (:class:`~support.load.Caller`) discovers them and calls them steadily, ``Say``
(idempotent) and ``Hold`` (not idempotent) alike.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

from support.figures import Figures
from support.load import Caller
from support.membership import leases
from support.processes import EchoFleet

from tether.testing import EtcdServer, eventually

TTL = 2
IDS = ("echo-1", "echo-2", "echo-3")
# Bound on every wait for an event that a healthy run sees in about a second.
WAIT = 10.0
LOAD = {"callers": 4, "hold_callers": 2, "interval": 0.01}


async def test_rolling_restart_of_all_three(
    tmp_path: Path, etcd: EtcdServer, figures: Figures
) -> None:
    """4. Each instance stopped gracefully (SIGTERM) and replaced in turn: no call fails."""
    async with asyncio.timeout(90), EchoFleet(tmp_path, ttl_seconds=TTL) as fleet:
        await fleet.start_many(IDS, [etcd.endpoint])
        async with Caller([etcd.endpoint], ttl_seconds=TTL, **LOAD) as client:
            load, membership = client.load, client.membership
            load.start()
            await load.calls(200)
            # Each instance's span in discovery: from when it was seen to when it was stopped.
            spans = {i: [0.0, float("inf")] for i in IDS}
            left_after: list[float] = []
            for old in IDS:
                gone = asyncio.ensure_future(
                    membership.wait(
                        lambda ids, old=old: old not in ids,  # type: ignore[misc]
                        within=WAIT,
                        message=f"{old} left discovery",
                    )
                )
                spans[old][1] = stopping = time.monotonic()
                assert await fleet[old].stop() == 0
                left_after.append(await gone - stopping)
                new = f"{old}b"
                await fleet.start(new, [etcd.endpoint])
                spans[new] = [
                    await membership.wait(
                        lambda ids, new=new: new in ids,  # type: ignore[misc]
                        within=WAIT,
                        message=f"{new} discovered",
                    ),
                    float("inf"),
                ]
                await load.served_by(new)
            await load.stop()
        load.record(figures)
        lost = {i for i, (since, until) in spans.items() if membership.missing([i], since, until)}
        figures.instances_lost = len(lost)
        figures.extra["left_discovery_max_ms"] = round(1000 * max(left_after), 1)
    assert load.failed == 0, f"calls failed: {load.outcomes()}"
    assert not lost, f"left discovery before being stopped: {lost}"
    assert all(load.by_instance[f"{i}b"] for i in IDS), dict(load.by_instance)


async def test_kill_9_of_one_instance(tmp_path: Path, etcd: EtcdServer, figures: Figures) -> None:
    """5. One of three SIGKILLed: no idempotent call fails; non-idempotent failures are at
    most the non-idempotent calls in flight at the kill."""
    # A 10 s lease outlives the scenario: traffic moves because the connection failed, not
    # because etcd forgot the instance.
    async with asyncio.timeout(60), EchoFleet(tmp_path, ttl_seconds=10) as fleet:
        await fleet.start_many(IDS, [etcd.endpoint])
        # No pause between calls: every caller has a call in flight at almost every moment.
        async with Caller([etcd.endpoint], ttl_seconds=TTL, **{**LOAD, "interval": 0}) as client:
            load = client.load
            load.start()
            await load.calls(300)
            assert set(load.by_instance) == set(IDS), dict(load.by_instance)
            victim = fleet["echo-2"]
            to_victim = client.channel.subchannels[victim.target]
            # Kill while calls are in flight to the victim, non-idempotent ones among the calls
            # in flight: the case the bar is about. Nothing yields between this check, the
            # counts and the signal, so the counts are those at the kill.
            await eventually(
                lambda: to_victim.in_flight > 0 and load.holding > 0,
                within=WAIT,
                interval=0.001,
                message="calls in flight to echo-2",
            )
            in_flight, holding, saying = to_victim.in_flight, load.holding, load.saying
            await victim.kill()  # the signal is sent before this first yields
            before = Counter(load.by_instance)
            await load.calls(600)
            await load.stop()
            registered = await leases([etcd.endpoint], "echo")
        after = load.by_instance - before
        load.record(figures)
        figures.instances_lost = len(client.membership.missing(["echo-1", "echo-3"]))
        figures.extra.update(
            in_flight_at_kill=holding + saying,
            non_idempotent_in_flight_at_kill=holding,
            in_flight_to_victim=in_flight,
        )
    assert load.says["ok"] == load.says.total(), f"idempotent calls failed: {load.outcomes()}"
    hold_failed = load.holds.total() - load.holds["ok"]
    assert hold_failed <= min(holding, in_flight), (
        f"{hold_failed} non-idempotent calls failed; at the kill {holding} were in flight, and "
        f"{in_flight} calls of either kind were in flight to echo-2: {dict(load.holds)}"
    )
    assert "echo-2" not in after
    assert after["echo-1"] > 100 and after["echo-3"] > 100, dict(after)
    assert "echo-2" in registered, "the lease should still live"
    assert figures.instances_lost == 0


async def test_instance_paused_longer_than_ttl(
    tmp_path: Path, etcd: EtcdServer, figures: Figures
) -> None:
    """6. One of three SIGSTOPped past its TTL: it leaves discovery, and after SIGCONT it is
    back under a new lease and called again."""
    async with asyncio.timeout(60), EchoFleet(tmp_path, ttl_seconds=TTL) as fleet:
        await fleet.start_many(IDS, [etcd.endpoint])
        async with Caller([etcd.endpoint], ttl_seconds=TTL, **LOAD) as client:
            load, membership = client.load, client.membership
            load.start()
            await load.calls(200)
            victim = fleet["echo-2"]
            lease = (await leases([etcd.endpoint], "echo"))["echo-2"]
            mark = len(victim.lines())
            victim.send(signal.SIGSTOP)
            paused = time.monotonic()
            removed = await membership.wait(
                lambda ids: "echo-2" not in ids,
                within=TTL + WAIT,
                message="the paused instance left discovery",
            )
            await asyncio.sleep(max(0.0, paused + TTL + 0.5 - time.monotonic()))  # the pause
            victim.send(signal.SIGCONT)
            resumed = time.monotonic()
            back = await membership.wait(
                lambda ids: "echo-2" in ids, within=WAIT, message="the resumed instance is back"
            )
            await victim.wait_for_log("lease lost; registering again", after=mark)
            new_lease = (await leases([etcd.endpoint], "echo"))["echo-2"]
            await load.served_by("echo-2", 50)
            await load.stop()
        load.record(figures)
        figures.instances_lost = len(membership.missing(["echo-1", "echo-3"]))
        figures.extra.update(
            paused_s=round(resumed - paused, 2),
            removed_after_s=round(removed - paused, 2),
            back_after_resume_s=round(back - resumed, 2),
        )
    assert new_lease != lease, "the resumed instance should hold a new lease"
    assert figures.instances_lost == 0, "an instance that was not paused left discovery"
    # Calls caught by the pause wait for it (or their deadline): they may not fail otherwise.
    assert set(load.says) | set(load.holds) <= {"ok", "DEADLINE_EXCEEDED"}, load.outcomes()
