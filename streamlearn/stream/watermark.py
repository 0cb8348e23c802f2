"""Tracks the event-time watermark across source partitions, and which partitions run ahead.

Each partition's events arrive in event-time order, give or take `max_out_of_order`
seconds, so a partition will deliver nothing older than its newest event minus that
bound. The watermark is the minimum of that over the partitions that still have
something to deliver (as in Flink): a partition that ran ahead cannot make the join
expire what a slower one is about to deliver. Whether a partition has anything left
is the broker's fact, never a wall-clock guess: a partition at its end (the source
says so, e.g. from the client's end-of-partition events) no longer holds the
watermark back, and when every partition is at its end the watermark moves just
past the newest event, so what is matched is released at once (Kafka Streams,
KIP-695: wait for an empty partition only while it has lag).

The watermark W promises that nothing older than W will arrive; an event at W
itself still may (a tie in the slowest partition).

>>> w = PartitionWatermarks()
>>> w.observe("feedback:0", 130.0); w.observe("inference-logs:0", 100.0)
>>> w.current(), w.ahead(20.0)
(100.0, {'feedback:0'})
>>> w.set_caught_up({"inference-logs:0"}); w.current()
130.0
>>> w.set_caught_up({"inference-logs:0", "feedback:0"}); w.current() > 130.0
True
"""

from __future__ import annotations

import math

NEVER = float("-inf")


class PartitionWatermarks:
    """Per-partition newest event time, which partitions are at their end, and the watermark."""

    def __init__(self, max_out_of_order: float = 0.0) -> None:
        self.max_out_of_order = max_out_of_order
        self._newest: dict[str, float] = {}
        self._caught_up: set[str] = set()
        self._floor = NEVER  # the watermark never goes backwards

    def assign(self, partition: str) -> None:
        """Starts tracking a partition that has delivered nothing yet: it holds the watermark until it does,
        or until it is known to be at its end."""
        self._newest.setdefault(partition, NEVER)

    def revoke(self, partition: str) -> None:
        self._newest.pop(partition, None)
        self._caught_up.discard(partition)

    def observe(self, partition: str, ts: float) -> None:
        if ts > self._newest.get(partition, NEVER):
            self._newest[partition] = ts

    def set_caught_up(self, partitions: set[str]) -> None:
        """The partitions that have delivered everything they hold now."""
        self._caught_up = set(partitions)

    def current(self) -> float:
        behind = self._behind()
        if behind:
            candidate = min(behind.values()) - self.max_out_of_order
        else:  # every partition is at its end: all input so far has been seen, the newest event's time included
            newest = self.newest()
            candidate = math.nextafter(newest, math.inf) if newest > NEVER else NEVER
        self._floor = max(self._floor, candidate)
        return self._floor

    def ahead(self, bound: float) -> set[str]:
        """Partitions more than `bound` seconds of event time ahead of the slowest one that still has input."""
        behind = self._behind()
        if not behind:
            return set()
        slowest = min(behind.values())
        return {p for p, ts in behind.items() if ts > slowest + bound}

    def _behind(self) -> dict[str, float]:
        return {p: ts for p, ts in self._newest.items() if p not in self._caught_up}

    def state(self) -> tuple[dict[str, float], float]:
        """(newest event time per partition, the watermark's floor), for a snapshot."""
        return dict(self._newest), self._floor

    def restore(self, newest: dict[str, float], floor: float) -> None:
        self._newest = dict(newest)
        self._caught_up = set()
        self._floor = floor

    def newest(self) -> float:
        """The newest event time seen on any partition (the watermark at end of input)."""
        return max(self._newest.values(), default=NEVER)
