"""The drift policy tells a real concept change from new classes and from a burst that ends, and acts on each.

Streams made here: three uniform features, the label a bucket of x1 + x2; a real change rotates
the labels (the same inputs now mean the next class) for good; a burst rotates them for a while.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from streamlearn.config import ConfigError, ModelConfig, parse_config
from streamlearn.learners.plasticity import KINDS, DriftPolicy
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.learners.torch_learner import TorchLearner
from streamlearn.records import Example

CHANGE = 3000
POLICY = {"confirm_seconds": 10.0}   # 500 examples at 50 a second; the default (60 s) is longer than these streams


def stream(n: int = 5000, rotate=(CHANGE, 10 ** 9), classes: int = 2, seed: int = 0, rate: float = 50.0,
           offset: int = 0) -> list[Example]:
    """Labels of examples in `rotate` (first, end) are the next class of the concept's (labels offset by `offset`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x = [rng.random() for _ in range(3)]
        y = min(int((x[0] + x[1]) / 2 * classes), classes - 1)
        if rotate[0] <= i < rotate[1]:
            y = (y + 1) % classes
        ts = 1_700_000_000.0 + i / rate
        out.append(Example(f"e-{i}", "m", {"x1": x[0], "x2": x[1], "x3": x[2]}, y + offset, 1.0, ts, ts))
    return out


def torch_learner(policy: dict = POLICY, seed: int = 3, **model) -> TorchLearner:
    config = parse_config({"drift": {"policy": policy},
                           "models": {"m": {"model": "mlp", "params": {"hidden": [16]}, **model}}}, env={})
    return TorchLearner("m", config.models["m"], seed=seed, drift=config.drift)


def river_learner(policy: dict = POLICY) -> RiverLearner:
    config = parse_config({"drift": {"policy": policy}}, env={})
    return RiverLearner("m", ModelConfig(model="logreg"), drift=config.drift)


def learn(learner, examples: list[Example], size: int = 250) -> None:
    for start in range(0, len(examples), size):
        learner.learn_batch(examples[start:start + size], now=0.0)


def done(learner) -> set[tuple[str, str]]:
    return set(learner.evaluation.policy.counts)


def test_a_real_change_is_confirmed_and_the_torch_model_follows_it():
    learner = torch_learner()
    learn(learner, stream())
    change = learner.evaluation.policy.last_change
    assert change is not None and CHANGE < change.position < CHANGE + 300, learner.evaluation.policy.changes
    assert change.ts == stream()[change.position - 1].ts and change.confirmed_position >= change.position + 1000
    assert {("change", "suspect"), ("change", "release_ewc"), ("change", "expire_replay"),
            ("change", "raise_lr"), ("change", "reset_optimizer")} <= done(learner)
    assert not learner.ewc.active or learner.ewc.consolidations   # released (re-consolidated later at most)
    rows = learner.replay.store
    assert (rows.ts[:rows.size] >= change.ts).all()             # rows of the old concept are gone
    assert learner.evaluation.scores.value("accuracy", rolling=True) > 0.85
    assert all(a.kind in KINDS for a in learner.evaluation.policy.actions)


def test_without_the_policy_the_torch_model_keeps_the_old_concept():
    learner = torch_learner({"enabled": False})
    learn(learner, stream())
    assert learner.evaluation.policy.last_change is None and not learner.evaluation.policy.counts
    assert learner.evaluation.scores.value("accuracy", rolling=True) < 0.5


def test_a_real_change_resets_the_river_model_and_is_confirmed():
    learner = river_learner()
    learn(learner, stream())
    assert learner.evaluation.policy.last_change is not None
    assert ("change", "reset_model") in done(learner) and ("change", "confirm") in done(learner)
    assert learner.evaluation.scores.value("accuracy", rolling=True) > 0.9


@pytest.mark.parametrize("make", [torch_learner, river_learner], ids=["torch", "river"])
def test_a_burst_that_ends_is_not_taken_for_a_change(make):
    learner = make()
    learn(learner, stream(rotate=(CHANGE, CHANGE + 500)))
    assert learner.evaluation.policy.changes == []
    assert ("burst", "restore") in done(learner) and ("burst", "dismiss") in done(learner)
    assert learner.evaluation.policy.case is None
    assert learner.evaluation.scores.value("accuracy", rolling=True) > 0.9   # back to the old concept's weights


