"""Fixed-capacity columns of encoded examples, shared by every replay buffer.

Rows are feature vectors as the encoder produced them (before scaling, so a
replayed example is scaled with today's statistics), their label index or value,
and their event time; with `logits > 0`, also the network's outputs for the row
when it was learned and how many classes were known then (DER, Buzzega et al.
2020: a replayed row's current outputs are pulled toward them). The columns and
the sampling generator are the buffer's whole state, numpy arrays only, so a
snapshot stores them without pickle.

>>> store = ReplayStore(capacity=3, dim=2)
>>> store.put(0, np.array([1.0, 2.0]), 1.0, ts=10.0); store.size = 1
>>> store.x[:store.size].tolist(), store.y[:store.size].tolist()
([[1.0, 2.0]], [1.0])
"""

from __future__ import annotations

import json
from typing import NamedTuple, Optional, Protocol

import numpy as np


class Logits(NamedTuple):
    """The network's outputs for rows being added (`values`, one row each) and the classes known for each."""

    values: np.ndarray
    known: np.ndarray


class ReplayStore:
    """`capacity` rows of (x, y, ts), and of (logits, known) when `logits > 0`; rows `[0, size)` are filled."""

    def __init__(self, capacity: int, dim: int, logits: int = 0) -> None:
        self.capacity = capacity
        self.x = np.zeros((capacity, dim), dtype=np.float32)
        self.y = np.zeros(capacity, dtype=np.float32)   # class index or regression target
        self.ts = np.zeros(capacity, dtype=np.float64)
        self.logits = np.zeros((capacity, logits), dtype=np.float32)   # the network's outputs when stored
        self.known = np.zeros(capacity, dtype=np.int64)                # classes known then: valid logit columns
        self.size = 0

    def put(self, row: int, x: np.ndarray, y: float, ts: float, logits: Optional[Logits] = None,
            i: int = 0) -> None:
        """Writes row `row`; with `logits`, their `i`-th row too (a store without a logits column ignores them)."""
        self.x[row], self.y[row], self.ts[row] = x, y, ts
        if logits is not None and self.logits.shape[1]:
            self.logits[row], self.known[row] = logits.values[i], logits.known[i]

    def put_many(self, rows: np.ndarray, x: np.ndarray, y: np.ndarray, ts: np.ndarray,
                 logits: Optional[Logits] = None, take: Optional[np.ndarray] = None) -> None:
        """Writes rows `rows` from the inputs' rows `take` (all, in order, when None)."""
        pick = slice(None) if take is None else take
        self.x[rows], self.y[rows], self.ts[rows] = x[pick], y[pick], ts[pick]
        if logits is not None and self.logits.shape[1]:
            self.logits[rows], self.known[rows] = logits.values[pick], logits.known[pick]

    def keep(self, rows: np.ndarray) -> None:
        """Keeps only `rows` (ascending), moved to the front in order; the rest is free again."""
        n = len(rows)
        self.x[:n], self.y[:n], self.ts[:n] = self.x[rows], self.y[rows], self.ts[rows]
        self.logits[:n], self.known[:n] = self.logits[rows], self.known[rows]
        self.size = n

    def drop_before(self, ts: float) -> int:
        """Drops the rows older than event time `ts`; returns how many went."""
        size = self.size
        self.keep(self.since(ts))
        return size - self.size

    def since(self, ts: float) -> np.ndarray:
        """Indices of the filled rows of event time `ts` or later."""
        return np.flatnonzero(self.ts[:self.size] >= ts)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}.x": self.x, f"{prefix}.y": self.y, f"{prefix}.ts": self.ts,
                  f"{prefix}.size": np.array([self.size], dtype=np.int64)}
        if self.logits.shape[1]:   # only when kept: snapshots without them stay as they were
            arrays.update({f"{prefix}.logits": self.logits, f"{prefix}.known": self.known})
        return arrays

    def load(self, arrays: dict[str, np.ndarray], prefix: str) -> None:
        self.x, self.y, self.ts = (arrays[f"{prefix}.{k}"].copy() for k in ("x", "y", "ts"))
        self.size = int(arrays[f"{prefix}.size"][0])
        if self.logits.shape[1]:
            if f"{prefix}.logits" in arrays:
                self.logits, self.known = (arrays[f"{prefix}.{k}"].copy() for k in ("logits", "known"))
            else:   # a snapshot from before logits were kept: no row has a target for its outputs
                self.logits = np.zeros((self.capacity, self.logits.shape[1]), dtype=np.float32)
                self.known = np.zeros(self.capacity, dtype=np.int64)


class ReplayBuffer(Protocol):
    """What the torch learner needs of a buffer."""

    store: ReplayStore

    def add(self, x: np.ndarray, y: np.ndarray, ts: np.ndarray, logits: Optional[Logits] = None) -> None:
        """Offers rows to the buffer (with their logits, kept when the buffer has a logits column)."""

    def sample(self, n: int, since: Optional[float] = None) -> np.ndarray:
        """Row indices of `n` replayed examples (fewer when the buffer holds fewer); only rows of event
        time `since` or later when given (none if there are none)."""

    def expire(self, before: float) -> int:
        """Drops the rows older than event time `before` (a confirmed concept change); returns how many."""

    def arrays(self) -> dict[str, np.ndarray]: ...

    def load(self, arrays: dict[str, np.ndarray]) -> None: ...


def uniform_rows(store: ReplayStore, rng: np.random.Generator, n: int, since: Optional[float]) -> np.ndarray:
    """`n` row indices drawn uniformly from the filled rows (those of event time `since` or later, if given)."""
    if since is None:
        size = store.size
        return rng.integers(size, size=n) if size else np.empty(0, dtype=np.int64)
    rows = store.since(since)
    return rows[rng.integers(len(rows), size=n)] if len(rows) else np.empty(0, dtype=np.int64)


def rng_state(rng: np.random.Generator) -> np.ndarray:
    """A generator's exact state as bytes in an array (safetensors holds arrays, not dicts)."""
    return np.frombuffer(json.dumps(rng.bit_generator.state).encode(), dtype=np.uint8).copy()


def load_rng(rng: np.random.Generator, state: np.ndarray) -> None:
    rng.bit_generator.state = json.loads(state.tobytes().decode())
