"""A torch model learned through the service is the same on every run of one file, and across a stop and restart.

The intake cuts the stream into batches by the wall clock (and here by different batch sizes and
processes on purpose); none of that may change what the model learns: partial micro-batches are
learned by event time, and a stop leaves the queued ones in the snapshot.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamlearn.config import parse_config
from streamlearn.service import Service

N = 1200


def write_stream(path) -> None:
    """Three classes, 100 examples per event second, with a 3 s lull after every 50 (partial micro-batches)."""
    rng = np.random.default_rng(7)
    with path.open("wb") as out:
        for i in range(N):
            label = int(rng.integers(3))
            ts = 1_000.0 + i / 100 + 3.0 * (i // 50)
            features = {"a": float(label + rng.normal(0, 0.5)), "b": float(rng.normal()), "colour": "red" if label else "blue"}
            out.write(orjson.dumps({"id": f"e-{i:05d}", "ts": ts, "model": "m", "features": features, "label": label}) + b"\n")


def config(path, state_dir, intake: dict):
    return parse_config({
        "source": f"file:{path}", "state_dir": str(state_dir), "seed": 4, "torch_threads": 1, "intake": intake,
        "metrics": {"enabled": False}, "eval": {"segment_size": 400, "probe_size": 10, "every": 200},
        "models": {"m": {"model": "mlp", "params": {"hidden": [16], "dropout": 0.1},
                         "train": {"batch_size": 32, "max_wait": 1.0},
                         "replay": {"capacity": 100, "kind": "class_balanced"},
                         "ewc": {"consolidate": {"every_seconds": 20.0, "every_examples": 500, "on_drift": True}}}},
    }, env={})


def learned(service: Service) -> dict:
    """What must not depend on timing: weights, scores, counts, probe accuracies, consolidations."""
    learner = service.learners["m"]
    summary = {**learner.evaluation.summary(), **learner.metrics().extra}
    return {"flat": learner.snapshot().tensors["flat"], "scores": summary["scores"],
            "learned": learner.evaluation.learned,
            "probes": summary["probe_accuracy"], "fired": dict(learner.consolidation.fired),
            "queued": len(learner.queue)}


def assert_same(a: dict, b: dict) -> None:
    assert np.array_equal(a["flat"], b["flat"])
    assert {k: v for k, v in a.items() if k != "flat"} == {k: v for k, v in b.items() if k != "flat"}


def run(cfg, until=None) -> Service:
    service = Service(cfg)
    service.run(until)
    service.close()
    return service


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple:
    tmp = tmp_path_factory.mktemp("torch")
    path = tmp / "stream.jsonl"
    write_stream(path)
    return path, learned(run(config(path, tmp / "first", {"mode": "inline", "batch_size": 50})))


def test_three_runs_of_one_file_learn_the_same_torch_model(uninterrupted, tmp_path):
    path, first = uninterrupted
    assert first["learned"] == N - 30 and first["queued"] == 0   # 30 held out as probes; the end flushed
    assert first["fired"].get("seconds", 0) >= 2                  # event time: 12 s of stream + 23 lulls of 3 s
    second = learned(run(config(path, tmp_path / "second", {"mode": "inline", "batch_size": 50})))
    third = learned(run(config(path, tmp_path / "third", {"mode": "process", "batch_size": 7, "max_wait": 0.001})))
    assert_same(first, second)
    assert_same(first, third)


def test_a_stop_keeps_the_partial_micro_batch_and_the_restart_continues_exactly(uninterrupted, tmp_path):
    path, reference = uninterrupted
    cfg = config(path, tmp_path / "state", {"mode": "inline", "batch_size": 20, "poll_records": 25})
    stopped = learned(run(cfg, until=lambda service: service.learned >= 300))
    assert 300 <= stopped["learned"] < N - 30
    assert stopped["queued"] > 0, "the stop was expected to land in a partial micro-batch"
    resumed = run(cfg)   # restores the stop's snapshot, queue included, and reads on to the end
    assert_same(learned(resumed), reference)
