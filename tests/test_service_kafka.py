"""End-to-end: real broker, real consumer group, real metrics endpoint, real dead-letter topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamlearn.config import parse_config
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec, write_jsonl
from streamlearn.service import Service
from streamlearn.stream.source import split_position
from tests.conftest import http_get, wait_for

SPEC = TrafficSpec(requests=3000, seed=7, model="fraud", max_message_bytes=65_536)


def produce(bootstrap: str, topics: dict[str, str], messages) -> int:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "message.max.bytes": 1 << 20})
    for m in messages:
        producer.produce(topics[m.topic], value=m.value, key=m.key)
        producer.poll(0)
    assert producer.flush(30) == 0
    return len(messages)


def kafka_config(bootstrap: str, topics: dict[str, str], **sections):
    data = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"g-{topics['feedback']}", "session_timeout_ms": 6000,
                  "inference_topic": topics["inference-logs"], "feedback_topic": topics["feedback"],
                  "examples_topic": topics["examples"]},
        "join": {"ttl": 600.0, "early_ttl": 60.0},
        "intake": {"max_message_bytes": SPEC.max_message_bytes},
        "models": {"fraud": {"model": "logreg"}},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-test-"),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, env={})


def consumed_all(sent: int):
    return lambda s: s.stats is not None and s.stats.caught_up and sum(s.stats.events.values()) >= sent


def read_topic(bootstrap: str, topic: str, expected: int) -> list:
    """Every message of a topic from the beginning, without a consumer group."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages = []
    wait_for(lambda: messages.extend(m for m in consumer.consume(500, 0.5) if not m.error())
             or len(messages) >= expected, what=f"{expected} messages on {topic}")
    consumer.close()
    return messages


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def traffic():
    generator = TrafficGenerator(SPEC)
    messages = list(generator.messages())
    return generator, messages


def test_kafka_pipeline_learns_dead_letters_and_exports(broker, topics, traffic):
    generator, messages = traffic
    sent = produce(broker.bootstrap_servers, topics, messages)
    service = Service(kafka_config(broker.bootstrap_servers, topics))
    try:
        summary = service.run(until=consumed_all(sent))
        port = service.metrics.port
        status, text = http_get(port, "/metrics")
        assert status == 200
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/readyz")[0] == 200
    finally:
        service.close()

    malformed = generator.totals.malformed
    assert summary["dead_letters"] == dict(malformed)
    assert summary["held_out"] > 0, "the default [eval] keeps probes aside"
    assert summary["learned"] + summary["held_out"] == summary["join"]["matched"] > 0.85 * SPEC.requests
    accounted = (2 * summary["join"]["matched"] + summary["join_pending"]
                 + sum(summary["join"][k] for k in ("expired", "expired_feedback", "late", "duplicate", "evicted")))
    valid = sum(outcomes.get("ok", 0) for outcomes in summary["events"].values())
    assert accounted == valid

    metrics = samples(text)
    assert metrics[("streamlearn_examples_learned_total", (("model", "fraud"),))] == summary["learned"]
    assert metrics[("streamlearn_join_total", (("outcome", "matched"),))] == summary["join"]["matched"]
    dead = sum(v for (name, _), v in metrics.items() if name == "streamlearn_dead_letters_total")
    assert dead == sum(malformed.values())
    assert ("streamlearn_prequential_score", (("metric", "accuracy"), ("model", "fraud"), ("window", "1000"))) in metrics
    assert metrics[("streamlearn_loop_latency_seconds_count", (("model", "fraud"),))] == summary["learned"]
    assert metrics[("streamlearn_processing_seconds_count", (("model", "fraud"),))] == summary["learned"]
    for topic, outcomes in summary["events"].items():  # every message read, dead letters included
        assert metrics[("streamlearn_queueing_seconds_count", (("topic", topic),))] == sum(outcomes.values())

    letters = []
    for kind in ("inference-logs", "feedback"):
        expected = sum(1 for m in messages if m.malformed and m.topic == kind)
        if expected:
            letters += read_topic(broker.bootstrap_servers, topics[kind] + ".dlq", expected)
    reasons = Counter(dict(m.headers())["reason"].decode() for m in letters)
    assert reasons == Counter(malformed)
    originals = {m.value for m in messages if m.malformed}
    assert all(m.value() in originals for m in letters), "dead letters carry the original bytes"


def test_file_source_matches_kafka(broker, topics, traffic, tmp_path):
    _, messages = traffic
    sent = produce(broker.bootstrap_servers, topics, messages)
    kafka_service = Service(kafka_config(broker.bootstrap_servers, topics, metrics={"enabled": False}))
    from_kafka = kafka_service.run(until=consumed_all(sent))

    path = tmp_path / "events.jsonl"
    write_jsonl(messages, path)
    file_config = kafka_config(broker.bootstrap_servers, topics, metrics={"enabled": False})
    file_config.source = f"file:{path}"
    from_file = Service(file_config).run()

    assert from_file["learned"] == from_kafka["learned"]
    assert from_file["join"] == from_kafka["join"]
    assert from_file["dead_letters"] == from_kafka["dead_letters"]
    for metric, value in from_kafka["models"]["fraud"]["scores"].items():
        assert from_file["models"]["fraud"]["scores"][metric] == pytest.approx(value, rel=1e-9), metric
    dlq_lines = (tmp_path / "events.jsonl.dlq.jsonl").read_text().splitlines()
    assert len(dlq_lines) == sum(from_file["dead_letters"].values())


