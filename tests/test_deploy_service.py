"""The handoff inside the service (file source): scores by serving version, metrics, restarts, abandoned candidates."""

from __future__ import annotations

import random

import orjson
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamlearn.config import parse_config
from streamlearn.deploy.handoff import ABANDONED
from streamlearn.deploy.records import VersionRecord
from streamlearn.deploy.registry import open_registry
from streamlearn.service import Service


def write_lines(path, events) -> None:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))


def examples(n: int, start: int = 0) -> list[dict]:
    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        x = rng.random()
        out.append({"id": f"e-{i}", "ts": 1000.0 + i, "model": "fraud", "features": {"x": x}, "label": int(x > 0.5)})
    return out


def config(tmp_path, source, **sections):
    data = {"source": f"file:{source}", "state_dir": str(tmp_path / "state"), "intake": {"mode": "inline",
            "batch_size": 100}, "models": {"fraud": {"model": "logreg"}}, "metrics": {"enabled": False},
            "eval": {"segment_size": 500, "probe_size": 25, "every": 250}}
    data.update(sections)
    return parse_config(data, env={})


def samples(service) -> dict[tuple[str, tuple], float]:
    text = generate_latest(service.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_feedback_is_attributed_to_the_serving_version_that_predicted(tmp_path):
    events = []
    for i in range(400):   # versions 1..4 serve 100 requests each; v2 is always right, v3 always wrong
        version, label = 1 + i // 100, i % 2
        prediction = {1: 1, 2: label, 3: 1 - label, 4: label}[version]
        proba = {"0": 0.2, "1": 0.8} if version == 4 and label else {"0": 0.8, "1": 0.2}
        log = {"request_id": f"r-{i}", "ts": 1000.0 + i, "model": "fraud", "model_version": version,
               "features": {"x": float(label)}}
        log.update({"proba": proba} if version == 4 else {"prediction": prediction})
        events += [log, {"request_id": f"r-{i}", "ts": 1000.5 + i, "label": label}]
    write_lines(tmp_path / "events.jsonl", events)
    service = Service(config(tmp_path, tmp_path / "events.jsonl", eval={"served_versions": 3}))
    summary = service.run()
    served = summary["models"]["fraud"]["served_versions"]
    assert served == {"2": {"examples": 100, "score": 1.0}, "3": {"examples": 100, "score": 0.0},
                      "4": {"examples": 100, "score": 1.0}}, "bounded to the 3 most recent; v4 scored by its proba"
    metrics = samples(service)
    key = lambda v: ("streamlearn_prequential_score", (("metric", "accuracy"), ("model", "fraud"),  # noqa: E731
                                                       ("model_version", v), ("window", "all")))
    assert (metrics[key("2")], metrics[key("3")]) == (1.0, 0.0) and key("1") not in metrics
    assert ("streamlearn_prequential_score", (("metric", "accuracy"), ("model", "fraud"), ("window", "all"))) in metrics

    restored = Service(config(tmp_path, tmp_path / "events.jsonl", eval={"served_versions": 3}))
    assert restored.served["fraud"].summary() == served, "the tallies are in the snapshot"


def test_publishing_exports_decisions_and_the_production_version(tmp_path):
    write_lines(tmp_path / "events.jsonl", examples(3000))
    service = Service(config(tmp_path, tmp_path / "events.jsonl",
                             publish={"enabled": True, "every_examples": 1000, "every_seconds": 0},
                             gate={"min_shadow_examples": 100, "holdout_every": 10, "holdout_size": 100}))
    summary = service.run()
    production = summary["deploy"]["fraud"]["production"]
    assert summary["deploy"]["fraud"]["decisions"]["promoted"] >= 2 and production >= 2
    assert summary["learned"] + summary["held_out"] == 3000
    assert summary["deploy"]["fraud"]["held_out"] == 300
    metrics = samples(service)
    assert metrics[("streamlearn_model_version", (("model", "fraud"),))] == production
    assert metrics[("streamlearn_gate_decisions_total", (("model", "fraud"), ("outcome", "promoted")))] >= 2
    assert metrics[("streamlearn_gate_decisions_total", (("model", "fraud"), ("outcome", "rejected")))] == 0
    assert metrics[("streamlearn_triggers_fired_total", (("action", "publish"), ("reason", "examples")))] >= 2
    service.close()


def test_a_restart_resumes_the_waiting_candidate_and_abandons_those_made_after_the_snapshot(tmp_path):
    write_lines(tmp_path / "first.jsonl", examples(1500))
    publish = {"enabled": True, "every_examples": 1000, "every_seconds": 0}
    gate = {"min_shadow_examples": 700}
    first = Service(config(tmp_path, tmp_path / "first.jsonl", publish=publish, gate=gate))
    summary = first.run()
    first.close()
    assert summary["deploy"]["fraud"]["waiting"] == 1   # made at 1,000; 500 shadow examples so far
    registry = open_registry(first.config)
    waiting = registry.get("fraud", 1)
    # A candidate written after the final snapshot, as if the service had crashed right after making it:
    registry.add(VersionRecord("fraud", 2, "candidate", 0.0, waiting.artifact, waiting.manifest_sha256,
                               waiting.checksums))

    write_lines(tmp_path / "first.jsonl", examples(1500) + examples(500, start=1500))   # the file grows
    second = Service(config(tmp_path, tmp_path / "first.jsonl", publish=publish, gate=gate))
    abandoned = registry.get("fraud", 2)
    assert (abandoned.status, abandoned.reasons) == ("rejected", [ABANDONED])
    assert second.handoff.models["fraud"].shadow.tally.examples == 500
    summary = second.run()
    second.close()
    assert summary["deploy"]["fraud"]["production"] == 1   # 500 + 500 shadow examples: the gate decided
    assert [c.status for c in registry.changes("fraud") if c.version == 1] == ["candidate", "production"]


def test_a_failing_artifact_store_never_stops_learning(tmp_path, monkeypatch, caplog):
    from streamlearn.deploy import artifacts

    write_lines(tmp_path / "events.jsonl", examples(4000))
    real, failing = artifacts._LocalFiles.write_folder, [True]

    def write_folder(self, relative, files):
        if failing[0]:
            raise OSError(28, "No space left on device")
        real(self, relative, files)

    monkeypatch.setattr(artifacts._LocalFiles, "write_folder", write_folder)
    service = Service(config(tmp_path, tmp_path / "events.jsonl",
                             publish={"enabled": True, "every_examples": 1000, "every_seconds": 0},
                             gate={"min_shadow_examples": 100}))

    def on_batch(service, batch):
        if service.handoff.failures >= 2:
            failing[0] = False   # the disk has room again

    with caplog.at_level("ERROR", logger="streamlearn.deploy.handoff"):
        summary = service.run(on_batch=on_batch)
    service.close()
    assert summary["learned"] + summary["held_out"] == 4000
    assert "publishing failed (1 so far), learning goes on: OSError: [Errno 28] No space left on device" in caplog.text
    records = open_registry(service.config).versions("fraud")
    assert records and all(r.status != "candidate" or r.version == max(x.version for x in records) for r in records)
    assert summary["deploy"]["fraud"]["production"] is not None, "once the disk recovered, a candidate was promoted"
    metrics = samples(service)
    assert metrics[("streamlearn_publish_failures_total", ())] == service.handoff.failures >= 2
