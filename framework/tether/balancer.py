"""Pick policies that choose which instance an outbound call goes to; no gRPC here.

A balancer sees endpoints through the small :class:`Endpoint` protocol (address, weight, calls
in flight, connected, ejected) and picks one per attempt. Every policy chooses among the same
candidates, see :func:`candidates`: endpoints that are connected and not ejected; failing those,
endpoints not ejected that are still connecting; failing those, any endpoint, so the call fails
fast with the real connection error instead of waiting. Within that group, addresses the call
already tried are avoided while another remains.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from typing import Protocol, TypeVar

__all__ = [
    "Balancer",
    "Endpoint",
    "P2CBalancer",
    "RoundRobinBalancer",
    "candidates",
]


class Endpoint(Protocol):
    """One instance as a balancer sees it."""

    @property
    def address(self) -> str:
        """``host:port`` of the instance; what ``exclude`` sets hold."""
        ...

    @property
    def weight(self) -> int:
        """Relative share of traffic, > 0."""
        ...

    @property
    def in_flight(self) -> int:
        """Calls sent to this endpoint that have not finished."""
        ...

    @property
    def ready(self) -> bool:
        """Connected: a call sent now goes out at once."""
        ...

    @property
    def ejected(self) -> bool:
        """Taken out of rotation after a failure, until it is connected again."""
        ...


E = TypeVar("E", bound=Endpoint)


class Balancer(Protocol):
    """Chooses the endpoint for one attempt of a call."""

    def pick(self, endpoints: Sequence[E], exclude: Collection[str] = ()) -> E | None:
        """Return the endpoint to use, or None when ``endpoints`` is empty.

        Args:
            endpoints: every endpoint of the service, in a stable order.
            exclude: addresses this call already tried; avoided while another candidate exists.
        """
        ...


def candidates(endpoints: Sequence[E], exclude: Collection[str] = ()) -> Sequence[E]:
    """The endpoints a pick chooses among (see the module docstring); empty only if none exist.

    Args:
        endpoints: every endpoint of the service.
        exclude: addresses the call already tried.

    Returns:
        The best non-empty group, without tried addresses unless only tried ones are left.
    """
    group: Sequence[E] = [e for e in endpoints if e.ready and not e.ejected]
    if not group:
        group = [e for e in endpoints if not e.ejected] or endpoints
    if exclude:
        fresh = [e for e in group if e.address not in exclude]
        if fresh:
            return fresh
    return group


class RoundRobinBalancer:
    """Takes the candidates in turn, each as often as its weight says.

    Equal weights (the default, 100 each) rotate one by one. Unequal weights use smooth
    weighted round robin (nginx's, and Kratos' ``wrr``): every pick adds each candidate's weight
    to its running score, takes the highest score and takes the total off it, so weights
    5, 1, 1 give ``a a b a c a a``: the heavy instance gets its share spread out, not in a burst.

    Args:
        rand: ``random.Random`` or an object with ``randrange``; the starting point is random so
            that clients started together do not all begin with the same instance.
    """

    def __init__(self, *, rand: random.Random | None = None) -> None:
        self._next = (rand or random.Random()).randrange(1 << 16)
        self._scores: dict[str, int] = {}  # address -> running score (weighted picks only)

    def pick(self, endpoints: Sequence[E], exclude: Collection[str] = ()) -> E | None:
        """See :meth:`Balancer.pick`."""
        group = candidates(endpoints, exclude)
        if not group:
            return None
        weight = group[0].weight
        for e in group:  # a plain loop: all() over a generator doubles an equal pick's cost
            if e.weight != weight:
                return self._weighted(group, len(endpoints))
        chosen = group[self._next % len(group)]
        self._next += 1
        return chosen

    def _weighted(self, group: Sequence[E], known: int) -> E:
        scores = self._scores
        if len(scores) > 2 * known + 8:  # instances that left: forget their scores
            scores = self._scores = {e.address: scores.get(e.address, 0) for e in group}
        total = 0
        chosen = group[0]
        best = None
        for e in group:
            total += e.weight
            score = scores.get(e.address, 0) + e.weight
            scores[e.address] = score
            if best is None or score > best:
                best, chosen = score, e
        scores[chosen.address] -= total
        return chosen


class P2CBalancer:
    """Power of two choices: of two candidates drawn at random, the one with less load.

    Load is ``(in_flight + 1) / weight``, so an idle heavy instance beats an idle light one and
    a busy instance sheds new calls to its peers (the go-zero and Kratos ``p2c`` idea, with
    in-flight calls standing in for their latency estimates).

    Args:
        rand: the source of random draws; injectable for tests.
    """

    def __init__(self, *, rand: random.Random | None = None) -> None:
        self._randrange: Callable[[int], int] = (rand or random.Random()).randrange

    def pick(self, endpoints: Sequence[E], exclude: Collection[str] = ()) -> E | None:
        """See :meth:`Balancer.pick`."""
        group = candidates(endpoints, exclude)
        count = len(group)
        if count < 2:
            return group[0] if group else None
        i = self._randrange(count)
        j = self._randrange(count - 1)
        if j >= i:  # two distinct indices with one draw each
            j += 1
        a, b = group[i], group[j]
        return a if (a.in_flight + 1) * b.weight <= (b.in_flight + 1) * a.weight else b
