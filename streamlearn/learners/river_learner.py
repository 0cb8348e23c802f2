"""Test-then-train over a River estimator, per example or in `learn_many` micro-batches.

Each example is scored by the current model before the model learns from it,
so the prequential scores measure what serving would have seen. An example the
model raises on is refused (counted by exception class, kept for the dead
letters); an update after which the model's output is non-finite or explodes is
undone by the `UpdateGuard` (per example only).

With `learn_mode = "many"` examples are queued and learned `train.batch_size` at
a time, as the torch learner does: a partial micro-batch is learned just before
an example more than `train.max_wait` seconds of event time after its oldest one,
and at the end of the input (`flush`). So the sequence of examples alone decides
the micro-batches, never how the intake cut the stream, and the queue is part of
the snapshot: a restored learner goes on exactly as an uninterrupted one.

>>> from streamlearn.records import Example
>>> from streamlearn.config import ModelConfig
>>> learner = RiverLearner("default", ModelConfig(model="logreg", task="classification"))
>>> batch = [Example(f"r-{i}", "default", {"x": float(i % 2)}, i % 2, 1.0, i, i) for i in range(200)]
>>> learner.learn_batch(batch, now=300.0)
>>> learner.evaluation.learned, learner.evaluation.scores.value("accuracy", rolling=True) > 0.9
(200, True)
"""

from __future__ import annotations

import inspect
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from streamlearn.config import DriftConfig, EvalConfig, ModelConfig
from streamlearn.learners.averaging import Averaging, averageable
from streamlearn.learners.base import LearnerBase
from streamlearn.learners.contract import RIVER_MODEL, ExportedModel, LearnerMetrics
from streamlearn.learners.drift_policy import Judged, Transition
from streamlearn.learners.guard import (EXPLODED_RANGES, GUARD_BYTES_PER_EXAMPLE, MAX_CULPRITS, RANGE_WARMUP,
                                        SUSPECT_ERRORS, UnsoundOutput, UpdateGuard, finite_state)
from streamlearn.learners.models import NUMERIC_ONLY, ModelError, build_model
from streamlearn.records import Example, Features

log = logging.getLogger(__name__)