def test_new_classes_keep_what_was_learned():
    """Classes 2 and 3 arrive on the same inputs: no change; the consolidation made at the detection stays."""
    learner = torch_learner(ewc={"consolidate": {"on_drift": True, "every_examples": 0}})
    learn(learner, stream(3000) + stream(2000, seed=1, offset=2)[:2000])
    assert learner.evaluation.drift.total >= 1
    assert learner.evaluation.policy.changes == []
    assert ("new_classes", "consolidate") in done(learner)
    assert not any(kind == "change" for kind, _ in done(learner))
    assert learner.ewc.active


def new_ground(n: int, first: int, seed: int = 2) -> list[Example]:
    """The same classes on inputs never seen before (other features, another rule): a new domain, not a change."""
    rng = random.Random(seed)
    out = []
    for i in range(first, first + n):
        x = [rng.random() for _ in range(3)]
        ts = 1_700_000_000.0 + i / 50.0
        out.append(Example(f"e-{i}", "m", {"u1": 5 + 5 * x[0], "u2": 5 + 5 * x[1], "u3": x[2]},
                           int(x[0] > x[1]), 1.0, ts, ts))
    return out


def test_new_inputs_are_not_taken_for_a_change_of_concept():
    """After a detection, rows far from the inputs the reference knew are not held against it (permuted digits)."""
    learner = torch_learner()
    learn(learner, stream(3000, rotate=(10 ** 9, 10 ** 9)) + new_ground(2000, 3000))
    assert learner.evaluation.drift.total >= 1
    assert ("new_classes", "keep") in done(learner)
    assert not any(kind == "change" for kind, _ in done(learner)), done(learner)


def test_a_restored_learner_continues_a_drift_case_exactly():
    """A snapshot taken while a change is suspected: the restored learner decides and learns as the original."""
    examples = stream()
    original = torch_learner(replay={"capacity": 64})
    learn(original, examples[:CHANGE + 400])
    assert original.evaluation.policy.suspected
    resumed = torch_learner(replay={"capacity": 64})
    resumed.restore(original.snapshot())
    for learner in (original, resumed):
        learn(learner, examples[CHANGE + 400:])
        learner.flush()
    assert np.array_equal(original.snapshot().tensors["flat"], resumed.snapshot().tensors["flat"])
    before, after = original.evaluation.policy, resumed.evaluation.policy
    assert before.changes == after.changes and before.changes
    assert before.counts == after.counts


def test_a_restored_river_learner_continues_a_drift_case_exactly():
    examples = stream()
    original = river_learner()
    learn(original, examples[:CHANGE + 400])
    assert original.evaluation.policy.suspected
    resumed = river_learner()
    resumed.restore(original.snapshot())
    for learner in (original, resumed):
        learn(learner, examples[CHANGE + 400:])
    before, after = original.evaluation.policy, resumed.evaluation.policy
    assert before.changes == after.changes and before.changes
    assert original.evaluation.scores.values() == resumed.evaluation.scores.values()


def test_how_the_stream_is_cut_changes_no_decision():
    examples = stream(4000)
    runs = []
    for size in (4000, 37, 250):
        learner = torch_learner()
        learn(learner, examples, size)
        learner.flush()
        runs.append((learner.evaluation.policy.actions, learner.snapshot().tensors["flat"]))
    assert runs[0][0] and all(actions == runs[0][0] for actions, _ in runs)
    assert all(np.array_equal(flat, runs[0][1]) for _, flat in runs)


def test_policy_records_are_bounded_and_counted():
    policy = DriftPolicy(parse_config({}, env={}).drift.policy)
    for i in range(300):
        policy.act("burst", "dismiss", i, float(i))
    assert len(policy.actions) == 100 and policy.counts[("burst", "dismiss")] == 300


def test_policy_settings_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"^config error: drift\.policy\.contradiction: Expected `float` <= 1\.0$"):
        parse_config({"drift": {"policy": {"contradiction": 2}}}, env={})
    with pytest.raises(ConfigError, match=r"^config error: drift\.policy\.lr_boostx: unknown setting$"):
        parse_config({"drift": {"policy": {"lr_boostx": 2}}}, env={})
