"""River `learn_mode = "many"`: micro-batches decided by event time alone, snapshots mid-batch, scoring as "one"."""

from __future__ import annotations

import logging
import pickle
import random

import numpy as np
import pytest
from river import datasets

from streamlearn.config import ModelConfig, TrainConfig
from streamlearn.learners.contract import snapshot_of
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example

TRAIN = TrainConfig(batch_size=16, max_wait=5.0)


def stream(n: int = 400, seed: int = 3) -> list[Example]:
    """Phishing examples in event-time order, with irregular gaps (some longer than `max_wait`) and weights."""
    rng = random.Random(seed)
    ts, out = 0.0, []
    for i, (x, y) in enumerate(datasets.Phishing().take(n)):
        ts += rng.choice((0.1, 0.2, 0.5, 1.0, 7.0))
        out.append(Example(f"e-{i}", "m", x, y, rng.choice((1.0, 1.0, 3.0)), ts, ts, 0.0))
    return out


def many(**kwargs) -> RiverLearner:
    config = ModelConfig(model=kwargs.pop("model", "logreg"), learn_mode="many", window=50,
                         train=kwargs.pop("train", TRAIN))
    return RiverLearner("m", config, **kwargs)


def splittings(examples: list[Example], seed: int) -> list[list[Example]]:
    """The examples cut into pieces of random sizes, as the intake's wall-clock batches would be."""
    rng, pieces, start = random.Random(seed), [], 0
    while start < len(examples):
        end = start + rng.randint(1, 40)
        pieces.append(examples[start:end])
        start = end
    return pieces


def fingerprint(learner: RiverLearner, probes: list[Example]) -> tuple:
    """What must match exactly: the model's outputs on probes, its weights, the scores and counters."""
    outputs = [sorted(learner.model.predict_proba_one(ex.features).items()) for ex in probes]
    weights = sorted(learner.model["LogisticRegression"].weights.items())
    return (outputs, weights, learner.evaluation.scores.values(), learner.evaluation.learned, learner.evaluation.errors,
            learner.evaluation.drift.detected, [ex.id for ex in learner.queue.examples])


def test_the_same_examples_in_any_splitting_give_the_same_model():
    examples, probes = stream(), stream(60, seed=9)
    results = []
    for cut in (None, 0, 1, 2):
        learner = many()
        learner.evaluation.mark_score_at(examples[100].ts)   # a score read while a micro-batch waits (settle)
        for piece in ([[ex] for ex in examples] if cut is None else splittings(examples, cut)):
            learner.learn_batch(piece, now=1e6)
        learner.flush(now=1e6)
        results.append((fingerprint(learner, probes), learner.evaluation.score_at(examples[100].ts)))
    assert all(result == results[0] for result in results[1:])
    assert results[0][0][3] == len(examples) and not np.isnan(results[0][1])


def test_partial_micro_batch_is_learned_before_an_example_too_late_for_it():
    learner = many(train=TrainConfig(batch_size=100, max_wait=5.0))
    at = [Example(f"{i}", "m", {"x": float(i)}, i % 2 == 0, 1.0, ts, ts) for i, ts in enumerate((0, 1, 5, 5.5, 9))]
    learner.learn_batch(at[:3])
    assert (learner.evaluation.learned, len(learner.queue.examples)) == (0, 3)   # 5 - 0 is not more than max_wait
    learner.learn_batch(at[3:])
    assert (learner.evaluation.learned, [ex.id for ex in learner.queue.examples]) == (3, ["3", "4"])
    learner.flush()
    assert (learner.evaluation.learned, learner.queue.examples, learner.evaluation.scores.count) == (5, [], 5)


def test_a_full_micro_batch_is_learned_at_batch_size():
    learner = many(train=TrainConfig(batch_size=4, max_wait=100.0))
    learner.learn_batch(stream(10))
    assert (learner.evaluation.learned, len(learner.queue.examples)) == (8, 2)


