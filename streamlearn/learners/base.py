"""What every learner shares: prequential scores, counters, latency histograms, score marks.

A learner subclass implements `_test_then_train(examples, now)`: score each
example with the current model, then learn from it. Here are the bookkeeping
around it and the parts of a snapshot every learner has.
"""

from __future__ import annotations

import logging
from bisect import bisect_right, insort
from typing import Optional

import numpy as np

from streamlearn.config import DriftConfig
from streamlearn.learners.drift import DriftEvent, DriftMonitor
from streamlearn.learners.scores import PrequentialScores
from streamlearn.records import Example
from streamlearn.telemetry.histogram import LATENCY_BUCKETS, Histogram

log = logging.getLogger(__name__)


class Learner:
    """One named model's scores and counters; subclasses bring the model."""

    STATE: tuple[str, ...] = ("scores", "drift", "learned", "errors", "update_seconds", "loop_latency", "_marks",
                              "_marked")
    rolled_back = 0   # updates undone because they made the model non-finite (torch learners)

    def __init__(self, name: str, task: str, window: int, drift: Optional[DriftConfig] = None) -> None:
        self.name = name
        self.task = task
        self.scores = PrequentialScores(task, window)
        self.drift = DriftMonitor(drift or DriftConfig())
        self.learned = 0
        self.errors = 0
        self.update_seconds = Histogram(LATENCY_BUCKETS)   # one model update (one micro-batch)
        self.loop_latency = Histogram(LATENCY_BUCKETS)     # label event time -> model updated
        self._marks: list[float] = []          # event times whose rolling score to keep, ascending
        self._marked: dict[float, float] = {}

    def learn_batch(self, examples: list[Example], now: Optional[float] = None) -> None:
        """Scores then learns every example, in order; a failing example is counted, not fatal."""
        while self._marks and examples and examples[-1].ts > self._marks[0]:
            mark = self._marks.pop(0)
            split = bisect_right(examples, mark, key=lambda e: e.ts)  # examples come in event-time order
            if split:
                self._test_then_train(examples[:split], now)
            self._marked[mark] = self.scores.value(self.scores.names[0], rolling=True)
            examples = examples[split:]
        if examples:
            self._test_then_train(examples, now)

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """Called on every turn of the loop, examples or not (a learner with a timer flushes here)."""

    def flush(self, now: Optional[float] = None) -> None:
        """Learns whatever is still queued (before the final snapshot)."""

    def state(self) -> dict:
        """Everything that changes as it learns, but tensors (for a snapshot; pickled, trusted only once verified)."""
        return {name: getattr(self, name) for name in self.STATE}

    def restore(self, state: dict) -> None:
        for name in self.STATE:
            setattr(self, name, state[name])

    def tensors(self) -> dict[str, np.ndarray]:
        """Arrays of the learner's state, stored without pickle (safetensors); none for most learners."""
        return {}

    def restore_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        pass

    @property
    def replay_size(self) -> Optional[int]:
        """Examples in the replay buffer; None for a learner without one."""
        return None

    def mark_score_at(self, ts: float) -> None:
        """Keeps the rolling score of the first metric as it is once every example up to event time `ts` is learned."""
        insort(self._marks, ts)

    def score_at(self, ts: float) -> float:
        """The score kept by `mark_score_at(ts)` (NaN if not marked, or not reached yet)."""
        return self._marked.get(ts, float("nan"))

    def _scored_classification(self, correct, p_true) -> None:
        """Adds scored examples to the prequential scores and their errors to the drift detectors."""
        self.scores.update_classification(correct, p_true)
        self._watch(1.0 - np.asarray(correct, dtype=float))

    def _scored_regression(self, y_true, y_pred) -> None:
        self.scores.update_regression(y_true, y_pred)
        self._watch(np.abs(np.asarray(y_true, dtype=float) - np.asarray(y_pred, dtype=float)))

    def _watch(self, errors: np.ndarray) -> None:
        for event in self.drift.update(errors):
            log.info("model %s: drift detected by %s at example %d", self.name, event.detector, event.position)
            self.on_drift(event)

    def on_drift(self, event: DriftEvent) -> None:
        """What the learner itself does about a drift (the torch learner consolidates)."""

    def _observe_update(self, seconds: float, label_ts: np.ndarray, now: float) -> None:
        self.update_seconds.observe(seconds)
        self.loop_latency.observe_many(now - label_ts)

    def _count_error(self, ex: Example, err: Exception, what: str = "") -> None:
        self.errors += 1
        if self.errors <= 10 or self.errors % 1000 == 0:  # rate-limited: a poisoned stream must not flood logs
            log.warning("model %s: %sexample %s not learned (%d so far): %s: %s",
                        self.name, what, ex.id[:64], self.errors, type(err).__name__, err)

    def summary(self) -> dict:
        return {"model": self.name, "task": self.task, "learned": self.learned, "errors": self.errors,
                "scores": self.scores.values()}
