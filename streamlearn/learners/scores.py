"""Prequential (test-then-train) scores: cumulative and over a rolling window.

Per-example losses arrive as one numpy array per batch, so the learning loop
itself only appends to lists.

>>> s = PrequentialScores("classification", window=2)
>>> s.update_classification([True, False, True], [0.9, 0.4, 0.8])
>>> round(s.value("accuracy", rolling=False), 3), s.value("accuracy", rolling=True)
(0.667, 0.5)
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-15
METRICS = {"classification": ("accuracy", "log_loss"), "regression": ("mae", "rmse")}


class RollingMean:
    """Mean of the last `size` values, kept in a ring buffer."""

    def __init__(self, size: int) -> None:
        self.ring = np.zeros(size)
        self.filled = 0
        self.head = 0

    def extend(self, values: np.ndarray) -> None:
        size = len(self.ring)
        values = values[-size:]
        end = self.head + len(values)
        if end <= size:
            self.ring[self.head:end] = values
        else:
            split = size - self.head
            self.ring[self.head:] = values[:split]
            self.ring[: end - size] = values[split:]
        self.head = end % size
        self.filled = min(size, self.filled + len(values))

    def mean(self) -> float:
        return float(self.ring[: self.filled].mean()) if self.filled else math.nan


class PrequentialScores:
    """Accuracy and log loss (classification) or MAE and RMSE (regression)."""

    def __init__(self, task: str, window: int) -> None:
        self.task = task
        self.window = window
        self.count = 0
        self._sums = [0.0, 0.0]
        self._rolling = (RollingMean(window), RollingMean(window))

    @property
    def names(self) -> tuple[str, str]:
        return METRICS[self.task]

    def update_classification(self, correct, p_true) -> None:
        correct = np.asarray(correct, dtype=float)
        loss = -np.log(np.maximum(np.asarray(p_true, dtype=float), EPS))   # probabilities: at most 1
        self._add(correct, loss)

    def update_regression(self, y_true, y_pred) -> None:
        err = np.asarray(y_true, dtype=float) - np.asarray(y_pred, dtype=float)
        self._add(np.abs(err), err * err)

    def _add(self, first: np.ndarray, second: np.ndarray) -> None:
        self.count += len(first)
        self._sums[0] += float(first.sum())
        self._sums[1] += float(second.sum())
        self._rolling[0].extend(first)
        self._rolling[1].extend(second)

    def value(self, metric: str, rolling: bool) -> float:
        i = self.names.index(metric)
        mean = self._rolling[i].mean() if rolling else (self._sums[i] / self.count if self.count else math.nan)
        return math.sqrt(mean) if metric == "rmse" else mean

    def values(self) -> dict[str, float]:
        """`{"accuracy": .., "accuracy_rolling": .., ...}` for summaries."""
        out = {}
        for name in self.names:
            out[name] = self.value(name, rolling=False)
            out[f"{name}_rolling"] = self.value(name, rolling=True)
        return out
