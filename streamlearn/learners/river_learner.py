"""Test-then-train over a River estimator, per example or in `learn_many` micro-batches.

Each example is scored by the current model before the model learns from it,
so the prequential scores measure what serving would have seen. An example the
model raises on is refused (counted by exception class, kept for the dead
letters); an update after which the model's output is non-finite or explodes is
undone by the `UpdateGuard` (per example only).

>>> from streamlearn.records import Example
>>> learner = RiverLearner("default", model="logreg", task="classification")
>>> batch = [Example(f"r-{i}", "default", {"x": float(i % 2)}, i % 2, 1.0, i, i) for i in range(200)]
>>> learner.learn_batch(batch, now=300.0)
>>> learner.learned, learner.scores.value("accuracy", rolling=True) > 0.9
(200, True)
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from typing import Any, Optional

import numpy as np

from streamlearn.config import DriftConfig, EvalConfig
from streamlearn.learners.base import Learner
from streamlearn.learners.guard import (EXPLODED_RANGES, MAX_CULPRITS, RANGE_WARMUP, SUSPECT_ERRORS, UnsoundOutput,
                                        UpdateGuard, finite_state)
from streamlearn.learners.models import NUMERIC_ONLY, ModelError, build_model
from streamlearn.records import Example

log = logging.getLogger(__name__)
class RiverLearner(Learner):
    """One named River estimator with its prequential scores and learning counters."""

    STATE = Learner.STATE + ("model", "target_range", "rolled_back")

    def __init__(self, name: str, model: str = "logreg", task: str = "classification",
                 learn_mode: str = "one", window: int = 1000, params: Optional[dict] = None,
                 seed: int = 42, drift: Optional[DriftConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        super().__init__(name, task, window, drift, evaluation, seed)
        self.model = build_model(model, task, params or {}, seed)
        self.model_label = model
        self.learn_mode = learn_mode
        self.target_range = [math.inf, -math.inf, 0]   # lowest and highest regression target seen, and how many
        self.rolled_back = 0                           # updates the guard undid
        self.guard = UpdateGuard()
        if model in NUMERIC_ONLY:
            log.warning("model %s (%s) takes numbers only: an example with a string feature is refused "
                        "(dead letter learn_error); for string features use model = \"%s\"", name, model,
                        "logreg" if task == "classification" else "linreg")
        if learn_mode == "many" and not hasattr(self.model, "learn_many"):
            raise ModelError(f"{model} has no learn_many; use learn_mode = \"one\"", key="learn_mode")
        self._takes_weight = "w" in _learn_parameters(self.model)
        if not self._takes_weight:
            log.info("model %s (%s) takes no sample weights: feedback weights are ignored", name, model)

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        started = time.perf_counter()
        if self.learn_mode == "many":
            self._test_then_train_many(examples)
        elif self.task == "classification":
            self._test_then_train_classifier(examples)
        else:
            self._test_then_train_regressor(examples)
        label_ts = np.fromiter((e.label_ts for e in examples), float, len(examples))
        consumed = np.fromiter((e.consumed for e in examples), float, len(examples))
        self._observe_update(time.perf_counter() - started, label_ts, consumed, time.time() if now is None else now)

    def _predict_labels(self, examples: list[Example]) -> list:
        predicted = []
        for ex in examples:
            try:
                predicted.append(self.model.predict_one(ex.features))
            except Exception:   # as in learning: a probe the model cannot take counts as a miss
                predicted.append(None)
        return predicted

    def restore(self, state: dict) -> None:
        if "target_range" not in state:   # a snapshot from before the guard: the range is learned again
            state = {**state, "target_range": [math.inf, -math.inf, 0], "rolled_back": 0}
        super().restore(state)
        self.guard = UpdateGuard()

    def _test_then_train_classifier(self, examples: list[Example]) -> None:
        guard, weighted = self.guard, self._takes_weight
        if guard.copy is None:
            self._keep_copy()
        predict, learn = self.model.predict_proba_one, self.model.learn_one
        since, every = guard.since, guard.every
        p_true, p_best, n_classes = [], [], []
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
                self._count_error(ex, err)
                continue
            p_true.append(true)
            p_best.append(best)
            n_classes.append(n)
            since.append(ex)
            if len(since) >= every:
                self._keep_copy()
                predict, learn = self.model.predict_proba_one, self.model.learn_one
                since, every = guard.since, guard.every
        self.learned += len(p_true)
        p = np.asarray(p_true, dtype=float)
        # Correct when the true label has the highest probability; an empty or uniform proba
        # (a model that knows nothing yet) is a miss.
        correct = (p >= np.asarray(p_best, dtype=float)) & (p * np.asarray(n_classes) > 1.0)
        self._scored_classification(correct, p)

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
                self._count_error(ex, err)
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
        self.learned += len(y_true)
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
        self.learned -= len(culprits)
        self.rolled_back += len(culprits)
        log.warning("model %s: undid %d update(s) that made the model's output non-finite or explode",
                    self.name, len(culprits))
        for ex in culprits:
            self._refuse(ex, "NonFiniteUpdate", "learning it made the model's output or state non-finite or "
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

    def _test_then_train_many(self, examples: list[Example]) -> None:
        import pandas as pd

        X = pd.DataFrame.from_records([ex.features for ex in examples])
        y = pd.Series([ex.label for ex in examples])
        try:
            if self.task == "classification":
                proba = self.model.predict_proba_many(X)
                predicted = proba.idxmax(axis=1) if len(proba.columns) else pd.Series([None] * len(y))
                p_true = [row.get(label, 0.0) for row, label in zip(proba.to_dict("records"), y)] \
                    if len(proba.columns) else [0.0] * len(y)
                correct = (predicted.reset_index(drop=True) == y).to_numpy()
            else:
                guess = self.model.predict_many(X)
            self.model.learn_many(X, y)
        except Exception as err:
            self.errors += len(examples) - 1
            self._count_error(examples[0], err, f"micro-batch of {len(examples)} from ")
            return
        self.learned += len(examples)
        if self.task == "classification":
            self._scored_classification(correct, p_true)
        else:
            self._scored_regression(y.to_numpy(), np.asarray(guess, dtype=float))


def _learn_parameters(model) -> set[str]:
    final = model
    steps = getattr(model, "steps", None)
    if steps:
        final = list(steps.values())[-1]
    try:
        return set(inspect.signature(final.learn_one).parameters)
    except (TypeError, ValueError):
        return set()
