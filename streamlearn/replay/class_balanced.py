"""Class-balanced reservoir: every class seen keeps an equal share of the buffer.

CBRS (Chrysakis & Moens, 2020): while the buffer has room, everything is kept.
Once full, an example of a class that is not among the largest in the buffer
replaces a random row of a largest class; an example of a largest class replaces
a random row of its own class with probability (its rows) / (its examples seen),
a reservoir within the class. Rare and recent classes are not crowded out, which
is what class-incremental streams need.

>>> import numpy as np
>>> buffer = ClassBalancedBuffer(capacity=30, dim=1, seed=0)
>>> labels = np.array([0.0] * 900 + [1.0] * 90 + [2.0] * 10)
>>> buffer.add(np.zeros((1000, 1)), labels, np.arange(1000.0))
>>> np.bincount(buffer.store.y[:buffer.store.size].astype(int)).tolist()
[10, 10, 10]
"""

from __future__ import annotations

import numpy as np

from typing import Optional

from streamlearn.replay.store import Logits, ReplayStore, load_rng, rng_state, uniform_rows


class ClassBalancedBuffer:
    """Up to `capacity` examples, split as evenly as the stream allows across classes (labels are class indices)."""

    def __init__(self, capacity: int, dim: int, seed: int = 0, logits: int = 0) -> None:
        self.store = ReplayStore(capacity, dim, logits)
        self.seen = np.zeros(0, dtype=np.int64)      # examples seen per class
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray, y: np.ndarray, ts: np.ndarray, logits: Optional[Logits] = None) -> None:
        for i in range(len(x)):
            self._add_one(x[i], int(y[i]), ts[i], logits, i)

    def _add_one(self, x: np.ndarray, label: int, ts: float, logits: Optional[Logits], i: int) -> None:
        store = self.store
        if label >= len(self.seen):
            self.seen = np.concatenate([self.seen, np.zeros(label + 1 - len(self.seen), dtype=np.int64)])
        self.seen[label] += 1
        if store.size < store.capacity:
            store.put(store.size, x, label, ts, logits, i)
            store.size += 1
            return
        held = np.bincount(store.y.astype(np.int64), minlength=len(self.seen))
        if held[label] < held.max():
            largest = np.flatnonzero(held == held.max())
            rows = np.flatnonzero(np.isin(store.y, largest))
        elif self.rng.random() * self.seen[label] < held[label]:
            rows = np.flatnonzero(store.y == label)
        else:
            return
        store.put(int(rows[self.rng.integers(len(rows))]), x, label, ts, logits, i)

    def sample(self, n: int, since: Optional[float] = None) -> np.ndarray:
        return uniform_rows(self.store, self.rng, n, since)

    def expire(self, before: float) -> int:
        """Drops rows older than `before`; each class's count of examples seen restarts from its rows kept."""
        dropped = self.store.drop_before(before)
        held = np.bincount(self.store.y[:self.store.size].astype(np.int64), minlength=len(self.seen))
        self.seen = held[:max(len(self.seen), len(held))].astype(np.int64)
        return dropped

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.store.arrays("balanced"), "balanced.seen": self.seen, "balanced.rng": rng_state(self.rng)}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.store.load(arrays, "balanced")
        self.seen = arrays["balanced.seen"].copy()
        load_rng(self.rng, arrays["balanced.rng"])
