"""Reservoir sampling: every example seen so far is in the buffer with the same probability.

Algorithm R (Vitter, 1985): the n-th example replaces a random row with
probability capacity / n, so the buffer is a uniform sample of the whole stream,
old and new alike: the memory of every task the model has seen.

>>> import numpy as np
>>> buffer = ReservoirBuffer(capacity=100, dim=1, seed=0)
>>> for i in range(1000):
...     buffer.add(np.array([[float(i)]]), np.array([0.0]), np.array([float(i)]))
>>> buffer.store.size, buffer.seen, bool((buffer.store.x[:, 0] < 500).mean() > 0.3)
(100, 1000, True)
"""

from __future__ import annotations

import numpy as np

from typing import Optional

from streamlearn.replay.store import Logits, ReplayStore, load_rng, rng_state, uniform_rows


class ReservoirBuffer:
    """A uniform sample of the stream so far, `capacity` examples at most."""

    def __init__(self, capacity: int, dim: int, seed: int = 0, logits: int = 0) -> None:
        self.store = ReplayStore(capacity, dim, logits)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray, y: np.ndarray, ts: np.ndarray, logits: Optional[Logits] = None) -> None:
        store = self.store
        fill = min(len(x), store.capacity - store.size)  # empty rows first
        store.put_many(np.arange(store.size, store.size + fill), x, y, ts, logits, np.arange(fill))
        store.size += fill
        self.seen += fill
        rest = len(x) - fill
        if rest:
            # The i-th next example lands in row r ~ U[0, seen + i] and is kept when r < capacity.
            rows = self.rng.integers(self.seen + 1 + np.arange(rest))
            self.seen += rest
            for i in np.flatnonzero(rows < store.capacity):  # in order: a later one overwrites an earlier
                store.put(int(rows[i]), x[fill + i], y[fill + i], ts[fill + i], logits, fill + i)

    def sample(self, n: int, since: Optional[float] = None) -> np.ndarray:
        return uniform_rows(self.store, self.rng, n, since)

    def expire(self, before: float) -> int:
        """Drops rows older than `before`; the reservoir goes on as a uniform sample of the rows since."""
        dropped = self.store.drop_before(before)
        self.seen = self.store.size
        return dropped

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.store.arrays("reservoir"), "reservoir.seen": np.array([self.seen], dtype=np.int64),
                "reservoir.rng": rng_state(self.rng)}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.store.load(arrays, "reservoir")
        self.seen = int(arrays["reservoir.seen"][0])
        load_rng(self.rng, arrays["reservoir.rng"])