@pytest.mark.parametrize("at", [37, 100, 215])   # mid partial micro-batch
def test_snapshot_mid_micro_batch_continues_as_if_never_stopped(at):
    examples, probes = stream(), stream(60, seed=9)
    straight = many()
    for piece in splittings(examples, 5):
        straight.learn_batch(piece, now=1e6)
    straight.flush(now=1e6)

    first = many()
    for piece in splittings(examples[:at], 6):
        first.learn_batch(piece, now=1e6)
    assert first.queue.examples, "the snapshot must hold a waiting micro-batch"
    snapshot = first.snapshot()   # immutable: pickled at once
    del first
    restored = many()
    restored.restore(snapshot)
    for piece in splittings(examples[at:], 7):
        restored.learn_batch(piece, now=1e6)
    restored.flush(now=1e6)
    assert fingerprint(restored, probes) == fingerprint(straight, probes)


def test_a_snapshot_from_before_the_queue_restores_with_an_empty_one():
    learner = many()
    learner.learn_batch(stream(40))
    old = {k: v for k, v in pickle.loads(learner.snapshot().state).items() if k != "queue"}
    restored = many()
    restored.restore(snapshot_of("", old))   # as a learners.pkl entry from before LearnerSnapshot is read
    assert restored.queue.examples == [] and restored.evaluation.learned == learner.evaluation.learned
    restored.learn_batch(stream(80)[40:])
    restored.flush()
    assert restored.evaluation.learned + len(learner.queue.examples) == 80


@pytest.mark.parametrize("mode", ["one", "many"])
def test_a_model_that_knows_nothing_scores_a_miss(mode):
    for model in ("logreg", "naive_bayes"):   # uniform proba; empty proba
        learner = RiverLearner("m", ModelConfig(model=model, learn_mode=mode))
        learner.learn_batch([Example("a", "m", {"x": 1.0}, False, 1.0, 0.0, 0.0)])
        learner.flush()
        assert (learner.evaluation.learned, learner.evaluation.scores.count) == (1, 1)
        assert learner.evaluation.scores.value("accuracy", rolling=False) == 0.0


@pytest.mark.parametrize("mode", ["one", "many"])
def test_ties_score_alike_in_both_modes(mode):
    """Two classes tie above a third: the true label among the tied ones is a hit, whatever its column."""
    hits = []
    for label in ("a", "b", "c"):
        learner = RiverLearner("m", ModelConfig(model="naive_bayes", learn_mode=mode))
        for y, xs in (("a", (0.0, 1.0, 2.0)), ("b", (0.0, 1.0, 2.0)), ("c", (9.0, 10.0, 11.0))):
            for x in xs:
                learner.model.learn_one({"x": x}, y)
        proba = learner.model.predict_proba_one({"x": 0.5})
        assert proba["a"] == proba["b"] > proba["c"]
        learner.learn_batch([Example("t", "m", {"x": 0.5}, label, 1.0, 0.0, 0.0)])
        learner.flush()
        hits.append(learner.evaluation.scores.value("accuracy", rolling=False))
    assert hits == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("model", ["logreg", "scaled_logreg", "naive_bayes"])   # every built-in with learn_many
def test_many_scores_each_example_as_one_does(model):
    """The same model state scores the same examples alike in both modes (hits and log loss)."""
    examples = stream(60)
    one = RiverLearner("m", ModelConfig(model=model))
    batch = many(model=model, train=TrainConfig(batch_size=60, max_wait=1e9))
    for ex in stream(200, seed=4)[100:]:   # the same trained model in both
        one.model.learn_one(ex.features, ex.label)
        batch.model.learn_one(ex.features, ex.label)
    scored = []
    for learner in (one, batch):
        before = pickle.dumps(learner.model)
        for ex in examples:   # scored without learning: each alone, so "one" sees the same model
            learner.model = pickle.loads(before)
            learner.learn_batch([ex])
            learner.flush()
        scored.append(learner.evaluation.scores.values())
    assert scored[0]["accuracy"] == scored[1]["accuracy"]
    assert scored[0]["log_loss"] == pytest.approx(scored[1]["log_loss"], rel=1e-9)


def test_weights_reach_learn_many():
    x = {"a": 1.0}
    heavy, light = many(), many()
    heavy.learn_batch([Example("1", "m", x, True, 5.0, 0, 0), Example("2", "m", x, True, 1.0, 0, 0)])
    light.learn_batch([Example("1", "m", x, True, 1.0, 0, 0), Example("2", "m", x, True, 1.0, 0, 0)])
    heavy.flush()
    light.flush()
    assert heavy.model.predict_proba_one(x)[True] > light.model.predict_proba_one(x)[True] > 0.5


