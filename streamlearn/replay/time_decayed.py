"""A window of the most recent examples, replayed with weights that halve every `half_life` examples.

The bounded temporal context: what the stream said lately matters most, yet the
last `capacity` examples are all still within reach, so a burst of one kind of
traffic does not erase what came just before it.

>>> import numpy as np
>>> buffer = TimeDecayedBuffer(capacity=100, dim=1, half_life=10, seed=0)
>>> buffer.add(np.arange(300.0).reshape(-1, 1), np.zeros(300), np.arange(300.0))
>>> int(buffer.store.x[:, 0].min()), float(np.median(buffer.store.x[buffer.sample(1000), 0])) > 280
(200, True)
"""

from __future__ import annotations

import numpy as np

from typing import Optional

from streamlearn.replay.store import Logits, ReplayStore, load_rng, rng_state


class TimeDecayedBuffer:
    """The last `capacity` examples; sampling weight 2^(-age / half_life), age in examples."""

    def __init__(self, capacity: int, dim: int, half_life: float = 1000.0, seed: int = 0, logits: int = 0) -> None:
        self.store = ReplayStore(capacity, dim, logits)
        self.half_life = half_life
        self.order = np.zeros(capacity, dtype=np.int64)   # arrival number of each row
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self.floor = -np.inf   # rows older than this event time are expired: never replayed, overwritten in turn

    def add(self, x: np.ndarray, y: np.ndarray, ts: np.ndarray, logits: Optional[Logits] = None) -> None:
        store = self.store
        skip = max(0, len(x) - store.capacity)  # of a batch longer than the window, only its tail stays
        self.seen += skip
        arrival = self.seen + np.arange(len(x) - skip)
        rows = arrival % store.capacity          # a ring: the oldest row goes first
        store.put_many(rows, x, y, ts, logits, np.arange(skip, len(x)))
        self.order[rows] = arrival
        self.seen += len(rows)
        store.size = min(self.seen, store.capacity)

    def weights(self, since: Optional[float] = None) -> np.ndarray:
        """Sampling probability of each filled row (rows older than `since` or expired: none; all zero if none left)."""
        age = (self.seen - 1) - self.order[:self.store.size]
        w = np.exp2(-age / self.half_life)
        floor = self.floor if since is None else max(since, self.floor)
        if floor > -np.inf:
            w[self.store.ts[:self.store.size] < floor] = 0.0
        total = w.sum()
        return w / total if total > 0 else w

    def sample(self, n: int, since: Optional[float] = None) -> np.ndarray:
        if not self.store.size:
            return np.empty(0, dtype=np.int64)
        p = self.weights(since)
        return self.rng.choice(self.store.size, size=n, p=p) if p.any() else np.empty(0, dtype=np.int64)

    def expire(self, before: float) -> int:
        """Rows older than `before` are never replayed again (the ring overwrites them in turn); returns how many."""
        self.floor = max(self.floor, before)
        return int((self.store.ts[:self.store.size] < self.floor).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.store.arrays("decayed"), "decayed.order": self.order,
                "decayed.seen": np.array([self.seen], dtype=np.int64), "decayed.rng": rng_state(self.rng),
                "decayed.floor": np.array([self.floor])}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.store.load(arrays, "decayed")
        self.order = arrays["decayed.order"].copy()
        self.seen = int(arrays["decayed.seen"][0])
        load_rng(self.rng, arrays["decayed.rng"])
        self.floor = float(arrays["decayed.floor"][0]) if "decayed.floor" in arrays else -np.inf   # older snapshots
