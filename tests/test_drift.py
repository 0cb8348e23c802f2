"""Drift detection on the prequential error: fires after an abrupt change, not before (no broker)."""

from __future__ import annotations

import numpy as np
import pytest
from river.datasets import synth

from streamlearn.config import DriftConfig, ModelConfig, parse_config
from streamlearn.learners.drift import DriftMonitor
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example

CHANGE = 10_000


def sea_with_abrupt_drift(seed: int, n: int = 2 * CHANGE) -> list[Example]:
    """River's SEA concepts, threshold 8 up to example CHANGE, 7 from there on (an abrupt change)."""
    before = synth.SEA(variant=0, seed=seed).take(CHANGE)
    after = synth.SEA(variant=2, seed=seed + 100).take(n - CHANGE)
    rows = [*before, *after]
    return [Example(f"e-{i}", "m", x, y, 1.0, float(i), float(i)) for i, (x, y) in enumerate(rows)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_adwin_fires_soon_after_an_abrupt_change_and_never_before(seed):
    learner = RiverLearner("m", ModelConfig(model="scaled_logreg"), drift=DriftConfig(detectors=["adwin"]))
    learner.learn_batch(sea_with_abrupt_drift(seed))
    positions = [event.position for event in learner.evaluation.drift.last]
    assert positions, "no drift detected"
    assert min(positions) > CHANGE, f"fired on the stationary part (learning included): {positions}"
    assert min(positions) <= CHANGE + 2_000, f"fired too late: {positions}"
    assert learner.evaluation.drift.detected["adwin"] == len(positions)


def test_page_hinkley_fires_on_a_rise_in_error_and_not_on_a_fall():
    monitor = DriftMonitor(DriftConfig(detectors=["page_hinkley"]))
    rng = np.random.default_rng(0)
    assert monitor.update(rng.random(3000) < 0.3) == [] and monitor.update(rng.random(3000) < 0.05) == []
    events = monitor.update(rng.random(2000) < 0.6)
    assert events and 6000 < events[0].position <= 6500


def test_a_falling_error_is_not_drift_for_adwin():
    monitor = DriftMonitor(DriftConfig(detectors=["adwin"]))
    rng = np.random.default_rng(0)
    assert monitor.update(rng.random(5000) < 0.4) == []     # a model learning: error 40% ...
    assert monitor.update(rng.random(5000) < 0.05) == []    # ... then 5%: ADWIN sees the change, it is no drift
    assert monitor.detected["adwin"] == 0
    assert [e.detector for e in monitor.update(rng.random(3000) < 0.5)][:1] == ["adwin"]


def test_the_torch_learner_consolidates_when_drift_is_detected():
    from streamlearn.learners.torch_learner import TorchLearner

    model = parse_config({"models": {"m": {"model": "mlp", "params": {"hidden": [16]},
                                           "train": {"max_wait": 3600.0},   # examples are 1 event-second apart
                                           "ewc": {"consolidate": {"on_drift": True}}}}}, env={}).models["m"]
    learner = TorchLearner("m", model, seed=1)
    learner.learn_batch(sea_with_abrupt_drift(seed=1))
    assert learner.evaluation.drift.detected["adwin"] >= 1
    assert learner.ewc.consolidations == learner.evaluation.drift.detected["adwin"]
    assert dict(learner.consolidation.fired) == {"drift": learner.evaluation.drift.detected["adwin"]}
