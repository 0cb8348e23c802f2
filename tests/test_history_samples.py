"""Frequent score samples in the history: cut by example count, learning unchanged, bounded file, policy actions."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np
import orjson
import pytest

from streamlearn.config import ModelConfig, parse_config
from streamlearn.learners.plasticity import PolicyAction
from streamlearn.service import Service
from streamlearn.telemetry.history import (HistoryRecord, HistoryRecorder, HistoryWriter, ScoreSample,
                                           read_history_file, rotated_path)

EXAMPLES = 3000


def write_stream(path, n: int = EXAMPLES) -> None:
    """Two models' labeled examples; the concept flips at two thirds (so the scores move)."""
    rng = np.random.default_rng(5)
    lines = []
    for i in range(n):
        x = float(rng.normal())
        lines.append(orjson.dumps({"id": f"e-{i}", "ts": float(i), "model": "a" if i % 3 else "b",
                                   "features": {"x": x, "z": float(rng.normal())},
                                   "label": int((x > 0) != (i >= 2 * n // 3))}))
    path.write_bytes(b"\n".join(lines) + b"\n")


def run(tmp_path, name: str, batch_size: int, sample_every: int, torch_model: bool = False) -> dict:
    stream = tmp_path / "stream.jsonl"
    if not stream.exists():
        write_stream(stream)
    b = ({"model": "mlp", "params": {"hidden": [8]}, "train": {"batch_size": 16, "max_wait": 3600.0}}
         if torch_model else {"model": "hoeffding_tree"})
    config = parse_config({"source": f"file:{stream}", "state_dir": str(tmp_path / name),
                           "metrics": {"enabled": False}, "snapshot": {"enabled": False},
                           "intake": {"mode": "inline", "batch_size": batch_size},
                           "models": {"a": {"model": "logreg", "window": 200}, "b": b},
                           "eval": {"segment_size": 500, "probe_size": 20, "every": 500, "sample_every": sample_every}},
                          env={})
    service = Service(config)
    try:
        return service.run()
    finally:
        service.close()


def test_samples_are_cut_by_example_count_and_change_nothing_learned(tmp_path):
    """Sample positions are multiples of eval.sample_every whatever the batches; the models learn the same."""
    small = run(tmp_path, "small", batch_size=37, sample_every=50)
    large = run(tmp_path, "large", batch_size=1000, sample_every=50)
    unsampled = run(tmp_path, "off", batch_size=1000, sample_every=0)
    history = {name: read_history_file(tmp_path / name / "history.jsonl") for name in ("small", "large", "off")}
    samples = history["small"].samples
    for model, summary_model in (("a", small["models"]["a"]), ("b", small["models"]["b"])):
        positions = [s.position for s in samples if s.model == model]
        taken = summary_model["learned"] + summary_model["held_out"]
        assert positions == list(range(50, taken + 1, 50))   # every 50th example of the model's own stream
    assert [msgspec.structs.astuple(s)[:2] + (s.scores,) for s in samples] == \
        [msgspec.structs.astuple(s)[:2] + (s.scores,) for s in history["large"].samples]
    assert not history["off"].samples and history["off"].records
    for summary in (large, unsampled):   # learning in pieces learns exactly what one call learns
        for model in ("a", "b"):        # (sums of log losses added in other groupings: equal to rounding)
            assert summary["models"][model]["scores"] == pytest.approx(small["models"][model]["scores"], abs=1e-12)
            assert summary["models"][model]["learned"] == small["models"][model]["learned"]
    # the samples follow the rolling score: high before the flip, low just after it
    a = {s.position: s.scores["accuracy"] for s in samples if s.model == "a"}
    assert a[1300] > 0.8 and min(a[p] for p in range(1350, 1600, 50)) < 0.5


def test_torch_samples_score_the_queued_examples_and_change_nothing(tmp_path):
    """A torch learner's waiting micro-batch is scored before a sample; its training is the same as without."""
    sampled = run(tmp_path, "sampled", batch_size=29, sample_every=40, torch_model=True)
    plain = run(tmp_path, "plain", batch_size=1000, sample_every=0, torch_model=True)
    assert sampled["models"]["b"]["scores"] == pytest.approx(plain["models"]["b"]["scores"], abs=1e-9)
    samples = [s for s in read_history_file(tmp_path / "sampled" / "history.jsonl").samples if s.model == "b"]
    assert [s.position for s in samples] == list(range(40, 40 * len(samples) + 1, 40)) and len(samples) >= 20
    assert all(0.0 <= s.scores["accuracy"] <= 1.0 for s in samples)


def test_history_rotates_past_its_bound_and_reads_both_parts(tmp_path):
    path = tmp_path / "history.jsonl"
    bound = 4000
    with HistoryWriter(path, max_bytes=bound) as writer:
        for position in range(100, 100_001, 100):
            writer.append(ScoreSample("m", position, 1_700_000_000.0 + position, {"accuracy": 0.9123}))
    older = rotated_path(path)
    assert older.exists() and path.stat().st_size < bound and older.stat().st_size < bound + 100
    history = read_history_file(path)
    positions = [s.position for s in history.samples]
    assert positions[-1] == 100_000 and positions == list(range(positions[0], 100_001, 100))
    assert 60 < len(positions) < 200   # the two parts' worth, not the whole stream: bounded


@dataclass
class Policy:
    """Where the drift policy keeps what it did (`learner.evaluation.policy.actions`), as the recorder drains it."""

    actions: list[PolicyAction] = field(default_factory=list)


def test_policy_actions_are_drained_into_the_evaluation_records(tmp_path):
    from streamlearn.learners.river_learner import RiverLearner

    learner = RiverLearner("m", ModelConfig(model="logreg", task="classification", window=50))
    learner.learn_batch([])
    recorder = HistoryRecorder(HistoryWriter(tmp_path / "history.jsonl"), sample_every=10)
    recorder.record(learner.evaluation, None, 1.0)   # no policy yet (it lands separately): no actions, no error
    learner.evaluation.policy = Policy([PolicyAction(120, 1_700_000_120.0, "change", "release_ewc"),
                             PolicyAction(120, 1_700_000_120.0, "change", "expire_replay")])
    recorder.record(learner.evaluation, None, 2.0)
    learner.evaluation.policy.actions.append(PolicyAction(300, 1_700_000_300.0, "burst", "hold"))
    recorder.sample(learner, 3.0)          # samples carry scores only; the actions wait for the evaluation
    assert len(learner.evaluation.policy.actions) == 1
    recorder.record(learner.evaluation, None, 4.0)
    recorder.close()
    lines = (tmp_path / "history.jsonl").read_bytes().splitlines()
    records = [msgspec.json.decode(line, type=HistoryRecord) for line in lines if line.startswith(b"{")]
    assert [[a.action for a in r.actions] for r in records] == [[], ["release_ewc", "expire_replay"], ["hold"]]
    assert learner.evaluation.policy.actions == []
