"""The learner contract (`streamlearn/learners/contract.py`): twelve members, one way to build every kind, and
snapshots written before `LearnerSnapshot` still restore."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest
import safetensors.numpy

from streamlearn.checkpoints.content import INTAKE, LEARNERS, SERVICE, TENSORS, ServiceFigures, unpack
from streamlearn.checkpoints.store import Manifest, Snapshot
from streamlearn.config import Config, EvalConfig, ModelConfig, TrainConfig
from streamlearn.learners.checks import assert_same, fingerprint, make_stream
from streamlearn.learners.contract import Learner, LearnerSnapshot, build_learner
from streamlearn.learners.evaluation import ModelEvaluation

CONTRACT = {"name", "kind", "task", "evaluation", "learn_batch", "predict_many", "flush", "snapshot", "restore",
            "export", "metrics", "parameters"}
MODELS = {"river": ModelConfig(model="logreg", learn_mode="many", window=50, train=TrainConfig(batch_size=8)),
          "torch": ModelConfig(model="mlp", params={"hidden": [8]}, window=50, train=TrainConfig(batch_size=8))}


def public_members(protocol: type) -> set[str]:
    declared = set(getattr(protocol, "__annotations__", {})) | set(vars(protocol))
    return {name for name in declared if not name.startswith("_")}


def test_the_contract_has_twelve_public_members():
    assert public_members(Learner) == CONTRACT
    assert len(CONTRACT) <= 12


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_kind_is_built_the_same_way_and_shows_the_contract(kind):
    config = Config(seed=3, eval=EvalConfig(segment_size=40, probe_size=4, every=20), torch_threads=0)
    learner = build_learner("m", MODELS[kind], config)
    assert isinstance(learner, Learner) and learner.kind == kind and learner.task == "classification"
    assert isinstance(learner.evaluation, ModelEvaluation) and learner.evaluation.probes is not None
    twin = type(learner)("m", MODELS[kind], 3, drift=config.drift, evaluation=config.eval, threads=0)
    stream = make_stream("classification", 80)
    for each in (learner, twin):
        each.learn_batch(stream, now=1e9)
        each.flush(now=1e9)
    assert_same(fingerprint(learner, stream[::5]), fingerprint(twin, stream[::5]), "build_learner vs the class",
                exact=True)
    assert learner.export().kind == kind and learner.export().files
    assert learner.metrics().model_label == MODELS[kind].model
    assert learner.parameters().parameters is not None   # both built-in kinds here are averageable


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_snapshot_written_before_learner_snapshot_restores(kind):
    """`learners.pkl` as earlier versions wrote it (each learner's state dict, its arrays in safetensors)."""
    stream = make_stream("classification", 90)
    learner = build_learner("m", MODELS[kind], seed=5)
    learner.learn_batch(stream[:45], now=1e9)   # a partial micro-batch stays queued
    snapshot = learner.snapshot()
    tensors = {f"m/{k}": np.ascontiguousarray(v) for k, v in snapshot.tensors.items()}
    files = {LEARNERS: pickle.dumps({"m": pickle.loads(snapshot.state)}), INTAKE: b"",
             SERVICE: msgspec.json.encode(ServiceFigures(45, 0.0))}
    if tensors:
        files[TENSORS] = safetensors.numpy.save(tensors)
    old = unpack(Snapshot(Manifest(1, None, 0.0, "", {}, []), files)).learners["m"]
    assert old.kind == ""   # unknown: the older format did not say
    restored = build_learner("m", MODELS[kind], seed=99)   # another seed: everything comes from the snapshot
    restored.restore(old)
    assert_same(fingerprint(learner, stream[::5]), fingerprint(restored, stream[::5]), "old format", exact=True)
    for each in (learner, restored):
        each.learn_batch(stream[45:], now=1e9)
        each.flush(now=1e9)
    assert_same(fingerprint(learner, stream[::5]), fingerprint(restored, stream[::5]), "old format, continued",
                exact=True)


def test_a_snapshot_of_another_kind_is_refused_with_a_reason():
    river = build_learner("m", MODELS["river"])
    torch_snapshot = build_learner("m", MODELS["torch"]).snapshot()
    with pytest.raises(ValueError, match="river learner; the snapshot is of a torch one"):
        river.restore(torch_snapshot)
    assert isinstance(torch_snapshot, LearnerSnapshot)
    with pytest.raises(ValueError):
        next(iter(torch_snapshot.tensors.values()))[0] = 1.0   # read-only
    with pytest.raises(TypeError):
        torch_snapshot.tensors["flat"] = np.zeros(1)   # a read-only mapping too


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_parameters_of_an_averageable_kind_round_trip_without_changing_predictions(kind):
    learner = build_learner("m", MODELS[kind], Config(seed=3, torch_threads=0))
    stream = make_stream("classification", 64, seed=5)
    learner.learn_batch(stream)
    learner.flush()
    rows = [ex.features for ex in stream[:16]]
    before = learner.predict_many(rows)
    params, reason = learner.parameters()
    assert params is not None and reason == ""
    params.set(params.get(weight=1.0))
    assert learner.predict_many(rows) == before


def test_a_tree_says_why_its_parameters_cannot_be_averaged():
    params, reason = build_learner("m", ModelConfig(model="hoeffding_tree"), Config()).parameters()
    assert params is None and "tree" in reason
