"""Tests for tether.balancer: candidate tiers, exclusion, round robin and power of two choices."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from tether.balancer import Balancer, P2CBalancer, RoundRobinBalancer, candidates


@dataclass
class Node:
    """An endpoint as a balancer sees it."""

    address: str
    weight: int = 100
    in_flight: int = 0
    ready: bool = True
    ejected: bool = False


def nodes(*names: str, **fields: object) -> list[Node]:
    return [Node(name, **fields) for name in names]  # type: ignore[arg-type]


def picks(balancer: Balancer, endpoints: list[Node], count: int) -> Counter[str]:
    chosen = Counter[str]()
    for _ in range(count):
        node = balancer.pick(endpoints)
        assert node is not None
        chosen[node.address] += 1
    return chosen


BALANCERS = [
    pytest.param(lambda: RoundRobinBalancer(rand=random.Random(1)), id="round_robin"),
    pytest.param(lambda: P2CBalancer(rand=random.Random(1)), id="p2c"),
]


def test_candidates_prefer_connected_endpoints() -> None:
    """Connected, not ejected endpoints are chosen over connecting ones."""
    a, b, c = Node("a"), Node("b", ready=False), Node("c", ejected=True)
    assert candidates([a, b, c]) == [a]


def test_candidates_fall_back_to_connecting_then_anything() -> None:
    """With none connected, not-ejected ones still connecting; with none of those, all."""
    b, c = Node("b", ready=False), Node("c", ready=True, ejected=True)
    assert candidates([b, c]) == [b]
    d = Node("d", ready=False, ejected=True)
    assert candidates([c, d]) == [c, d]


def test_candidates_avoid_tried_addresses_while_others_remain() -> None:
    """Addresses already tried are left out unless only they are left."""
    a, b = Node("a"), Node("b")
    assert candidates([a, b], exclude={"a"}) == [b]
    assert candidates([a, b], exclude={"a", "b"}) == [a, b]


def test_exclusion_does_not_reach_into_a_worse_tier() -> None:
    """A tried but connected endpoint beats an untried one that is not connected."""
    a, b = Node("a"), Node("b", ready=False)
    assert candidates([a, b], exclude={"a"}) == [a]


@pytest.mark.parametrize("make", BALANCERS)
def test_empty_set_picks_nothing(make: object) -> None:
    """No endpoints: the pick is None, for the channel to fail locally."""
    balancer = make()  # type: ignore[operator]
    assert balancer.pick([]) is None


@pytest.mark.parametrize("make", BALANCERS)
def test_pick_avoids_excluded(make: object) -> None:
    """A retry's pick avoids the addresses the call already tried."""
    balancer = make()  # type: ignore[operator]
    endpoints = nodes("a", "b", "c")
    for _ in range(20):
        chosen = balancer.pick(endpoints, exclude={"a", "b"})
        assert chosen is not None and chosen.address == "c"


@pytest.mark.parametrize("make", BALANCERS)
def test_pick_skips_endpoints_not_eligible(make: object) -> None:
    """Ejected and unconnected endpoints get no picks while a connected one exists."""
    balancer = make()  # type: ignore[operator]
    endpoints = [Node("a"), Node("b", ejected=True), Node("c", ready=False)]
    assert picks(balancer, endpoints, 30) == {"a": 30}


def test_round_robin_takes_turns() -> None:
    """Round robin gives each endpoint the same share, in turn."""
    balancer = RoundRobinBalancer(rand=random.Random(7))
    endpoints = nodes("a", "b", "c")
    order = [balancer.pick(endpoints) for _ in range(6)]
    assert [n.address for n in order if n is not None][:3] == [
        n.address for n in order if n is not None
    ][3:]
    assert picks(balancer, endpoints, 300) == {"a": 100, "b": 100, "c": 100}


def test_round_robin_starts_at_a_random_endpoint() -> None:
    """Clients started together do not all begin with the first endpoint."""
    endpoints = nodes("a", "b", "c", "d")
    firsts = set()
    for seed in range(20):
        first = RoundRobinBalancer(rand=random.Random(seed)).pick(endpoints)
        assert first is not None
        firsts.add(first.address)
    assert len(firsts) > 1


def test_round_robin_gives_each_endpoint_its_weight_smoothly() -> None:
    """Unequal weights: shares follow the weights, interleaved as nginx's smooth WRR does."""
    balancer = RoundRobinBalancer(rand=random.Random(3))
    endpoints = [Node("a", weight=5), Node("b", weight=1), Node("c", weight=1)]
    order = [balancer.pick(endpoints) for _ in range(7)]
    assert "".join(n.address for n in order if n is not None) == "aabacaa"
    endpoints = [Node("a", weight=300), Node("b", weight=200), Node("c", weight=100)]
    assert picks(balancer, endpoints, 600) == {"a": 300, "b": 200, "c": 100}


def test_weighted_round_robin_skips_excluded_and_forgets_departed() -> None:
    """A tried address is avoided, and scores of instances that left do not pile up."""
    balancer = RoundRobinBalancer(rand=random.Random(3))
    heavy, light = Node("heavy", weight=3), Node("light", weight=1)
    for _ in range(10):
        pick = balancer.pick([heavy, light], exclude={"heavy"})
        assert pick is not None and pick.address == "light"
    for round_ in range(50):  # a new pair of instances each round: 100 addresses seen
        pair = [Node(f"a{round_}", weight=2), Node(f"b{round_}", weight=1)]
        assert picks(balancer, pair, 3) == {f"a{round_}": 2, f"b{round_}": 1}
    # Pruned once over twice the instances known (+ 8): at most that plus one pick's pair.
    assert len(balancer._scores) <= (2 * 2 + 8) + 2


def test_p2c_prefers_the_less_loaded() -> None:
    """Of two candidates, p2c picks the one with fewer calls in flight."""
    busy, idle = Node("busy", in_flight=10), Node("idle")
    balancer = P2CBalancer(rand=random.Random(3))
    assert picks(balancer, [busy, idle], 50) == {"idle": 50}


def test_p2c_counts_load_per_weight() -> None:
    """Equal in-flight counts: the heavier instance wins; twice the weight takes twice the load."""
    light, heavy = Node("light", weight=100), Node("heavy", weight=200)
    balancer = P2CBalancer(rand=random.Random(3))
    assert picks(balancer, [light, heavy], 10) == {"heavy": 10}
    light.in_flight, heavy.in_flight = 1, 3  # loads 2/100 and 4/200: a tie goes to either
    assert balancer.pick([light, heavy]) is not None
    heavy.in_flight = 4  # 5/200 > 2/100
    assert picks(balancer, [light, heavy], 10) == {"light": 10}


def test_p2c_spreads_idle_load() -> None:
    """With no load anywhere, p2c's random draws reach every endpoint."""
    balancer = P2CBalancer(rand=random.Random(5))
    chosen = picks(balancer, nodes("a", "b", "c", "d"), 400)
    assert set(chosen) == {"a", "b", "c", "d"}
    assert min(chosen.values()) > 50, chosen


def test_p2c_single_candidate() -> None:
    """One candidate is picked without drawing."""
    assert P2CBalancer().pick([Node("only")]) == Node("only")
