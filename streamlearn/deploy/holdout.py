"""The gate's recent data: one in `gate.holdout_every` of a model's examples held out, the newest kept.

The held-out example of each stretch of `every` is at a place chosen by a hash of
the seed, model and stretch, so the same stream holds out the same examples after
a restore. Held-out examples are never learned; the last `gate.holdout_size` of
them are what the gate scores both versions on; after a confirmed concept change
only those since the change count (`since`): older ones carry the old concept's labels.

>>> from streamlearn.records import Example
>>> holdout = Holdout("m", every=10, size=3, seed=1)
>>> learn = holdout.split([Example(f"r-{i}", "m", {}, 1, 1.0, i, i) for i in range(50)])
>>> len(learn), holdout.held_out, len(holdout.recent)
(45, 5, 3)
>>> [ex.ts for ex in holdout.since(40.0)], holdout.ts
([43], 49)
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import Optional

import msgspec

from streamlearn.records import Example


class HoldoutState(msgspec.Struct):
    position: int                # examples of the model taken so far
    held_out: int
    recent: list[Example]        # oldest first
    ts: float = float("-inf")    # event time of the newest example taken (what a candidate made now has seen)


class Holdout:
    """Splits a model's examples into those to learn and those the gate keeps."""

    def __init__(self, model: str, every: int, size: int, seed: int, state: Optional[HoldoutState] = None) -> None:
        self.model = model
        self.every = every
        self.seed = seed
        self.position = state.position if state else 0
        self.held_out = state.held_out if state else 0
        self.recent: deque[Example] = deque(state.recent if state else (), maxlen=size)
        self.ts = state.ts if state else float("-inf")

    def split(self, examples: list[Example]) -> list[Example]:
        """Keeps the held-out examples among these; returns the others, in order, to be learned."""
        if examples:   # examples come in event-time order; max() in case a source breaks that
            self.ts = max(self.ts, examples[-1].ts)
        if not self.every or not examples:
            self.position += len(examples)
            return examples
        start, end = self.position, self.position + len(examples)
        held = [p for p in (s * self.every + self._place(s) for s in range(start // self.every,
                                                                           (end - 1) // self.every + 1))
                if start <= p < end]
        self.position = end
        if not held:
            return examples
        learn, taken = [], start
        for p in held:
            learn.extend(examples[taken - start:p - start])
            self.recent.append(examples[p - start])
            taken = p + 1
        learn.extend(examples[taken - start:])
        self.held_out += len(held)
        return learn

    def since(self, ts: Optional[float]) -> list[Example]:
        """The kept held-out examples at or after event time `ts` (all of them when None), oldest first."""
        return list(self.recent) if ts is None else [ex for ex in self.recent if ex.ts >= ts]

    def _place(self, stretch: int) -> int:
        return zlib.crc32(f"{self.seed}:{self.model}:{stretch}".encode()) % self.every

    def state(self) -> HoldoutState:
        return HoldoutState(self.position, self.held_out, list(self.recent), self.ts)
