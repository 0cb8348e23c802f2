"""Tracks the event-time watermark across source partitions.

Each partition's events arrive roughly in event-time order, so no partition will
deliver anything older than the newest event it has delivered. The watermark is
the minimum of that over the partitions that are still delivering (as in Flink):
a partition that ran ahead cannot make the join expire what a slower partition is
still about to deliver. A partition that has delivered nothing for `idle_timeout`
seconds of wall time no longer holds the watermark back.

The watermark W promises that nothing older than W will arrive; an event at W
itself still may (a tie in the slowest partition). When every partition is idle,
everything seen so far is complete, and W moves just past the newest event.

>>> w = PartitionWatermarks(idle_timeout=1.0)
>>> w.observe("feedback:0", 130.0, now=0.0); w.observe("inference-logs:0", 100.0, now=0.0)
>>> w.current(now=0.5), w.current(now=5.0) > 130.0
(100.0, True)
"""

from __future__ import annotations

import math

NEVER = float("-inf")


class PartitionWatermarks:
    """Per-partition newest event time, and the watermark across the live ones."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._newest: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        self._floor = NEVER  # the watermark never goes backwards

    def assign(self, partition: str, now: float) -> None:
        """Starts tracking a partition that has delivered nothing yet: it holds the watermark until idle."""
        self._newest.setdefault(partition, NEVER)
        self._last_seen[partition] = now

    def revoke(self, partition: str) -> None:
        self._newest.pop(partition, None)
        self._last_seen.pop(partition, None)

    def observe(self, partition: str, ts: float, now: float) -> None:
        if ts > self._newest.get(partition, NEVER):
            self._newest[partition] = ts
        self._last_seen[partition] = now

    def current(self, now: float) -> float:
        live = [ts for p, ts in self._newest.items() if now - self._last_seen[p] < self.idle_timeout]
        if live:
            candidate = min(live)
        else:  # everything is idle: all input so far has been seen, the newest event's time included
            newest = self.newest()
            candidate = math.nextafter(newest, math.inf) if newest > NEVER else NEVER
        self._floor = max(self._floor, candidate)
        return self._floor

    def state(self) -> tuple[dict[str, float], float]:
        """(newest event time per partition, the watermark's floor), for a snapshot."""
        return dict(self._newest), self._floor

    def restore(self, newest: dict[str, float], floor: float, now: float) -> None:
        self._newest = dict(newest)
        self._last_seen = {p: now for p in newest}
        self._floor = floor

    def newest(self) -> float:
        """The newest event time seen on any partition (the watermark at end of input)."""
        return max(self._newest.values(), default=NEVER)
