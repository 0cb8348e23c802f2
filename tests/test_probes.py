"""Live forgetting: which examples are held out, that they are never learned, and what the figures say."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from streamlearn.config import DriftConfig, EvalConfig, ModelConfig
from streamlearn.learners.plasticity import ConceptChange
from streamlearn.learners.probes import ProbeSets
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example
from streamlearn.telemetry.history import read_history

EVAL = EvalConfig(segment_size=1000, probe_size=50, every=500, segments=10)


def stream(n: int, flip_at: int = 10 ** 9, seed: int = 0) -> list[Example]:
    """x in [-1, 1]; the label is x > 0, reversed from `flip_at` on (an abrupt concept change)."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-1, 1, n)
    return [Example(f"e-{i}", "m", {"x": float(x), "uid": float(i)}, int((x > 0) != (i >= flip_at)), 1.0, i, i)
            for i, x in enumerate(xs)]


def held_out_ids(probes: ProbeSets) -> list[str]:
    return [ex.id for segment in probes.segments for ex in segment.probes] + [ex.id for ex in probes.filling]


def test_each_segment_holds_out_probe_size_examples_spread_over_it():
    probes = ProbeSets("m", EVAL, seed=3)
    learned = [ex for piece, _ in probes.split(stream(4000)) for ex in piece]
    assert [len(s.probes) for s in probes.segments] == [50, 50, 50, 50]
    assert len(learned) == 4000 - 200 == 4000 - probes.held_out
    for segment in probes.segments:
        positions = [int(ex.id[2:]) - 1000 * segment.number for ex in segment.probes]
        assert [p // 20 for p in positions] == list(range(50))   # one in each stretch of 20 examples


def test_the_same_examples_are_held_out_however_the_stream_is_cut_into_batches():
    whole, pieces = ProbeSets("m", EVAL, seed=3), ProbeSets("m", EVAL, seed=3)
    examples = stream(3500)
    list(whole.split(examples))
    rng = np.random.default_rng(1)
    start = 0
    while start < len(examples):
        size = int(rng.integers(1, 700))
        list(pieces.split(examples[start:start + size]))
        start += size
    assert held_out_ids(whole) == held_out_ids(pieces)
    other = ProbeSets("m", EVAL, seed=4)
    list(other.split(examples))
    assert held_out_ids(other) != held_out_ids(whole)   # the seed decides


def test_evaluations_come_every_n_examples_across_batch_boundaries():
    probes = ProbeSets("m", EVAL, seed=0)
    evaluations = []
    for size in (300, 300, 700, 1, 1199):
        for _, evaluate in probes.split(stream(size)):
            if evaluate:
                evaluations.append(probes.position)
    assert evaluations == [500, 1000, 1500, 2000, 2500]


class Recorder:
    """Wraps a River model and records which examples it learned from (by their `uid` feature)."""

    def __init__(self, model) -> None:
        self.model, self.learned = model, set()

    def predict_one(self, x):
        return self.model.predict_one(x)

    def predict_proba_one(self, x):
        return self.model.predict_proba_one(x)

    def learn_one(self, x, y):
        self.learned.add(int(x["uid"]))
        self.model.learn_one(x, y)


def test_probes_are_never_learned():
    learner = RiverLearner("m", ModelConfig(model="logreg"), evaluation=EVAL)
    learner.model = recorder = Recorder(learner.model)
    examples = stream(5000)
    for start in range(0, 5000, 333):
        learner.learn_batch(examples[start:start + 333])
    probe_uids = {int(ex.features["uid"]) for s in learner.evaluation.probes.segments for ex in s.probes}
    probe_uids |= {int(ex.features["uid"]) for ex in learner.evaluation.probes.filling}
    assert len(probe_uids) == learner.evaluation.probes.held_out == 250
    assert recorder.learned.isdisjoint(probe_uids)
    assert len(recorder.learned) == learner.evaluation.learned == 5000 - 250


def test_forgetting_and_backward_transfer_follow_their_definitions():
    probes = ProbeSets("m", EvalConfig(segment_size=10, probe_size=2, every=10, segments=3), seed=0)
    list(probes.split(stream(20)))                 # two complete segments
    probes.record([0.9, 0.6])                      # first evaluation of both
    assert math.isnan(probes.forgetting) and math.isnan(probes.backward_transfer)
    probes.record([0.7, 0.8])
    assert probes.forgetting == pytest.approx(((0.9 - 0.7) + (0.6 - 0.8)) / 2)
    assert probes.backward_transfer == pytest.approx(((0.7 - 0.9) + (0.8 - 0.6)) / 2)
    probes.record([0.5, 0.8])
    assert probes.forgetting == pytest.approx(((0.9 - 0.5) + (0.8 - 0.8)) / 2)   # best earlier, not first
    assert probes.accuracies() == {0: 0.5, 1: 0.8}


def test_only_the_last_segments_are_kept():
    probes = ProbeSets("m", EvalConfig(segment_size=10, probe_size=2, every=10, segments=3), seed=0)
    list(probes.split(stream(60)))
    assert [s.number for s in probes.segments] == [3, 4, 5]


NO_DRIFT = DriftConfig(detectors=[])   # no detection, so no policy decision: the figures as the probes see them


def test_live_forgetting_shows_a_concept_change_and_stays_low_without_one():
    stationary = RiverLearner("m", ModelConfig(model="logreg"), drift=NO_DRIFT, evaluation=EVAL)
    changed = RiverLearner("m", ModelConfig(model="logreg"), drift=NO_DRIFT, evaluation=EVAL)
    stationary.learn_batch(stream(8000))
    changed.learn_batch(stream(8000, flip_at=4000))
    assert stationary.evaluation.probes.forgetting < 0.05
    assert changed.evaluation.probes.forgetting > 0.5                  # the segments before the change are now wrong
    assert changed.evaluation.probes.backward_transfer < -0.5
    assert min(changed.evaluation.probes.accuracies().values()) < 0.2


CHANGE = ConceptChange(position=4000, ts=4100.0, confirmed_position=5000, confirmed_ts=5000.0, detector="adwin")


def test_a_confirmed_change_retires_the_old_concepts_probes_from_forgetting():
    changed = RiverLearner("m", ModelConfig(model="logreg"), drift=NO_DRIFT, evaluation=EVAL)
    changed.learn_batch(stream(8000, flip_at=4000))
    assert changed.evaluation.probes.forgetting > 0.5
    probes = changed.evaluation.probes
    assert probes.follow(CHANGE) and not probes.follow(CHANGE)   # once; again does nothing
    # Segments 0-3 hold the old concept, segment 4 straddles the change (ts 4000..4999): all five retired whole.
    assert [s.number for s in changed.evaluation.probes.retired] == [0, 1, 2, 3, 4]
    assert [s.number for s in changed.evaluation.probes.segments] == [5, 6, 7]
    changed.evaluation.evaluate()   # scores only the segments kept
    assert abs(changed.evaluation.probes.forgetting) < 0.05 and changed.evaluation.probes.backward_transfer > -0.05
    assert set(changed.evaluation.probes.accuracies()) == {5, 6, 7}
    # the adapted model, no longer reported as forgetting
    assert min(changed.evaluation.probes.accuracies().values()) > 0.8


def test_the_segment_under_way_keeps_only_its_probes_since_the_change():
    probes = ProbeSets("m", EVAL, seed=3)
    list(probes.split(stream(4500)))
    times = [ex.ts for ex in probes.filling]
    assert len(times) == 25 and min(times) < 4100 < max(times)
    probes.follow(CHANGE)
    assert probes.filling and all(ex.ts >= 4100 for ex in probes.filling)
    list(probes.split(stream(5000)[4500:]))   # the same stream, on to the end of segment 4
    assert [s.number for s in probes.segments] == [4] and all(ex.ts >= 4100 for ex in probes.segments[0].probes)
    assert probes.held_out == 250   # what was held out stays counted: those examples were never learned


def test_a_newer_change_retires_more_an_older_or_unknown_one_nothing():
    probes = ProbeSets("m", EVAL, seed=3)
    list(probes.split(stream(6000)))
    assert probes.follow(ConceptChange(2000, 2000.0, 2500, 2500.0, "adwin"))
    assert [s.number for s in probes.retired] == [0, 1]
    assert not probes.follow(ConceptChange(1000, 1000.0, 1500, 1500.0, "adwin"))
    assert not probes.follow(ConceptChange(9000, math.nan, 9500, math.nan, "adwin")) and not probes.follow(None)
    assert probes.follow(ConceptChange(3000, math.nan, 3900, 3900.0, "adwin"))   # detection time unknown
    assert [s.number for s in probes.retired] == [0, 1, 2, 3] and probes.since == 3900.0


def test_what_was_retired_is_in_the_learners_snapshot_and_old_snapshots_restore():
    learner = RiverLearner("m", ModelConfig(model="logreg"), drift=NO_DRIFT, evaluation=EVAL)
    learner.learn_batch(stream(6000, flip_at=4000))
    learner.evaluation.probes.follow(CHANGE)
    restored = RiverLearner("m", ModelConfig(model="logreg"), drift=NO_DRIFT, evaluation=EVAL)
    restored.restore(learner.snapshot())
    assert restored.evaluation.probes.since == CHANGE.ts
    retired = [s.number for s in learner.evaluation.probes.retired]
    assert [s.number for s in restored.evaluation.probes.retired] == retired == [0, 1, 2, 3, 4]
    assert [s.number for s in restored.evaluation.probes.segments] == [5]

    before = ProbeSets("m", EVAL, seed=3)   # pickled before retirement existed: nothing retired
    list(before.split(stream(2000)))
    del before.since, before.retired
    old = pickle.loads(pickle.dumps(before))
    assert old.since is None and len(old.retired) == 0 and old.follow(ConceptChange(0, 500.0, 1, 600.0, "adwin"))


def test_the_service_writes_a_history_line_per_evaluation(tmp_path):
    import orjson

    from streamlearn.config import parse_config
    from streamlearn.service import Service

    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"id": e.id, "ts": e.ts, "features": e.features, "label": e.label}) + b"\n"
                              for e in stream(6000, flip_at=3000)))
    config = parse_config({"source": f"file:{path}", "state_dir": str(tmp_path / "state"),
                           "metrics": {"enabled": False}, "intake": {"mode": "inline"},
                           "drift": {"policy": {"enabled": False}},   # no confirmed change: no probe retired
                           "eval": {"segment_size": 1000, "probe_size": 50, "every": 500}}, env={})
    summary = Service(config).run()
    lines = read_history(tmp_path / "state" / "history.jsonl")
    assert [r.position for r in lines] == list(range(500, 6001, 500))
    assert lines[-1].learned == summary["learned"] == 6000 - 300
    assert lines[-1].forgetting == summary["models"]["default"]["forgetting"] > 0.3
    assert any(r.drifts for r in lines)                      # the change is detected, and in the history
    assert all("loop_p50" in r.latency and "processing_p99" in r.latency for r in lines)


def test_a_model_that_learns_nothing_still_writes_readable_history(tmp_path):
    """Every example fails to learn (a string feature for a model without one-hot): the scores are NaN, and the
    history lines leave them out rather than becoming lines the report cannot read."""
    from streamlearn.telemetry.history import HistoryRecorder, HistoryWriter

    learner = RiverLearner("m", ModelConfig(model="scaled_logreg"),
                           evaluation=EvalConfig(segment_size=100, probe_size=10, every=50))
    recorder = HistoryRecorder(HistoryWriter(tmp_path / "history.jsonl"))
    learner.evaluation.on_evaluation = lambda l: recorder.record(l, None, 0.0)
    learner.learn_batch([Example(f"r-{i}", "m", {"channel": "web"}, i % 2, 1.0, i, i) for i in range(200)])
    recorder.close()
    records = read_history(tmp_path / "history.jsonl")
    assert learner.evaluation.learned == 0 and learner.evaluation.errors > 0
    assert [r.position for r in records] == [50, 100, 150, 200] and all(r.scores == {} for r in records)