def test_a_model_whose_learn_many_takes_no_weights_says_so_once(caplog):
    caplog.set_level(logging.INFO)
    learner = many(model="naive_bayes")
    learner.learn_batch([Example(f"{i}", "m", {"x": float(i)}, i % 2, 2.0, i, i) for i in range(40)])
    learner.flush()
    assert learner.evaluation.learned == 40 and learner.evaluation.errors == 0
    assert caplog.text.count("takes no sample weights in learn_many") == 1


def test_a_micro_batch_that_raises_refuses_each_of_its_examples():
    learner = many(model="scaled_logreg", train=TrainConfig(batch_size=8, max_wait=100.0))
    examples = stream(24)
    bad = Example("bad", "m", {**examples[10].features, "empty_server_form_handler": "oops"}, True, 1.0,
                  examples[10].ts, examples[10].ts)
    learner.learn_batch(examples[:10] + [bad] + examples[11:])
    learner.flush()
    rejected = learner.evaluation.take_rejected()
    assert [r.example.id for r in rejected] == [ex.id for ex in (examples[:10] + [bad] + examples[11:])[8:16]]
    assert {r.error for r in rejected} == {"ValueError"}   # pandas, converting the frame
    ev = learner.evaluation
    assert (ev.learned, ev.errors, ev.error_counts) == (16, 8, {"ValueError": 8})
    assert learner.evaluation.scores.count == 16   # the refused ones are not scored either


def test_a_bad_regression_target_is_refused_alone():
    learner = RiverLearner("p", ModelConfig(model="linreg", task="regression", learn_mode="many",
                                            train=TrainConfig(batch_size=4, max_wait=100.0)))
    examples = [Example(f"{i}", "p", {"x": float(i)}, 2.0 * i, 1.0, i, i) for i in range(8)]
    examples[5] = Example("5", "p", {"x": 5.0}, float("inf"), 1.0, 5, 5)
    learner.learn_batch(examples)
    learner.flush()
    ev = learner.evaluation
    assert (ev.learned, ev.errors, [r.example.id for r in ev.take_rejected()]) == (7, 1, ["5"])


def test_an_absent_feature_does_not_poison_a_scaled_model():
    learner = many(model="scaled_logreg", train=TrainConfig(batch_size=10, max_wait=100.0))
    examples = [Example(f"{i}", "m", {"x": float(i % 2), **({"z": 1.0} if i % 3 else {})}, i % 2 == 1, 1.0, i, i)
                for i in range(100)]
    learner.learn_batch(examples)
    learner.flush()
    proba = learner.model.predict_proba_one({"x": 1.0, "z": 1.0})
    assert all(np.isfinite(list(proba.values()))) and proba[True] > 0.5
    assert learner.evaluation.scores.value("accuracy", rolling=True) > 0.8


def test_many_scores_a_regression_as_one_does():
    """linreg: the same model state gives the same errors in both modes."""
    rows = [Example(f"{i}", "p", {"x": float(i % 7), "z": float(i % 3)}, 2.0 * (i % 7) - (i % 3), 1.0, i, i)
            for i in range(120)]
    one = RiverLearner("p", ModelConfig(model="linreg", task="regression"))
    batch = RiverLearner("p", ModelConfig(model="linreg", task="regression", learn_mode="many",
                                          train=TrainConfig(batch_size=60, max_wait=1e9)))
    for ex in rows[:80]:   # the same trained model in both
        one.model.learn_one(ex.features, ex.label)
        batch.model.learn_one(ex.features, ex.label)
    scored = []
    for learner in (one, batch):
        before = pickle.dumps(learner.model)
        for ex in rows[80:]:
            learner.model = pickle.loads(before)
            learner.learn_batch([ex])
            learner.flush()
        scored.append(learner.evaluation.scores.values())
    assert scored[0]["mae"] > 0 and scored[0] == pytest.approx(scored[1], rel=1e-9)
