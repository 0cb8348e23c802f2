"""The feedback loop's stage timing (streamlearn_stage_seconds{stage}) on /metrics of real runs."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamlearn.config import ConfigError, parse_config
from streamlearn.service import Service
from streamlearn.stream.channel import consumer_settings
from tests.conftest import http_get

STAGES = ("kafka", "join", "batch", "handoff", "queue", "learn")
PAIRS = 400
START_TS = 1_763_800_000.0


def pairs(n: int) -> list[tuple[str, str, bytes]]:
    """(topic kind, key, value): n inference logs and their feedback a second later, feedback after its log."""
    out = []
    for i in range(n):
        rid, ts = f"r-{i:05d}", START_TS + i * 0.01
        out.append(("inference-logs", rid, orjson.dumps({"request_id": rid, "ts": ts, "model": "default",
                                                          "features": {"x": i % 7, "y": 0.5}})))
    for i in range(n):
        rid, ts = f"r-{i:05d}", START_TS + i * 0.01 + 1.0
        out.append(("feedback", rid, orjson.dumps({"request_id": rid, "ts": ts, "label": i % 2})))
    return out


def stage_histograms(text: str) -> dict[str, dict]:
    """stage -> {"count", "sum", "buckets": [(le, cumulative count), ...]} of streamlearn_stage_seconds."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "streamlearn_stage_seconds":
            continue
        for s in family.samples:
            h = out.setdefault(s.labels["stage"], {"buckets": []})
            if s.name.endswith("_bucket"):
                h["buckets"].append((float(s.labels["le"]), s.value))
            else:
                h[s.name.rsplit("_", 1)[1]] = s.value
    return out


def check_histogram(stage: str, h: dict, examples: int) -> None:
    """Every example counted once in `stage`, the buckets cumulative, the times non-negative and finite."""
    assert h["count"] == examples, f"{stage}: {h['count']} observations for {examples} examples"
    assert math.isfinite(h["sum"]) and h["sum"] >= 0, stage
    counts = [c for _, c in sorted(h["buckets"])]
    assert counts == sorted(counts) and counts[-1] == h["count"], stage
    assert h["sum"] <= examples * 60, f"{stage}: a mean over a minute on a run of seconds"


def test_stage_histograms_on_metrics_of_a_kafka_run(broker, topics):
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5})
    for kind, key, value in pairs(PAIRS):
        producer.produce(topics[kind], value=value, key=key.encode())
    assert producer.flush(30) == 0
    config = parse_config({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "group_id": f"g-{topics['feedback']}",
                  "session_timeout_ms": 6000, "inference_topic": topics["inference-logs"],
                  "feedback_topic": topics["feedback"], "examples_topic": topics["examples"]},
        "models": {"default": {"model": "logreg"}},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-test-"),
    }, env={})
    service = Service(config)
    try:
        summary = service.run(until=lambda s: s.stats is not None and s.stats.caught_up
                              and s.learned + s.held_out >= PAIRS)
        status, text = http_get(service.metrics.port, "/metrics")
    finally:
        service.close()
    assert status == 200
    assert summary["join"]["matched"] == PAIRS
    stages = stage_histograms(text)
    assert list(stages) == list(STAGES)   # exported in the loop's order
    for stage in STAGES:   # each example once per stage: its completing message, release, batch, learning
        check_histogram(stage, stages[stage], PAIRS)
    # The messages were all waiting before the service started: each spent a while in Kafka.
    assert stages["kafka"]["sum"] > 0


def test_stage_histograms_of_a_file_run_leave_kafka_empty():
    """A file has no broker timestamps: the kafka stage counts nothing, the others every example (inline intake)."""
    folder = Path(tempfile.mkdtemp(prefix="streamlearn-test-"))
    path = folder / "events.jsonl"
    path.write_bytes(b"\n".join(value for _, _, value in pairs(50)) + b"\n")
    config = parse_config({"source": f"file:{path}", "state_dir": str(folder), "intake": {"mode": "inline"},
                           "metrics": {"host": "127.0.0.1", "port": 0}}, env={})
    service = Service(config)
    try:
        summary = service.run()
        status, text = http_get(service.metrics.port, "/metrics")
    finally:
        service.close()
    assert status == 200 and summary["join"]["matched"] == 50
    stages = stage_histograms(text)
    assert stages["kafka"]["count"] == 0
    for stage in STAGES[1:]:
        check_histogram(stage, stages[stage], 50)


@pytest.mark.parametrize("value", [0, -5, "fast", 2.5])
def test_fetch_wait_ms_is_checked_and_named(value):
    with pytest.raises(ConfigError, match="^config error: kafka.fetch_wait_ms: "):
        parse_config({"kafka": {"fetch_wait_ms": value}}, env={})


def test_fetch_wait_ms_goes_to_the_consumer_in_its_clients_key():
    assert consumer_settings(parse_config({}, env={}).kafka) == {}   # unset: the built-in 100 ms stays
    confluent = parse_config({"kafka": {"fetch_wait_ms": 5}}, env={}).kafka
    assert consumer_settings(confluent) == {"fetch.wait.max.ms": 5}
    python = parse_config({"kafka": {"client": "kafka-python"}}, env={"STREAMLEARN_KAFKA_FETCH_WAIT_MS": "7"}).kafka
    assert consumer_settings(python) == {"fetch_max_wait_ms": 7}
