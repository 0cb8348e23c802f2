"""Test-then-train over a River estimator, per example or in `learn_many` micro-batches.

Each example is scored by the current model before the model learns from it,
so the prequential scores measure what serving would have seen.

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
import time
from typing import Optional

import numpy as np

from streamlearn.config import DriftConfig, EvalConfig
from streamlearn.learners.base import Learner
from streamlearn.learners.models import ModelError, build_model
from streamlearn.records import Example

log = logging.getLogger(__name__)


class RiverLearner(Learner):
    """One named River estimator with its prequential scores and learning counters."""

    STATE = Learner.STATE + ("model",)

    def __init__(self, name: str, model: str = "logreg", task: str = "classification",
                 learn_mode: str = "one", window: int = 1000, params: Optional[dict] = None,
                 seed: int = 42, drift: Optional[DriftConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        super().__init__(name, task, window, drift, evaluation, seed)
        self.model = build_model(model, task, params or {}, seed)
        self.learn_mode = learn_mode
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

    def _test_then_train_classifier(self, examples: list[Example]) -> None:
        predict, learn, weighted = self.model.predict_proba_one, self.model.learn_one, self._takes_weight
        p_true, p_best, n_classes = [], [], []
        for ex in examples:
            x, y = ex.features, ex.label
            try:
                proba = predict(x)
                if weighted and ex.weight != 1.0:
                    learn(x, y, w=ex.weight)
                else:
                    learn(x, y)
            except Exception as err:  # one bad example must not stop the service
                self._count_error(ex, err)
                continue
            p_true.append(proba.get(y, 0.0))
            p_best.append(max(proba.values()) if proba else 1.0)
            n_classes.append(len(proba))
        self.learned += len(p_true)
        p = np.asarray(p_true)
        # Correct when the true label has the highest probability; an empty or uniform proba
        # (a model that knows nothing yet) is a miss.
        correct = (p >= np.asarray(p_best)) & (p * np.asarray(n_classes) > 1.0)
        self._scored_classification(correct, p)

    def _test_then_train_regressor(self, examples: list[Example]) -> None:
        predict, learn = self.model.predict_one, self.model.learn_one
        y_true, y_pred = [], []
        for ex in examples:
            x, y = ex.features, ex.label
            try:
                guess = predict(x)
                if ex.weight != 1.0 and self._takes_weight:
                    learn(x, y, w=ex.weight)
                else:
                    learn(x, y)
            except Exception as err:
                self._count_error(ex, err)
                continue
            y_true.append(y)
            y_pred.append(guess if guess is not None else 0.0)
        self.learned += len(y_true)
        self._scored_regression(y_true, y_pred)

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
