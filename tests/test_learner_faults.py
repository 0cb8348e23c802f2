"""Learner faults are isolated: a refused example is counted by class, quarantined as `learn_error`, and
learning goes on; `on_error = "fail"` stops at the last durable state; a model that refuses most of its
examples fails /readyz with the feature and the fix."""

from __future__ import annotations

import base64
import json
import logging
import pickle
import random
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from river import linear_model

from streamlearn.config import ModelConfig, parse_config
from streamlearn.learners.contract import snapshot_of
from streamlearn.learners.evaluation import ERROR_LABELS
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example
from streamlearn.service import LearnFailure, Service

ROOT = Path(__file__).resolve().parent.parent


class Picky:
    """A user's River classifier that raises in scoring or learning on marked examples (and returns junk once)."""

    def __init__(self) -> None:
        self.inner = linear_model.LogisticRegression()

    def predict_proba_one(self, x):
        if x.get("bad_predict"):
            raise RuntimeError("cannot score this one")
        if x.get("junk"):
            return None   # not a dict: scoring it must not crash the loop either
        return self.inner.predict_proba_one(x)

    def learn_one(self, x, y):
        if x.get("bad_learn"):
            raise KeyError("cannot learn this one")
        self.inner.learn_one(x, y)


def picky():
    return Picky()


def _examples(n: int, model: str = "m", bad: dict[int, dict] = {}, string_feature: bool = False) -> list[dict]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1)}
        label = x["a"] + x["b"] > 0
        x.update(bad.get(i, {}))
        if string_feature:
            x["country"] = rng.choice(["DE", "FR"])
        out.append({"id": f"e-{i}", "ts": 1000.0 + i, "model": model, "features": x, "label": label})
    return out


def _config(tmp: Path, events: list[dict], models: dict, **extra) -> tuple:
    path = tmp / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    raw = {"source": f"file:{path}", "state_dir": str(tmp / "state"), "intake": {"mode": "inline"},
           "metrics": {"enabled": False}, "eval": {"probe_size": 0}, "models": models, **extra}
    return parse_config(raw, env={}), path


def _samples(service: Service, family: str) -> dict[tuple, float]:
    text = generate_latest(service.registry).decode()
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples if s.name.endswith("_total")}


def _dead_letters(path: Path) -> list[dict]:
    dlq = Path(f"{path}.dlq.jsonl")
    return [json.loads(line) for line in dlq.read_text().splitlines()] if dlq.exists() else []


def test_a_users_model_that_raises_is_counted_quarantined_and_learning_goes_on(tmp_path):
    bad = {10: {"bad_predict": 1}, 20: {"bad_learn": 1}, 30: {"junk": 1}, 40: {"bad_learn": 1}}
    config, path = _config(tmp_path, _examples(300, bad=bad), {"m": {"model": "tests.test_learner_faults:picky"}})
    service = Service(config)
    summary = service.run()
    service.close()
    model = summary["models"]["m"]
    assert model["errors"] == 4 and model["learned"] == 296
    assert model["learn_errors"] == {"RuntimeError": 1, "KeyError": 2, "AttributeError": 1}
    letters = [d for d in _dead_letters(path) if d["reason"] == "learn_error"]
    assert sorted(json.loads(base64.b64decode(d["raw_b64"]))["id"] for d in letters) == ["e-10", "e-20", "e-30", "e-40"]
    assert "RuntimeError: cannot score this one" in json.dumps(letters)
    errors = _samples(service, "streamlearn_learn_errors")
    assert errors[(("error", "KeyError"), ("model", "m"))] == 2
    assert errors[(("error", "RuntimeError"), ("model", "m"))] == 1
    dead = _samples(service, "streamlearn_dead_letters")
    assert dead[(("reason", "learn_error"), ("topic", config.kafka.examples_topic))] == 4


