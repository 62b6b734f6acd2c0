"""Fakes for time-based state machines: a monotonic clock whose sleep moves time on at once."""

from __future__ import annotations


class FakeClock:
    """A fake ``time.monotonic``: tests move ``now`` by hand, and ``sleep`` advances it.

    ``sleep`` suits one sleeper at a time; it records every delay in ``slept``.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