def test_kafka_python_client_learns_the_same(broker, topics, traffic):
    _, messages = traffic
    sent = produce(broker.bootstrap_servers, topics, messages)
    config = kafka_config(broker.bootstrap_servers, topics, kafka={"client": "kafka-python"},
                          intake={"mode": "inline"}, metrics={"enabled": False})
    summary = Service(config).run(until=consumed_all(sent))
    reference = TrafficGenerator(SPEC)
    list(reference.messages())
    assert summary["dead_letters"] == dict(reference.totals.malformed)
    assert summary["learned"] + summary["held_out"] == summary["join"]["matched"] > 0.85 * SPEC.requests


def test_sigterm_drains_commits_and_exits_zero(broker, topics, traffic, tmp_path):
    _, messages = traffic
    produce(broker.bootstrap_servers, topics, messages)
    config_path = tmp_path / "config.toml"
    config_path.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"
group_id = "sigterm-{topics['feedback']}"
session_timeout_ms = 6000
inference_topic = "{topics['inference-logs']}"
feedback_topic = "{topics['feedback']}"
examples_topic = "{topics['examples']}"
[intake]
max_message_bytes = {SPEC.max_message_bytes}
[models.fraud]
model = "logreg"
[metrics]
host = "127.0.0.1"
port = 0
""")
    process = subprocess.Popen([sys.executable, "-m", "streamlearn", "run", "--config", str(config_path)],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    port_line = wait_for(lambda: _metrics_line(process), what="the metrics endpoint line")
    port = int(port_line.rsplit(":", 1)[1].split("/")[0])
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, what="/readyz")
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=60)
    assert process.returncode == 0, log
    summary = json.loads((tmp_path / "state" / "summary.json").read_text())
    assert summary["learned"] > 0

    from confluent_kafka import Consumer, TopicPartition

    reader = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": f"sigterm-{topics['feedback']}"})
    committed = reader.committed([TopicPartition(*split_position(key)) for key in summary["offsets"]], timeout=10)
    reader.close()
    assert {f"{tp.topic}:{tp.partition}": tp.offset for tp in committed} == summary["offsets"], log


def _metrics_line(process) -> str | None:
    line = process.stderr.readline()
    return line.strip() if "metrics on http" in line else None


def test_bad_config_fails_with_one_line(tmp_path):
    config_path = tmp_path / "bad.toml"
    config_path.write_text("[join]\nttl = \"soon\"\n")
    result = subprocess.run([sys.executable, "-m", "streamlearn", "run", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["config error: join.ttl: Expected `float`, got `str`"]


def test_demo_acceptance():
    """The issue's acceptance line: `streamlearn demo --events 20000 --json`."""
    result = subprocess.run([sys.executable, "-m", "streamlearn", "demo", "--events", "20000", "--json",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["dead_letters"] == summary["malformed_sent"]
    assert summary["join_balance"]["valid_inputs"] == summary["join_balance"]["accounted"]
    assert summary["learned"] + summary["held_out"] == summary["join"]["matched"]
    assert set(summary["models"]) == {"fraud", "fraud_mlp"}   # River and torch, on the same requests
    for name, model in summary["models"].items():
        assert model["learned"] > 0.8 * summary["requests"], name
        assert model["accuracy_after_recovery"] >= model["accuracy_before_drift"] - 0.05, name
        # several evaluated segments, so a real figure (None while the stream is shorter than one segment)
        assert model["probe_segments"] >= 4 and isinstance(model["forgetting"], float), name
        # the traffic's event time is the wall clock: feedback to model updated takes well under a minute
        # (a demo stamped a year ago averaged 3.2e7 s here)
        latency = model["loop_latency_seconds"]
        assert 0 < latency["p50"] < 60 and 0 < latency["mean"] < 60, (name, latency)


def test_demo_stops_its_broker_on_ctrl_c():
    import re
    import socket

    process = subprocess.Popen([sys.executable, "-m", "streamlearn", "demo", "--events", "2000000",
                                "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    banner = process.stderr.readline()  # "broker HOST:PORT, metrics http://127.0.0.1:PORT/metrics; playing ..."
    broker_host, broker_port, metrics_port = re.match(r"broker (.+):(\d+), metrics http://.+:(\d+)/", banner).groups()

    def learning() -> bool:
        status, text = http_get(int(metrics_port), "/metrics")
        return status == 200 and any(name == "streamlearn_examples_learned_total" and value > 0
                                     for (name, _), value in samples(text).items())
    wait_for(learning, what="the demo to learn")

    def loop_latency() -> dict:   # the real endpoint's histogram, summed over the models
        status, text = http_get(int(metrics_port), "/metrics")
        figures = {name: sum(v for (n, _), v in samples(text).items() if n == name) if status == 200 else 0
                   for name in ("streamlearn_loop_latency_seconds_sum", "streamlearn_loop_latency_seconds_count")}
        return figures if figures["streamlearn_loop_latency_seconds_count"] > 0 else {}
    latency = wait_for(loop_latency, what="a loop latency on /metrics")
    mean = latency["streamlearn_loop_latency_seconds_sum"] / latency["streamlearn_loop_latency_seconds_count"]
    assert 0 < mean < 60, latency   # event time is the wall clock: seconds at most, not a year
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert "summary" in out

    def refused() -> bool:
        try:
            socket.create_connection((broker_host, int(broker_port)), timeout=1).close()
            return False
        except OSError:
            return True
    wait_for(refused, timeout=30, what="the embedded broker to stop")
