"""The cheap undo of a River model's updates: a copy every K examples, and the examples learned since.

A River model cannot be deep-copied per example at 50k examples/s, but a pickled copy
every thousand or so costs about 30 µs a thousand examples. `RiverLearner` keeps one
(`UpdateGuard`) and, when an output turns unsound, goes back to it and learns the
examples since again, each checked, without the ones that broke the model.

>>> from river import linear_model
>>> model = linear_model.LinearRegression()
>>> model.learn_one({"x": 1.0}, 2.0)
>>> finite_state(model)
True
>>> model._weights["x"] = float("nan")   # what one update with a 1e300 feature leaves
>>> finite_state(model)
False
"""

from __future__ import annotations

import pickle
from typing import Optional

import numpy as np

from streamlearn.records import Example

GUARD_EVERY = (1_000, 10_000)   # examples between two copies of the model: bigger models are copied less often,
GUARD_BYTES_PER_EXAMPLE = 64    # one example per this many pickled bytes (copying costs about its size)
GUARD_SCAN_BYTES = 256 * 1024   # up to this size, every replayed update is checked for non-finite state too
MAX_CULPRITS = 16               # more bad updates than this since the copy: all of them are dropped
EXPLODED_RANGES = 100.0         # a regression prediction this many target ranges outside the targets seen
RANGE_WARMUP = 100              # targets seen before the range is trusted
# What a broken model raises when scoring: worth a look at the copy. A TypeError (a string for a numeric
# model) is the example's fault and is refused at once, without touching the copy.
SUSPECT_ERRORS = (ArithmeticError, ValueError)


class UnsoundOutput(Exception):
    """The model's output for an example is non-finite or far outside the targets, and the model is not at fault."""


class UpdateGuard:
    """The cheap undo for River models: a pickled copy every K examples and the examples learned since.

    Copies are taken only of a finite state. When an output is unsound (a NaN probability, a non-finite or
    exploded regression prediction, an arithmetic error), the copy scores the same example: if it is sound
    there, an update since the copy broke the model, so the copy is restored and the examples since are
    learned again one by one, each checked, skipping the culprits. If the copy fails on it too, the example
    itself is at fault and is refused unlearned. Not in snapshots: after a restore the first copy is taken
    at the first example.
    """

    def __init__(self) -> None:
        self.copy: Optional[bytes] = None
        self.since: list[Example] = []
        self.every = GUARD_EVERY[0]
        self.scan_each = True    # check every replayed update's state (small models only)
        self.spent = False       # a replay since the copy found no culprit: no second one before the next copy

    def keep(self, model) -> None:
        self.copy = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        self.since = []
        self.spent = False
        self.every = min(GUARD_EVERY[1], max(GUARD_EVERY[0], len(self.copy) // GUARD_BYTES_PER_EXAMPLE))
        self.scan_each = len(self.copy) <= GUARD_SCAN_BYTES

    def restored(self):
        return pickle.loads(self.copy)


def finite_state(model) -> bool:
    """Whether every number in the model's state (floats, dicts, River's VectorDicts, numpy arrays) is finite."""
    stack, seen = [model], set()
    while stack:
        obj = stack.pop()
        kind = type(obj)
        if kind is float:
            if obj - obj != 0.0:   # inf - inf and NaN - NaN are NaN
                return False
            continue
        if kind in (int, bool, str, bytes, type(None)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if kind is dict or kind.__name__ == "VectorDict" or isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)) or kind.__name__ == "deque":
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            if obj.dtype.kind in "fc" and not np.isfinite(obj).all():
                return False
            if obj.dtype == object:
                stack.extend(obj.ravel().tolist())
        elif isinstance(obj, (np.floating, np.complexfloating)):
            if not np.isfinite(obj):
                return False
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(getattr(obj, "__func__", None)):
            stack.extend(vars(obj).values())
    return True
