"""Builds River estimators from a built-in name or an import path `package.module:factory`.

>>> model = build_model("logreg", task="classification", params={}, seed=1)
>>> model.predict_proba_one({"x": 1.0})
{False: 0.5, True: 0.5}
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from river import forest, linear_model, naive_bayes, preprocessing, tree

from streamlearn.learners.features import StringOneHot


def _logreg(**params):
    return StringOneHot() | preprocessing.StandardScaler() | linear_model.LogisticRegression(**params)


def _scaled_logreg(**params):
    """For all-numeric features: no string encoding step."""
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(**params)


def _softmax(**params):
    return StringOneHot() | preprocessing.StandardScaler() | linear_model.SoftmaxRegression(**params)


def _linreg(**params):
    return StringOneHot() | preprocessing.StandardScaler() | linear_model.LinearRegression(**params)


CLASSIFIERS: dict[str, Callable[..., Any]] = {
    "logreg": _logreg,
    "scaled_logreg": _scaled_logreg,
    "softmax": _softmax,
    "hoeffding_tree": tree.HoeffdingTreeClassifier,
    "hoeffding_adaptive_tree": tree.HoeffdingAdaptiveTreeClassifier,
    "arf": forest.ARFClassifier,
    "naive_bayes": naive_bayes.GaussianNB,
}
REGRESSORS: dict[str, Callable[..., Any]] = {
    "linreg": _linreg,
    "hoeffding_tree_regressor": tree.HoeffdingTreeRegressor,
    "arf_regressor": forest.ARFRegressor,
}

# Built-ins that raise on a string feature (a TypeError inside River's scaler, Gaussian estimators or leaf
# regressions), found by trying each on a string; the others one-hot encode strings or split on them.
NUMERIC_ONLY = frozenset({"scaled_logreg", "naive_bayes", "hoeffding_tree_regressor", "arf_regressor"})


class ModelError(ValueError):
    """A model's settings build no River estimator for the task; `key` is the setting at fault."""

    def __init__(self, message: str, key: str = "model") -> None:
        super().__init__(message)
        self.key = key


def build_model(name: str, task: str, params: dict, seed: int):
    """Returns a fresh estimator; `seed` is passed to factories that take one."""
    factory = _resolve(name, task)
    kwargs = dict(params)
    if "seed" in _parameters(factory) and "seed" not in kwargs:
        kwargs["seed"] = seed
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ModelError(f"{name}: {err}", key="params") from None
    needed = "predict_proba_one" if task == "classification" else "predict_one"
    if not (hasattr(model, "learn_one") and hasattr(model, needed)):
        raise ModelError(f"{name}: {type(model).__name__} has no learn_one/{needed}, not a River {task} estimator")
    return model


def _resolve(name: str, task: str) -> Callable[..., Any]:
    builtins = CLASSIFIERS if task == "classification" else REGRESSORS
    if name in builtins:
        return builtins[name]
    if ":" not in name:
        raise ModelError(f"{name!r} is no built-in {task} model ({', '.join(builtins)}) nor a 'package.module:factory' path")
    return import_factory(name)


def import_factory(name: str) -> Callable[..., Any]:
    """The callable named by "package.module:attribute"; a ModelError naming what failed."""
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"{name}: cannot import: {err}") from None
    if not callable(factory):
        raise ModelError(f"{name}: not callable")
    return factory


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