def test_error_labels_are_bounded_and_counts_survive_a_restore():
    learner = RiverLearner("m", ModelConfig(model="logreg"))
    kinds = [type(f"Error{i}", (Exception,), {}) for i in range(ERROR_LABELS + 5)]
    for i, kind in enumerate(kinds):
        learner.evaluation.count_error(Example(f"e-{i}", "m", {"x": 1.0}, True, 1.0, i, i), kind("no"))
    counted = learner.evaluation
    assert len(counted.error_counts) == ERROR_LABELS + 1 and counted.error_counts["other"] == 5
    assert sum(counted.error_counts.values()) == counted.errors == len(counted.take_rejected())
    assert counted.take_rejected() == []
    again = RiverLearner("m", ModelConfig(model="logreg"))
    again.restore(learner.snapshot())
    assert again.evaluation.error_counts == counted.error_counts and again.evaluation.errors == counted.errors
    state = pickle.loads(learner.snapshot().state)
    old = {k: v for k, v in state.items() if k not in ("error_counts", "target_range", "rolled_back")}
    again.restore(snapshot_of("", old))   # a snapshot written before errors were counted by class
    assert again.evaluation.error_counts == {"other": counted.errors}


def test_a_model_that_refuses_most_examples_is_not_ready_and_says_why(tmp_path, caplog):
    config, _ = _config(tmp_path, _examples(400, string_feature=True), {"m": {"model": "scaled_logreg"}},
                        snapshot={"enabled": False})
    with caplog.at_level(logging.WARNING, logger="streamlearn"):
        service = Service(config)
        summary = service.run()
        service.close()
    assert summary["models"]["m"]["learned"] == 0 and summary["models"]["m"]["learn_errors"] == {"TypeError": 400}
    starts = [r.message for r in caplog.records if "takes numbers only" in r.message]
    assert len(starts) == 1 and 'model = "logreg"' in starts[0]
    expected = ('model "m" (scaled_logreg) refuses 100% of its examples: string feature "country"; '
                'use model = "logreg" (one-hot encodes strings) or send numbers')
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == [expected]   # once, not per example
    ready, reason = service.ready()
    assert not ready and reason == expected


def test_a_healthy_model_stays_ready(tmp_path):
    config, _ = _config(tmp_path, _examples(400, bad={5: {"bad_learn": 1}}),
                        {"m": {"model": "tests.test_learner_faults:picky"}}, snapshot={"enabled": False})
    service = Service(config)
    service.run()
    service.close()
    assert service._unhealthy_models() == [] and service.ready() == (True, "ok")


def test_on_error_fail_stops_at_the_last_durable_snapshot(tmp_path):
    models = {"m": {"model": "tests.test_learner_faults:picky", "on_error": "fail"}}
    config, path = _config(tmp_path, _examples(3000, bad={2500: {"bad_learn": 1}}), models,
                           snapshot={"every_examples": 1000, "every_seconds": 0.0},
                           intake={"mode": "inline", "batch_size": 100})
    service = Service(config)
    with pytest.raises(LearnFailure) as failure:
        service.run()
    service.close()
    message = str(failure.value)
    assert "\n" not in message and 'model "m"' in message and '"e-2500"' in message
    assert "KeyError" in message and 'models.m.on_error = "fail"' in message
    store = service.snapshots.store
    newest = store.latest_seq()
    assert f"snapshot {newest}" in message
    [(seq, snapshot)] = list(store.newest_valid())[:1]
    assert snapshot.manifest.meta["learned"] <= 2500, "no snapshot includes the failing example"
    offset = snapshot.manifest.offsets[f"file:{path}"]
    assert 0 < offset <= 2500 and not [d for d in _dead_letters(path) if d["reason"] == "learn_error"]
    resumed = Service(config)   # a restart begins where the snapshot ended, and fails on the same example
    assert resumed.restored_from == newest
    with pytest.raises(LearnFailure, match='"e-2500"'):
        resumed.run()
    resumed.close()


def test_cli_reports_on_error_fail_in_one_line(tmp_path):
    events = _examples(200, bad={150: {"bad_predict": 1}})
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    toml = tmp_path / "config.toml"
    toml.write_text(f'source = "file:{path}"\nstate_dir = "{tmp_path / "state"}"\n[intake]\nmode = "inline"\n'
                    f'[metrics]\nenabled = false\n[models.m]\nmodel = "tests.test_learner_faults:picky"\n'
                    f'on_error = "fail"\n')
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "streamlearn"), "run", "--config", str(toml)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT),
                                                                               "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('model "m" refused example "e-150": RuntimeError: cannot score this one'), last
    assert 'models.m.on_error = "fail"' in last and "Traceback" not in result.stderr