class _PolicySide:
    """What a River learner does for its drift policy: reference copies, judging, and the model's actions."""

    def _copies_references(self) -> bool:
        policy = self.evaluation.policy
        return policy.enabled and policy.case is None

    def _keep_reference(self, position: int) -> None:
        """Keeps a pickled copy of the model as it is (the last two are kept).

        A large model is copied less often, on the update guard's budget (a byte copied per example learned
        in `GUARD_BYTES_PER_EXAMPLE`): an ARF of 47 MB copied every 500 examples halved its throughput. The
        spacing follows the copy's size alone, so a replay keeps its copies at the same positions.
        """
        copy = pickle.dumps(self.model, protocol=pickle.HIGHEST_PROTOCOL)
        self._references = [*self._references, copy][-2:]
        every = max(self.evaluation.policy.config.reference_every, len(copy) // GUARD_BYTES_PER_EXAMPLE)
        self._reference_due = position + every

    def _case_opened(self) -> None:
        """The case is judged against the older kept copy (from before the change), or the model now."""
        self._reference = (self._references[0] if self._references
                           else pickle.dumps(self.model, protocol=pickle.HIGHEST_PROTOCOL))
        self._reference_model = None

    def _judge_examples(self, examples: list[Example], ts: np.ndarray) -> None:
        if self.evaluation.policy.enabled:
            self._judge_scored([ex.label for ex in examples], ts, lambda i: self._judged(examples[i:]))

    def _judged(self, examples: list[Example]) -> Judged:
        """The reference model's verdict on examples scored after the detection."""
        if self._reference_model is None:
            self._reference_model = pickle.loads(self._reference)
        agree, known = [], []
        for ex in examples:
            try:
                proba = self._reference_model.predict_proba_one(ex.features)
            except Exception:   # what the reference cannot score says nothing about the labels
                proba = {}
            agree.append(bool(proba) and max(proba, key=proba.get) == ex.label)
            known.append(ex.label in proba)
        return Judged(agree, known, [ex.label for ex in examples])

    def _decided(self, decision: Transition) -> None:
        """A suspected change learns on from a fresh model; a burst after one brings the reference back."""
        super()._decided(decision)
        policy = self.evaluation.policy
        if decision.kind == "suspect":
            if policy.config.reset_river:
                self.model = self.model.clone()
                self.guard = UpdateGuard()
                policy.act("change", "reset_model", decision.position, decision.ts)
            return
        if decision.kind == "burst" and decision.suspected and policy.config.reset_river:
            self.model = pickle.loads(self._reference)
            self.guard = UpdateGuard()
            policy.act("burst", "restore", decision.position, decision.ts)
        self._reference, self._reference_model, self._references = None, None, []
        self._reference_due = self.evaluation.drift.position + policy.config.reference_every


@dataclass
class MicroBatchQueue:
    """Examples waiting for their `learn_many` micro-batch (learn_mode "many"), oldest first.

    The first `scored` were scored already (`settle`, at a score mark); the model does not change while
    they wait, so each is scored as it would have been on arrival.
    """

    examples: list[Example] = field(default_factory=list)
    scored: int = 0


class RiverLearner(_PolicySide, LearnerBase):
    """One named River estimator, test-then-train; its evaluation (scores, drift, probes) composed beside it."""

    kind = "river"   # the artifact format (deploy/model_files.py) and the learner kind, declared
    OWN_STATE = ("model", "target_range", "rolled_back", "queue", "_references", "_reference", "_reference_due")

    def __init__(self, name: str, config: ModelConfig, seed: int = 42, *, drift: Optional[DriftConfig] = None,
                 evaluation: Optional[EvalConfig] = None, threads: int = 0) -> None:
        super().__init__(name, config, seed, drift=drift, evaluation=evaluation)   # threads: torch's alone
        model, task, learn_mode = config.model, config.task, config.learn_mode
        self.model = build_model(model, task, dict(config.params), seed)
        self.learn_mode = learn_mode
        self.train = config.train   # learn_mode "many": micro-batch size and event-time wait
        self.queue = MicroBatchQueue()
        self.target_range = [math.inf, -math.inf, 0]   # lowest and highest regression target seen, and how many
        self.rolled_back = 0                           # updates the guard undid
        self.guard = UpdateGuard()
        # The drift policy's references: pickled copies every `reference_every` examples (the older of the last
        # two judges a case), and the one the open case is judged against.
        self._references: list[bytes] = []
        self._reference: Optional[bytes] = None
        self._reference_due = self.evaluation.policy.config.reference_every
        self._reference_model = None   # `_reference` unpickled (not in snapshots)
        if model in NUMERIC_ONLY:
            log.warning("model %s (%s) takes numbers only: an example with a string feature is refused "
                        "(dead letter learn_error); for string features use model = \"%s\"", name, model,
                        "logreg" if task == "classification" else "linreg")
        if learn_mode == "many" and not _learns_many(self.model, task):
            raise ModelError(f"{model} has no learn_many; use learn_mode = \"one\"", key="learn_mode")
        method = "learn_many" if learn_mode == "many" else "learn_one"
        self._takes_weight = "w" in _learn_parameters(self.model, method)
        if not self._takes_weight:
            log.info("model %s (%s) takes no sample weights%s: feedback weights are ignored", name, model,
                     " in learn_many" if learn_mode == "many" else "")

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        if self.learn_mode == "many":   # queued; each micro-batch is timed and observed when it is learned
            self._test_then_train_many(examples, time.time() if now is None else now)
            return
        started = time.perf_counter()
        if self.task == "classification":
            self._test_then_train_classifier(examples)
        else:
            self._test_then_train_regressor(examples)
        label_ts = np.fromiter((e.label_ts for e in examples), float, len(examples))
        consumed = np.fromiter((e.consumed for e in examples), float, len(examples))
        self.evaluation.observe_update(time.perf_counter() - started, label_ts, consumed,
                                       time.time() if now is None else now)

    def predict_many(self, rows: list[Features]) -> list:
        """The model's label (regression: value) for each feature dict, None where it raises; learns nothing."""
        predicted, predict = [], self.model.predict_one
        for x in rows:
            try:
                predicted.append(predict(x))
            except Exception:   # as in learning: a probe the model cannot take counts as a miss
                predicted.append(None)
        return predicted

    def export(self) -> ExportedModel:
        """`model.pkl`: the estimator (or pipeline) pickled, alone."""
        return ExportedModel("river", {RIVER_MODEL: pickle.dumps(self.model, protocol=pickle.HIGHEST_PROTOCOL)})

    def parameters(self) -> Averaging:
        """The model's averageable parameters as they are now, or why there are none (`averaging.averageable`)."""
        return averageable(self.model)

    def metrics(self) -> LearnerMetrics:
        return LearnerMetrics(self.evaluation.model_label, self.rolled_back)

    def _own_state(self) -> dict:
        return {name: getattr(self, name) for name in self.OWN_STATE}

    def _restore_own(self, state: dict) -> None:
        if "target_range" not in state:   # a snapshot from before the guard: the range is learned again
            state = {**state, "target_range": [math.inf, -math.inf, 0], "rolled_back": 0}
        if "queue" not in state:          # a snapshot from before micro-batches were queued: nothing waits
            state = {**state, "queue": MicroBatchQueue()}
        if "_references" not in state:    # a snapshot from before the drift policy
            state = {**state, "_references": [], "_reference": None,
                     "_reference_due": state["learned"] + self.evaluation.policy.config.reference_every}
        for name in self.OWN_STATE:
            setattr(self, name, state[name])
        self.guard = UpdateGuard()
        self._reference_model = None

    def _test_then_train_classifier(self, examples: list[Example]) -> None:
        guard, weighted = self.guard, self._takes_weight
        if guard.copy is None:
            self._keep_copy()
        predict, learn = self.model.predict_proba_one, self.model.learn_one
        since, every = guard.since, guard.every
        p_true, p_best, n_classes, scored = [], [], [], []
        # scored examples until the next reference copy (none while a drift case is open)
        drift = self.evaluation.drift
        copy_at = self._reference_due - drift.position if self._copies_references() else math.inf
        for ex in examples:
            x, y = ex.features, ex.label
            try:
                try:
                    proba = predict(x)
                    total = sum(proba.values())
                    sound = total - total == 0.0   # False for NaN and infinities
                except SUSPECT_ERRORS:
                    sound = False
                if not sound:
                    proba = self._recover(ex)
                    predict, learn = self.model.predict_proba_one, self.model.learn_one
                    since, every = guard.since, guard.every
                true, best, n = proba.get(y, 0.0), (max(proba.values()) if proba else 1.0), len(proba)
                if weighted and ex.weight != 1.0:
                    learn(x, y, w=ex.weight)
                else:
                    learn(x, y)
            except Exception as err:  # one bad example must not stop the service (a user's model may raise anything)
                self.evaluation.count_error(ex, err)
                continue
            p_true.append(true)
            p_best.append(best)
            n_classes.append(n)
            scored.append(ex)
            since.append(ex)
            if len(since) >= every:
                self._keep_copy()
                predict, learn = self.model.predict_proba_one, self.model.learn_one
                since, every = guard.since, guard.every
            if len(scored) >= copy_at:
                self._keep_reference(drift.position + len(scored))
                copy_at = self._reference_due - drift.position
        self.evaluation.learned += len(p_true)
        p = np.asarray(p_true, dtype=float)
        # Correct when the true label has the highest probability; an empty or uniform proba
        # (a model that knows nothing yet) is a miss.
        correct = (p >= np.asarray(p_best, dtype=float)) & (p * np.asarray(n_classes) > 1.0)
        ts = np.fromiter((e.ts for e in scored), float, len(scored))
        self._scored_classification(correct, p, ts)
        self._judge_examples(scored, ts)

    def _test_then_train_regressor(self, examples: list[Example]) -> None:
        guard, weighted = self.guard, self._takes_weight
        if guard.copy is None:
            self._keep_copy()
        predict, learn = self.model.predict_one, self.model.learn_one
        since, every = guard.since, guard.every
        low, high = self._plausible()
        low_seen, high_seen = self.target_range[0], self.target_range[1]
        y_true, y_pred = [], []
        for ex in examples:
            x, y = ex.features, ex.label
            try:
                target = float(y)
                if target - target != 0.0:   # an infinite target pulls any model to infinity
                    raise ValueError(f"label {y!r} is not a finite number")
                try:
                    guess = predict(x)
                    guess = 0.0 if guess is None else float(guess)
                    sound = low <= guess <= high   # False for NaN
                except SUSPECT_ERRORS:
                    sound = False
                if not sound:
                    guess = self._recover(ex)
                    predict, learn = self.model.predict_one, self.model.learn_one
                    since, every = guard.since, guard.every
                if weighted and ex.weight != 1.0:
                    learn(x, y, w=ex.weight)
                else:
                    learn(x, y)
            except Exception as err:
                self.evaluation.count_error(ex, err)
                continue
            y_true.append(target)
            y_pred.append(guess)
            since.append(ex)
            if not low_seen <= target <= high_seen or self.target_range[2] < RANGE_WARMUP:
                self._saw_target(target)
                low, high = self._plausible()
                low_seen, high_seen = self.target_range[0], self.target_range[1]
            else:
                self.target_range[2] += 1
            if len(since) >= every:
                self._keep_copy()
                predict, learn = self.model.predict_one, self.model.learn_one
                since, every = guard.since, guard.every
        self.evaluation.learned += len(y_true)
        self._scored_regression(y_true, y_pred)

    # --- the update guard ----------------------------------------------------------------------------------

    def _saw_target(self, y: float) -> None:
        """Counts a regression target and widens the range seen to take it."""
        r = self.target_range
        r[0], r[1], r[2] = min(r[0], y), max(r[1], y), r[2] + 1

    def _plausible(self) -> tuple[float, float]:
        """Predictions outside these bounds have exploded (any finite one until the range is known)."""
        lo, hi, n = self.target_range
        if n < RANGE_WARMUP or not math.isfinite(hi - lo):
            return -math.inf, math.inf
        span = max(hi - lo, abs(hi), abs(lo)) or 1.0
        return lo - EXPLODED_RANGES * span, hi + EXPLODED_RANGES * span

    def _output(self, model, x: dict) -> Any:
        """The model's output for `x`, or raises `UnsoundOutput` if it is non-finite or exploded."""
        if self.task == "classification":
            proba = model.predict_proba_one(x)
            if math.isfinite(sum(proba.values())):
                return proba
            raise UnsoundOutput(f"non-finite probabilities {proba}")
        guess = model.predict_one(x)
        guess = 0.0 if guess is None else float(guess)
        low, high = self._plausible()
        if low <= guess <= high:
            return guess
        raise UnsoundOutput(f"prediction {guess:g} outside [{low:g}, {high:g}]")

    def _sound(self, model, x: dict) -> bool:
        try:
            self._output(model, x)
            return True
        except Exception:
            return False

    def _recover(self, ex: Example) -> Any:
        """After an unsound output for `ex`: undoes the updates that caused it, or raises (the example is at fault)."""
        guard = self.guard
        if guard.copy is not None and not guard.spent and self._sound(guard.restored(), ex.features):
            self._replay()
        try:
            return self._output(self.model, ex.features)
        except UnsoundOutput as err:
            raise UnsoundOutput(f"{err}, with no bad update to undo: the example is refused unlearned") from None

    def _replay(self) -> None:
        """Restores the copy and learns the examples since again, each checked; the culprits are refused."""
        guard = self.guard
        model, kept, culprits = guard.restored(), [], []
        for i, ex in enumerate(guard.since):
            if self._learn_checked(model, ex):
                kept.append(ex)
                continue
            culprits.append(ex)
            if len(culprits) >= MAX_CULPRITS:   # a storm, not an outlier: back to the state before it
                culprits.extend(guard.since[i + 1:])
                model = self._relearned(kept)
                break
            model = self._relearned(kept)       # the state just before the culprit
        self.model = model
        guard.since = kept
        if not culprits:
            guard.spent = True
            return
        self.evaluation.learned -= len(culprits)
        self.rolled_back += len(culprits)
        log.warning("model %s: undid %d update(s) that made the model's output non-finite or explode",
                    self.name, len(culprits))
        for ex in culprits:
            self.evaluation.refuse(ex, "NonFiniteUpdate", "learning it made the model's output or state non-finite or "
                         "explode; undone")

    def _relearned(self, examples: list[Example]):
        model = self.guard.restored()
        for ex in examples:
            self._learn_into(model, ex)
        return model

    def _learn_checked(self, model, ex: Example) -> bool:
        """Learns `ex` into `model`; whether the model is still sound (its output for `ex`, and its state)."""
        try:
            self._learn_into(model, ex)
            self._output(model, ex.features)
        except Exception:
            return False
        return not self.guard.scan_each or finite_state(model)

    def _learn_into(self, model, ex: Example) -> None:
        if self._takes_weight and ex.weight != 1.0:
            model.learn_one(ex.features, ex.label, w=ex.weight)
        else:
            model.learn_one(ex.features, ex.label)

    def _keep_copy(self) -> None:
        """Copies the model when its state is finite; one that is not is first repaired from the last copy."""
        guard = self.guard
        if not finite_state(self.model):   # poisoned, though no output has shown it yet
            if guard.copy is not None:
                self._replay()
            if not finite_state(self.model):
                if guard.copy is not None:   # said once: the next copy is tried at the next batch
                    log.error("model %s: its state is not finite and no sound copy is left to go back to; "
                              "its unsound outputs are refused", self.name)
                guard.copy, guard.since = None, []
                return
        guard.keep(self.model)

    # -------------------------------------------------------------------------------------------------------

    def _test_then_train_many(self, examples: list[Example], now: float) -> None:
        """Queues the examples, learning each micro-batch as it fills or as the next example comes too late."""
        queue, size, wait = self.queue, self.train.batch_size, self.train.max_wait
        for ex in self._learnable(examples):
            if queue.examples and ex.ts - queue.examples[0].ts > wait:   # the partial one waited long enough
                self._learn_queued(now)
            queue.examples.append(ex)
            if len(queue.examples) >= size:
                self._learn_queued(now)

    def _learnable(self, examples: list[Example]) -> list[Example]:
        """The examples whose labels the task can take; the others are refused one by one, as in "one" mode
        (a bad regression target must not cost its whole micro-batch)."""
        if self.task == "classification":
            return examples
        kept = []
        for ex in examples:
            try:
                target = float(ex.label)
                if target - target != 0.0:
                    raise ValueError(f"label {ex.label!r} is not a finite number")
            except (TypeError, ValueError) as err:
                self.evaluation.count_error(ex, err)
                continue
            kept.append(ex)
        return kept

    def _settle(self) -> None:
        """Scores the queued examples not scored yet (for a score read while a micro-batch waits)."""
        queue = self.queue
        if len(queue.examples) > queue.scored:
            try:
                record = self._score_many(queue.examples[queue.scored:], None)
            except Exception:   # their micro-batch will raise too, and refuse them unscored
                return
            record()
            queue.scored = len(queue.examples)

    def flush(self, now: Optional[float] = None) -> None:
        if self.queue.examples:
            self._learn_queued(time.time() if now is None else now)
            self.evaluation.check_refusals()

    def _learn_queued(self, now: float) -> None:
        """Scores the queued examples not scored yet, then learns them all as one `learn_many` micro-batch.

        If scoring or learning raises, every example of the micro-batch is refused (`learn_error`); those
        scored already at a mark (`settle`) stay in the scores.
        """
        queue = self.queue
        batch, scored = queue.examples, queue.scored
        queue.examples, queue.scored = [], 0
        started = time.perf_counter()
        try:
            X = _frame(batch)
            record = self._score_many(batch[scored:], X.iloc[scored:] if scored else X)
            self._learn_many(X, batch)
        except Exception as err:  # a user's model may raise anything: the micro-batch is refused, not the service
            for ex in batch:
                self.evaluation.count_error(ex, err, f"in a micro-batch of {len(batch)}, ")
            return
        record()
        self.evaluation.learned += len(batch)
        position = self.evaluation.drift.position
        if self._copies_references() and position >= self._reference_due:
            self._keep_reference(position)
        label_ts = np.fromiter((e.label_ts for e in batch), float, len(batch))
        consumed = np.fromiter((e.consumed for e in batch), float, len(batch))
        self.evaluation.observe_update(time.perf_counter() - started, label_ts, consumed, now)

    def _score_many(self, examples: list[Example], X):
        """Scores `examples` (frame `X`, or built here) with the model as it is; returns how to record them.

        Recording is left to the caller, so that a micro-batch whose learning raises scores nothing.
        A hit is judged as in "one" mode: the true label has the highest probability, and more than a
        uniform guess's.
        """
        if not examples:   # all were scored at a mark
            return lambda: None
        X = _frame(examples) if X is None else X
        if self.task == "classification":
            correct, p_true = _hits(self.model.predict_proba_many(X), [ex.label for ex in examples])

            def record() -> None:
                ts = np.fromiter((e.ts for e in examples), float, len(examples))
                self._scored_classification(correct, p_true, ts)
                self._judge_examples(examples, ts)
            return record
        guess = np.asarray(self.model.predict_many(X), dtype=float)
        y_true = np.fromiter((float(ex.label) for ex in examples), float, len(examples))
        return lambda: self._scored_regression(y_true, guess)

    def _learn_many(self, X, batch: list[Example]) -> None:
        import pandas as pd

        y = pd.Series([ex.label for ex in batch])
        if self._takes_weight and any(ex.weight != 1.0 for ex in batch):
            self.model.learn_many(X, y, w=pd.Series([ex.weight for ex in batch], dtype=float))
        else:
            self.model.learn_many(X, y)


def _frame(examples: list[Example]):
    """The examples' features as a DataFrame; a numeric feature absent from a row is 0 there.

    A NaN would otherwise reach the model (River's StandardScaler learns it, and every later output is
    NaN); 0 is also what `StringOneHot` makes of it, so every built-in reads an absent number alike.
    """
    import pandas as pd

    X = pd.DataFrame.from_records([ex.features for ex in examples])
    numeric = X.select_dtypes("number").columns
    if len(numeric) and X[numeric].isna().to_numpy().any():
        X[numeric] = X[numeric].fillna(0.0)
    return X


def _hits(proba, labels: list) -> tuple[np.ndarray, np.ndarray]:
    """Whether each row of `predict_proba_many`'s frame is a hit for its true label, and that label's probability.

    As `_test_then_train_classifier` judges one example: a hit when the true label has the highest
    probability (ties included) and more than 1 / n_classes, so an empty or uniform proba (a model that
    knows nothing yet) is a miss; an unknown label has probability 0; a row with a non-finite value is a miss.
    """
    n = len(labels)
    P = proba.to_numpy(dtype=float)
    if P.shape[1] == 0:
        return np.zeros(n, dtype=bool), np.zeros(n)
    column = {c: j for j, c in enumerate(proba.columns)}
    index = np.fromiter((column.get(y, -1) for y in labels), np.intp, n)
    finite = np.isfinite(P).all(axis=1)
    p_true = np.where((index >= 0) & finite, P[np.arange(n), np.maximum(index, 0)], 0.0)
    with np.errstate(invalid="ignore"):
        correct = finite & (p_true >= P.max(axis=1)) & (p_true * P.shape[1] > 1.0)
    return correct, p_true


def _final_step(model):
    """The estimator at the end of a pipeline (the model itself otherwise)."""
    steps = getattr(model, "steps", None)
    return list(steps.values())[-1] if steps else model


def _learns_many(model, task: str) -> bool:
    """Whether the model (its final step, for a pipeline) learns and scores DataFrames."""
    final = _final_step(model)
    scores = "predict_proba_many" if task == "classification" else "predict_many"
    return hasattr(final, "learn_many") and hasattr(final, scores)


def _learn_parameters(model, method: str = "learn_one") -> set[str]:
    """The parameters of the model's (final step's) `method`: "w" when it takes sample weights."""
    try:
        return set(inspect.signature(getattr(_final_step(model), method)).parameters)
    except (AttributeError, TypeError, ValueError):
        return set()
