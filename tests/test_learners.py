"""River learners: test-then-train, prequential scores, learn_many, failure handling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from river import datasets, linear_model, preprocessing

from streamlearn.config import ModelConfig, TrainConfig
from streamlearn.learners.features import StringOneHot
from streamlearn.learners.models import build_model
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.learners.scores import PrequentialScores, RollingMean
from streamlearn.records import Example
from streamlearn.telemetry.histogram import Histogram


def phishing_examples(n: int = 600) -> list[Example]:
    return [Example(f"e-{i}", "m", x, y, 1.0, float(i), float(i))
            for i, (x, y) in enumerate(datasets.Phishing().take(n))]


def test_scores_match_a_hand_written_prequential_loop():
    examples = phishing_examples()
    learner = RiverLearner("m", ModelConfig(model="scaled_logreg", window=100))
    for start in range(0, len(examples), 64):  # batch boundaries must not matter
        learner.learn_batch(examples[start:start + 64])

    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    hits, losses = [], []
    for ex in examples:
        proba = model.predict_proba_one(ex.features)
        p = proba.get(ex.label, 0.0)
        hits.append(p > 0.5 if len(proba) == 2 else False)
        losses.append(-math.log(max(p, 1e-15)))
        model.learn_one(ex.features, ex.label)

    assert learner.evaluation.learned == len(examples)
    assert learner.evaluation.scores.value("accuracy", rolling=False) == pytest.approx(np.mean(hits))
    assert learner.evaluation.scores.value("accuracy", rolling=True) == pytest.approx(np.mean(hits[-100:]))
    assert learner.evaluation.scores.value("log_loss", rolling=False) == pytest.approx(np.mean(losses))
    assert learner.evaluation.scores.value("accuracy", rolling=False) > 0.85


def test_a_model_that_knows_nothing_scores_a_miss():
    learner = RiverLearner("m", ModelConfig(model="logreg"))
    learner.learn_batch([Example("a", "m", {"x": 1.0}, True, 1.0, 0.0, 0.0)])
    assert learner.evaluation.scores.value("accuracy", rolling=False) == 0.0


def test_a_failing_example_is_counted_and_the_rest_are_learned(caplog):
    learner = RiverLearner("m", ModelConfig(model="scaled_logreg"))  # no string encoding: a string feature fails
    good = phishing_examples(20)
    bad = Example("bad", "m", {"empty_server_form_handler": "oops"}, True, 1.0, 0.0, 0.0)
    learner.learn_batch(good[:10] + [bad] + good[10:])
    assert (learner.evaluation.learned, learner.evaluation.errors) == (20, 1)
    assert "example bad not learned" in caplog.text


def test_weights_reach_models_that_take_them():
    heavy = RiverLearner("m", ModelConfig(model="logreg"))
    light = RiverLearner("m", ModelConfig(model="logreg"))
    x = {"a": 1.0}
    heavy.learn_batch([Example("1", "m", x, True, 5.0, 0, 0)])
    light.learn_batch([Example("1", "m", x, True, 1.0, 0, 0)])
    assert heavy.model.predict_proba_one(x)[True] > light.model.predict_proba_one(x)[True] > 0.5


def test_regression_scores_mae_and_rmse():
    learner = RiverLearner("p", ModelConfig(model="linreg", task="regression", window=10))
    examples = [Example(f"{i}", "p", {"x": float(i % 7)}, 2.0 * (i % 7) + 1, 1.0, i, i) for i in range(500)]
    learner.learn_batch(examples)
    assert learner.evaluation.learned == 500
    assert learner.evaluation.scores.value("mae", rolling=True) < 0.5
    scores = learner.evaluation.scores
    assert scores.value("rmse", rolling=False) >= scores.value("mae", rolling=False)


def test_learn_many_micro_batches():
    examples = phishing_examples(1200)
    learner = RiverLearner("m", ModelConfig(model="scaled_logreg", learn_mode="many", window=200,
                                            train=TrainConfig(batch_size=100, max_wait=3600.0)))
    for start in range(0, len(examples), 70):   # the micro-batches are the learner's, not the caller's
        learner.learn_batch(examples[start:start + 70])
    assert learner.evaluation.learned == 1200
    assert learner.evaluation.scores.count == 1200
    assert learner.evaluation.scores.value("accuracy", rolling=True) > 0.8


def test_marked_scores_do_not_depend_on_batch_boundaries():
    examples = phishing_examples(300)
    reference = RiverLearner("m", ModelConfig(model="scaled_logreg", window=50))
    reference.learn_batch(examples[:150])  # examples 0..149 have ts <= 149
    expected = reference.evaluation.scores.value("accuracy", rolling=True)
    for size in (7, 100, 300):
        learner = RiverLearner("m", ModelConfig(model="scaled_logreg", window=50))
        learner.evaluation.mark_score_at(149.0)
        learner.evaluation.mark_score_at(149.5)
        for start in range(0, 300, size):
            learner.learn_batch(examples[start:start + size])
        assert learner.evaluation.score_at(149.0) == learner.evaluation.score_at(149.5) == expected
        assert learner.evaluation.learned == 300
    assert math.isnan(learner.evaluation.score_at(10.0))  # never marked


def test_import_path_factories_get_the_seed():
    model = build_model("river.forest:ARFClassifier", "classification", {"n_models": 3}, seed=5)
    assert (model.n_models, model.seed) == (3, 5)


def test_string_one_hot_agrees_with_itself_on_frames():
    rows = [{"a": 1.0, "c": "x"}, {"a": 2.0, "c": "y"}, {"c": "x"}]
    frame = StringOneHot().transform_many(pd.DataFrame(rows))
    for row, (_, encoded) in zip(rows, frame.iterrows()):
        one = StringOneHot().transform_one(row)
        assert {k: v for k, v in encoded.items() if v} == {k: v for k, v in one.items() if v}


def test_rolling_mean_wraps_around():
    ring = RollingMean(3)
    ring.extend(np.array([1.0, 2.0]))
    ring.extend(np.array([3.0, 4.0]))
    assert ring.mean() == 3.0
    ring.extend(np.arange(10.0))
    assert ring.mean() == 8.0


def test_scores_before_anything_are_nan():
    assert math.isnan(PrequentialScores("regression", 5).value("rmse", rolling=True))


def test_histogram_quantiles_interpolate_within_buckets():
    h = Histogram((0.01, 0.1, 1.0))
    h.observe_many(np.full(90, 0.005))
    h.observe_many(np.full(10, 0.5))
    assert h.quantile(0.5) == pytest.approx(0.01 * 50 / 90)
    assert 0.1 < h.quantile(0.99) <= 1.0
    assert Histogram.from_state(h.state()).counts == h.counts
