"""One extreme feature value cannot poison a model: through the service with the default config (the
decode-time bound `max_abs_feature` refuses it), and with the bound raised out of the way, where the River
update guard undoes the update it poisons."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from streamlearn.config import ModelConfig, parse_config
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example
from streamlearn.service import Service

AFTER = 3000    # examples scored after the extreme one (the rolling window)
BEFORE = 2000


def _events(task: str, extreme: float | None) -> list[dict]:
    rng = random.Random(5)
    out = []
    for i in range(BEFORE + 1 + AFTER):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1)}
        label = x["a"] + x["b"] > 0 if task == "classification" else 3 * x["a"] - 2 * x["b"] + rng.gauss(0, 0.1)
        if i == BEFORE and extreme is not None:
            x["a"] = extreme
        out.append({"id": f"e-{i}", "ts": 1000.0 + i, "model": "m", "features": x, "label": label})
    return out


def _run(tmp: Path, model: dict, extreme: float | None) -> tuple[float, dict]:
    """The rolling score over the AFTER examples after the extreme one, and the model's summary."""
    task = model.get("task", "classification")
    path = tmp / f"events-{extreme}.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in _events(task, extreme)))
    config = parse_config({"source": f"file:{path}", "state_dir": str(tmp / f"state-{extreme}"),
                           "intake": {"mode": "inline"}, "metrics": {"enabled": False},
                           "snapshot": {"enabled": False}, "eval": {"probe_size": 0},
                           "models": {"m": {**model, "window": AFTER}}}, env={})
    service = Service(config)
    summary = service.run()
    service.close()
    learner = service.learners["m"]
    return learner.evaluation.scores.value(learner.evaluation.scores.names[0], rolling=True), summary["models"]["m"]


MODELS = {"logreg": {"model": "logreg"}, "scaled_logreg": {"model": "scaled_logreg"},
          "mlp": {"model": "mlp", "train": {"batch_size": 16}}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_extreme_example_moves_accuracy_less_than_a_point(tmp_path, name):
    clean, _ = _run(tmp_path, MODELS[name], None)
    hit, summary = _run(tmp_path, MODELS[name], 1e12)
    assert clean > 0.9 and abs(hit - clean) < 0.01, (clean, hit, summary)


def test_one_extreme_example_leaves_linreg_mae_within_ten_percent(tmp_path):
    clean, _ = _run(tmp_path, {"model": "linreg", "task": "regression"}, None)
    hit, summary = _run(tmp_path, {"model": "linreg", "task": "regression"}, 1e12)
    assert math.isfinite(hit) and abs(hit - clean) <= 0.1 * clean, (clean, hit, summary)


# --- the guard on its own: the bound raised so that 1e300 reaches the model ------------------------------

@pytest.mark.parametrize("name", ["logreg", "scaled_logreg"])
def test_guard_undoes_the_update_of_a_1e300_feature(tmp_path, name):
    unbounded = {**MODELS[name], "max_abs_feature": 1e308}
    clean, _ = _run(tmp_path, unbounded, None)
    hit, summary = _run(tmp_path, unbounded, 1e300)
    assert abs(hit - clean) < 0.01, (clean, hit, summary)
    assert summary["learn_errors"] == {"NonFiniteUpdate": 1}


def test_guard_keeps_linreg_predictions_finite_after_a_1e300_feature(tmp_path):
    model = {"model": "linreg", "task": "regression", "max_abs_feature": 1e308}
    clean, _ = _run(tmp_path, model, None)
    hit, summary = _run(tmp_path, model, 1e300)
    assert math.isfinite(hit) and abs(hit - clean) <= 0.1 * clean, (clean, hit, summary)
    assert summary["errors"] == 1   # its prediction exploded before learning: refused unlearned


def _example(i: int, x: dict, y) -> Example:
    return Example(f"e-{i}", "m", x, y, 1.0, float(i), float(i))


def test_guard_finds_the_culprit_behind_a_later_nan():
    """A 1e300 value makes the scaler's variance infinite; the output turns NaN only two examples later."""
    learner = RiverLearner("m", ModelConfig(model="scaled_logreg"))
    rng = random.Random(2)
    batch = []
    for i in range(1500):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1)}
        batch.append(_example(i, {**x, "a": 1e300} if i == 1200 else x, x["a"] + x["b"] > 0))
    learner.learn_batch(batch[:1100])
    learner.learn_batch(batch[1100:])
    assert [r.example.id for r in learner.evaluation.take_rejected()] == ["e-1200"]
    assert learner.metrics().rolled_back == 1 and learner.evaluation.learned == 1499 and learner.evaluation.errors == 1
    assert all(math.isfinite(p) for p in learner.model.predict_proba_one({"a": 0.3, "b": -1.0}).values())


def test_guard_drops_a_storm_of_bad_updates_and_keeps_learning():
    """Forty 1e300 values in a row: more culprits than one replay untangles; all are refused, learning goes on."""
    learner = RiverLearner("m", ModelConfig(model="scaled_logreg", window=500))
    rng = random.Random(3)
    rows = []
    for i in range(4000):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1)}
        rows.append(_example(i, {**x, "b": 1e300} if 1500 <= i < 1540 else x, x["a"] + x["b"] > 0))
    for start in range(0, len(rows), 250):
        learner.learn_batch(rows[start:start + 250])
    refused = {r.example.id for r in learner.evaluation.take_rejected()}
    assert {f"e-{i}" for i in range(1500, 1540)} <= refused and learner.evaluation.errors == len(refused)
    assert learner.metrics().rolled_back == len(refused) and learner.evaluation.learned == 4000 - len(refused)
    assert learner.evaluation.scores.value("accuracy", rolling=True) > 0.95
