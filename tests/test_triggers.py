"""Triggers: each condition alone, their order, the score bound's re-arming, and a snapshot fired by drift."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from streamlearn.checkpoints.store import SnapshotStore
from streamlearn.config import TriggerConfig, parse_config
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec, write_jsonl
from streamlearn.service import Service
from streamlearn.triggers import Trigger
from tests.conftest import http_get


def test_every_examples_counts_from_the_last_firing():
    trigger = Trigger("snapshot", TriggerConfig(every_examples=100), now=0.0)
    fired = [trigger.check(n, now=0.0) for n in range(0, 1001, 10)]
    assert fired.count("examples") == 10
    assert [n for n, r in zip(range(0, 1001, 10), fired) if r] == list(range(100, 1001, 100))


def test_every_seconds_and_a_firing_from_elsewhere_restarts_the_clock():
    trigger = Trigger("snapshot", TriggerConfig(every_seconds=10.0), now=0.0)
    assert trigger.check(0, now=9.9) is None
    assert trigger.check(0, now=10.0) == "seconds"
    trigger.fire("shutdown", 0, now=15.0)
    assert trigger.check(0, now=24.0) is None
    assert trigger.check(0, now=25.0) == "seconds"
    assert dict(trigger.fired) == {"seconds": 2, "shutdown": 1}


def test_nothing_configured_never_fires():
    trigger = Trigger("snapshot", TriggerConfig(), now=0.0)
    assert all(trigger.check(n, now=float(n), drifts=n, score=0.0) is None for n in range(0, 10**6, 1000))


def test_drift_comes_first_and_only_when_asked_for():
    both = Trigger("consolidate", TriggerConfig(every_examples=10, on_drift=True), now=0.0)
    assert both.check(50, now=0.0, drifts=1) == "drift"
    assert both.check(55, now=0.0) is None          # the examples interval restarted at the drift firing
    assert both.check(60, now=0.0) == "examples"
    no_drift = Trigger("consolidate", TriggerConfig(every_examples=10), now=0.0)
    assert no_drift.check(5, now=0.0, drifts=1) is None


def test_a_score_bound_fires_once_per_fall_and_rearms_on_recovery():
    trigger = Trigger("snapshot", TriggerConfig(score_below=0.8), now=0.0)
    scores = [0.9, math.nan, 0.7, 0.6, 0.5, 0.85, 0.79, 0.79, 0.8, 0.81, 0.2]
    fired = [trigger.check(i, now=0.0, score=s) for i, s in enumerate(scores)]
    assert fired == [None, None, "score", None, None, None, "score", None, None, None, "score"]
    assert trigger.fired == {"score": 3}


def _drifting_run(tmp_path, requests: int) -> tuple:
    """A file-source run over traffic whose concept changes halfway, snapshotting only on drift."""
    path = tmp_path / "events.jsonl"
    write_jsonl(TrafficGenerator(TrafficSpec(requests=requests, seed=3, model="fraud")).messages(), path)
    config = parse_config({
        "source": f"file:{path}", "state_dir": str(tmp_path / "state"),
        "metrics": {"host": "127.0.0.1", "port": 0},
        "models": {"fraud": {"model": "logreg"}},
        "snapshot": {"every_examples": 0, "every_seconds": 0, "on_drift": True, "keep": 100},
    }, env={})
    return config, Service(config)


def test_drift_fires_a_snapshot_and_the_reason_is_exported(tmp_path):
    config, service = _drifting_run(tmp_path, requests=20_000)
    try:
        summary = service.run()
        text = http_get(service.metrics.port, "/metrics")[1]
    finally:
        service.close()
    fired = {(s.labels["action"], s.labels["reason"]): s.value
             for family in text_string_to_metric_families(text) if family.name == "streamlearn_triggers_fired"
             for s in family.samples if s.name == "streamlearn_triggers_fired_total"}
    drifts = sum(summary["models"]["fraud"]["drift_detected"].values())
    assert drifts >= 1, "the traffic's concept change is detected"
    assert 1 <= fired[("snapshot", "drift")] <= drifts
    assert fired[("snapshot", "shutdown")] == 1
    assert set(fired) == {("snapshot", "drift"), ("snapshot", "shutdown")}, "no interval was configured"
    snapshots = SnapshotStore(Path(config.state_dir) / "snapshots").sequences()
    assert len(snapshots) == fired[("snapshot", "drift")] + 1


def test_drifts_count_once_and_the_state_survives_a_restart():
    """Drift arrives as a running total: a firing takes the detections so far into account; a trigger
    rebuilt from its state goes on from the same example and drift counts."""
    config = TriggerConfig(every_examples=100, on_drift=True)
    trigger = Trigger("publish", config, now=0.0)
    assert trigger.check(10, now=0.0, drifts=2) == "drift"
    assert trigger.check(20, now=0.0, drifts=2) is None     # the same two detections do not fire again
    restarted = Trigger("publish", config, now=50.0, state=trigger.state())
    assert restarted.check(109, now=50.0, drifts=2) is None
    assert restarted.check(110, now=50.0, drifts=2) == "examples"
    assert dict(restarted.fired) == {"drift": 1, "examples": 1}
