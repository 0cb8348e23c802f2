"""The private base of the built-in learners: the contract's plumbing, so each kind brings only its model.

A subclass implements `_test_then_train(examples, now)` (score each example with
the current model, then learn from it), `predict_many`, `_own_state` and
`_restore_own` (its part of a snapshot), `_tensors` and `_restore_tensors` (arrays
kept without pickle), `export` and `metrics`; optionally `_settle` (score what it
queued) and `_on_drift`. Here are the held-out probes and evaluation points, the
score marks, and the snapshot record. What is judged lives in the learner's
`ModelEvaluation` (`evaluation.py`), composed, not inherited; the contract the rest
of the code sees is `contract.Learner`.
"""

from __future__ import annotations

import pickle
from bisect import bisect_right
from typing import ClassVar, Optional

import numpy as np

from streamlearn.config import DriftConfig, EvalConfig, ModelConfig
from streamlearn.learners.contract import ExportedModel, LearnerMetrics, LearnerSnapshot, frozen_arrays
from streamlearn.learners.drift import DriftMark
from streamlearn.learners.drift_policy import Transition
from streamlearn.learners.evaluation import ModelEvaluation
from streamlearn.records import Example, Features


class LearnerBase:
    """What the built-in learners share; subclasses bring the model (see the module docstring)."""

    kind: ClassVar[str] = ""

    def __init__(self, name: str, config: ModelConfig, seed: int = 42, *, drift: Optional[DriftConfig] = None,
                 evaluation: Optional[EvalConfig] = None) -> None:
        self.name = name
        self.task = config.task
        self.evaluation = ModelEvaluation(name, config.task, config.window, drift, evaluation, seed, config.model,
                                          predict=self.predict_many, settle=self._settle)

    # --- the contract -----------------------------------------------------------------------------------------

    def learn_batch(self, examples: list[Example], now: Optional[float] = None) -> None:
        """Scores then learns every example, in order (but held-out probes); a failing one is counted, not fatal."""
        evaluation = self.evaluation
        if evaluation.probes is None:
            self._learn_marked(examples, now)
            return
        for piece, evaluate in evaluation.probes.split(examples):
            if piece:
                self._learn_marked(piece, now)
            if evaluate:
                evaluation.evaluate()
        evaluation.check_refusals()

    def predict_many(self, rows: list[Features]) -> list:
        raise NotImplementedError

    def flush(self, now: Optional[float] = None) -> None:
        """Learns whatever is still queued, at the end of the input (`now`: wall time, for latency only).

        Not on a stop: what is queued then stays queued in the snapshot, so that a restarted learner goes
        on exactly as an uninterrupted one would.
        """

    def snapshot(self) -> LearnerSnapshot:
        """The whole state, pickled now, and read-only copies of its arrays: nothing done later changes it."""
        state = {**self.evaluation.state(), **self._own_state()}
        return LearnerSnapshot(self.kind, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
                               frozen_arrays(self._tensors()))

    def restore(self, snapshot: LearnerSnapshot) -> None:
        """Takes back a verified snapshot's state (this kind's, or an older snapshot's, whose kind is unknown)."""
        if snapshot.kind and snapshot.kind != self.kind:
            raise ValueError(f"learner {self.name!r} is a {self.kind} learner; the snapshot is of a "
                             f"{snapshot.kind} one")
        state = pickle.loads(snapshot.state)
        self.evaluation.restore(state)
        self._restore_own(state)
        # Writable copies: the learner goes on changing them in place.
        self._restore_tensors({k: np.array(v, copy=True) for k, v in snapshot.tensors.items()})

    def export(self) -> ExportedModel:
        raise NotImplementedError

    def metrics(self) -> LearnerMetrics:
        raise NotImplementedError

    # --- for subclasses ---------------------------------------------------------------------------------------

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        raise NotImplementedError

    def _settle(self) -> None:
        """Scores whatever was taken but not scored yet (a learner that scores in its training pass)."""

    def _own_state(self) -> dict:
        """The learner's part of the state (the evaluation's is added), live objects, pickled by `snapshot`."""
        return {}

    def _restore_own(self, state: dict) -> None:
        pass

    def _tensors(self) -> dict[str, np.ndarray]:
        """Arrays of the learner's state, stored without pickle (safetensors); none for most learners."""
        return {}

    def _restore_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        pass

    def _scored_classification(self, correct, p_true, ts: Optional[np.ndarray] = None) -> None:
        """Reports scored examples to the evaluation, and acts on the drifts it detected among them."""
        for event in self.evaluation.scored_classification(correct, p_true, ts):
            self._on_drift(event)

    def _scored_regression(self, y_true, y_pred, ts: Optional[np.ndarray] = None) -> None:
        for event in self.evaluation.scored_regression(y_true, y_pred, ts):
            self._on_drift(event)

    def _on_drift(self, event: DriftMark) -> None:
        """What the learner itself does about a drift: opens a policy case (the torch learner also consolidates)."""
        self._open_case(event)

    def _open_case(self, event: DriftMark) -> bool:
        """Opens a drift case (see `ModelEvaluation.open_case`) and fixes its reference; False if none opened."""
        if not self.evaluation.open_case(event):
            return False
        self._case_opened()
        return True

    def _case_opened(self) -> None:
        """Fixes the reference the open case is judged against (learners that judge)."""

    def _judge_scored(self, labels: list, ts: np.ndarray, judge) -> None:
        """Judges the examples just scored against an open case's reference, and acts on each decision in order."""
        for decision in self.evaluation.judge_scored(labels, ts, judge):
            self._decided(decision)

    def _decided(self, decision: Transition) -> None:
        """Acts on a policy decision and counts what was done (subclasses add their model's actions)."""
        self.evaluation.count_decision(decision)

    def _learn_marked(self, examples: list[Example], now: Optional[float]) -> None:
        evaluation = self.evaluation
        while examples and (mark := evaluation.next_mark(examples[-1].ts)) is not None:
            split = bisect_right(examples, mark, key=lambda e: e.ts)  # examples come in event-time order
            if split:
                self._test_then_train(examples[:split], now)
            self._settle()
            evaluation.keep_mark(mark)
            examples = examples[split:]
        if examples:
            self._test_then_train(examples, now)
