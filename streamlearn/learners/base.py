"""What every learner shares: prequential scores, probes, counters, latency histograms, score marks.

A learner subclass implements `_test_then_train(examples, now)`: score each
example with the current model, then learn from it; and `_predict_labels`, for
scoring probe sets. Here are the bookkeeping around them (held-out probes and
evaluations, drift detection, latency) and the parts of a snapshot every
learner has.
"""

from __future__ import annotations

import logging
from bisect import bisect_right, insort
from typing import Callable, Optional

import msgspec
import numpy as np

from streamlearn.config import DriftConfig, EvalConfig
from streamlearn.learners.drift import DriftEvent, DriftMonitor
from streamlearn.learners.probes import ProbeSets
from streamlearn.learners.scores import PrequentialScores
from streamlearn.records import Example
from streamlearn.telemetry.histogram import LATENCY_BUCKETS, WAIT_BUCKETS, Histogram
from streamlearn.telemetry.history import DriftMark, finite_or_none
from streamlearn.triggers import Trigger

log = logging.getLogger(__name__)


class Learner:
    """One named model's scores and counters; subclasses bring the model."""

    STATE: tuple[str, ...] = ("scores", "drift", "probes", "learned", "errors", "update_seconds", "loop_latency",
                              "processing", "_marks", "_marked")
    rolled_back = 0   # updates undone because they made the model non-finite (torch learners)

    def __init__(self, name: str, task: str, window: int, drift: Optional[DriftConfig] = None,
                 evaluation: Optional[EvalConfig] = None, seed: int = 42) -> None:
        self.name = name
        self.task = task
        self.scores = PrequentialScores(task, window)
        self.drift = DriftMonitor(drift or DriftConfig())
        self.probes = _probe_sets(name, task, evaluation, seed)
        self.learned = 0
        self.errors = 0
        self.update_seconds = Histogram(LATENCY_BUCKETS)   # one model update (one micro-batch)
        self.loop_latency = Histogram(LATENCY_BUCKETS)     # label event time -> model updated
        self.processing = Histogram(WAIT_BUCKETS)          # example read from the source -> model updated
        self.drifts: list[DriftMark] = []                  # detections not yet written to the history
        self.on_evaluation: Callable[["Learner"], None] = lambda learner: None   # the service records history
        self._marks: list[float] = []          # event times whose rolling score to keep, ascending
        self._marked: dict[float, float] = {}

    def learn_batch(self, examples: list[Example], now: Optional[float] = None) -> None:
        """Scores then learns every example, in order (but held-out probes); a failing one is counted, not fatal."""
        if self.probes is None:
            self._learn_marked(examples, now)
            return
        for piece, evaluate in self.probes.split(examples):
            if piece:
                self._learn_marked(piece, now)
            if evaluate:
                self.evaluate()

    def evaluate(self) -> None:
        """Scores the model on every kept probe set (forgetting, backward transfer), then tells the service."""
        self.probes.record([self.probe_accuracy(segment.probes) for segment in self.probes.segments])
        self.on_evaluation(self)

    def probe_accuracy(self, probes: list[Example]) -> float:
        """Share of `probes` whose label the model predicts now (it learns nothing from them)."""
        predicted = self._predict_labels(probes)
        return sum(p == ex.label for p, ex in zip(predicted, probes)) / len(probes) if probes else float("nan")

    def _predict_labels(self, examples: list[Example]) -> list:
        raise NotImplementedError

    def _learn_marked(self, examples: list[Example], now: Optional[float]) -> None:
        while self._marks and examples and examples[-1].ts > self._marks[0]:
            mark = self._marks.pop(0)
            split = bisect_right(examples, mark, key=lambda e: e.ts)  # examples come in event-time order
            if split:
                self._test_then_train(examples[:split], now)
            self.settle()
            self._marked[mark] = self.scores.value(self.scores.names[0], rolling=True)
            examples = examples[split:]
        if examples:
            self._test_then_train(examples, now)

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Scores whatever was taken but not scored yet (a learner that scores in its training pass)."""

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

    def triggers(self) -> list[Trigger]:
        """The learner's own triggers (the torch learner's consolidation), for their counts."""
        return []

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

    @property
    def watched_score(self) -> float:
        """The rolling accuracy once its window is full, for score triggers; NaN before, and for regression."""
        if self.task != "classification" or self.scores.count < self.scores.window:
            return float("nan")
        return self.scores.value("accuracy", rolling=True)

    def _watch(self, errors: np.ndarray) -> None:
        for event in self.drift.update(errors):
            log.info("model %s: drift detected by %s at example %d", self.name, event.detector, event.position)
            self.drifts.append(DriftMark(event.detector, event.position))
            del self.drifts[:-100]   # drained by the history; bounded when nobody records it
            self.on_drift(event)

    def on_drift(self, event: DriftEvent) -> None:
        """What the learner itself does about a drift (the torch learner consolidates)."""

    def _observe_update(self, seconds: float, label_ts: np.ndarray, consumed: np.ndarray, now: float) -> None:
        self.update_seconds.observe(seconds)
        self.loop_latency.observe_many(now - label_ts)
        self.processing.observe_many(now - consumed[consumed > 0])   # 0: read before the time was kept

    def _count_error(self, ex: Example, err: Exception, what: str = "") -> None:
        self.errors += 1
        if self.errors <= 10 or self.errors % 1000 == 0:  # rate-limited: a poisoned stream must not flood logs
            log.warning("model %s: %sexample %s not learned (%d so far): %s: %s",
                        self.name, what, ex.id[:64], self.errors, type(err).__name__, err)

    def summary(self) -> dict:
        out = {"model": self.name, "task": self.task, "learned": self.learned, "errors": self.errors,
               "scores": self.scores.values(), "drift_detected": dict(sorted(self.drift.detected.items()))}
        if self.probes is not None:
            out.update(held_out=self.probes.held_out, forgetting=finite_or_none(self.probes.forgetting),
                       backward_transfer=finite_or_none(self.probes.backward_transfer),
                       probe_accuracy={str(k): v for k, v in self.probes.accuracies().items()})
        return out


def _probe_sets(name: str, task: str, evaluation: Optional[EvalConfig], seed: int) -> Optional[ProbeSets]:
    """Evaluation points for every model; held-out probes for classifiers (probe scores are accuracies)."""
    if evaluation is None:
        return None
    if task != "classification":
        evaluation = msgspec.structs.replace(evaluation, probe_size=0)
    return ProbeSets(name, evaluation, seed)
