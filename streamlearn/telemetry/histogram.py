"""A histogram accumulator cheap enough for the learning loop.

prometheus_client's Histogram takes a lock per observation; here observations are
plain list updates (or one numpy call per batch) and the Prometheus collector
reads the buckets at scrape time.

>>> h = Histogram((0.1, 1.0))
>>> h.observe(0.05); h.observe_many([0.5, 3.0])
>>> h.counts, h.count
([1, 1, 1], 3)
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Optional

import msgspec
import numpy as np

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Time spent waiting (in the broker, in the join): milliseconds when keeping up, hours when replaying a backlog.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                21600.0, 86400.0)
# Stages of the feedback loop (streamlearn_stage_seconds): fine below 100 ms, where a live service sits, out to a day
# for a backlog's join wait.
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
DELAY_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)


class HistogramState(msgspec.Struct, array_like=True):
    """The transferable content of a histogram: upper bounds, per-bucket counts, sum."""

    bounds: tuple[float, ...]
    counts: list[int]
    total: float = 0.0


def summed(states: Iterable[HistogramState]) -> Optional[HistogramState]:
    """The histogram of all the observations of several (with the same bounds), None for none.

    >>> summed([HistogramState((1.0,), [1, 0], 0.5), HistogramState((1.0,), [2, 1], 3.0)])
    HistogramState(bounds=(1.0,), counts=[3, 1], total=3.5)
    """
    states = list(states)
    if not states:
        return None
    return HistogramState(states[0].bounds, [sum(c) for c in zip(*(s.counts for s in states))],
                          sum(s.total for s in states))


class Histogram:
    """Counts observations into fixed buckets (upper bound inclusive, as Prometheus does)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self._edges = np.asarray(self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float, times: int = 1) -> None:
        """Counts `value` once, or `times` times (the examples of one batch that waited alike)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    def observe_many(self, values) -> None:
        arr = np.asarray(values, dtype=float)
        if arr.size == 0:
            return
        idx = np.searchsorted(self._edges, arr, side="left")
        counts = np.bincount(idx, minlength=len(self.counts))
        for i in np.flatnonzero(counts).tolist():   # most values fall in a few buckets
            self.counts[i] += int(counts[i])
        self.total += float(arr.sum())

    def state(self) -> HistogramState:
        return HistogramState(self.bounds, list(self.counts), self.total)

    @classmethod
    def from_state(cls, state: HistogramState) -> "Histogram":
        h = cls(state.bounds)
        h.counts = list(state.counts)
        h.total = state.total
        return h

    def since(self, earlier: "HistogramState") -> "Histogram":
        """The observations made after `earlier` (a state of this same histogram)."""
        h = Histogram(self.bounds)
        h.counts = [now - then for now, then in zip(self.counts, earlier.counts)]
        h.total = self.total - earlier.total
        return h

    def quantile(self, q: float) -> float:
        """Estimates a quantile by linear interpolation inside its bucket (as PromQL does)."""
        n = self.count
        if n == 0:
            return float("nan")
        rank, seen = q * n, 0
        for i, c in enumerate(self.counts):
            if seen + c >= rank and c:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lo = self.bounds[i - 1] if i else 0.0
                return lo + (self.bounds[i] - lo) * (rank - seen) / c
            seen += c
        return self.bounds[-1]
