"""Broker outages: a paused broker and one stopped and started again on the same port.

The service keeps running, `/readyz` says what is wrong and `/healthz` that the loop still
turns, the client's retries make one log line instead of a flood, it reconnects by itself,
and the examples learned equal an uninterrupted run's (nothing lost, nothing twice). A
SIGTERM to the whole process group, as a container runtime or a shell sends it, ends a run
cleanly in every state. Each test has a broker of its own (`own_broker`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from streamlearn.config import load_config
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec, write_jsonl
from streamlearn.service import Service
from streamlearn.testing import kafka_toml
from tests.conftest import http_get, wait_for

SPEC = TrafficSpec(requests=1000, seed=13, model="fraud", max_message_bytes=65_536)
PAUSE_SECONDS = 30.0
TOPICS = {"inference-logs": "outage-inference-logs", "feedback": "outage-feedback"}


def write_config(path, state_dir, bootstrap: str, source: str = "kafka") -> None:
    path.write_text(f"""
source = "{source}"
state_dir = "{state_dir}"
seed = 3
{kafka_toml(bootstrap, "outage", TOPICS)}[join]
ttl = 600.0
early_ttl = 60.0
[intake]
batch_size = 50
max_message_bytes = {SPEC.max_message_bytes}
[snapshot]
every_examples = 100
every_seconds = 1.0
audit_log = "{state_dir}/learned.log"
[models.fraud]
model = "logreg"
[metrics]
host = "127.0.0.1"
port = 0
""")


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """The messages, and the ids an uninterrupted run learns from them (the same stream read from a file)."""
    messages = list(TrafficGenerator(SPEC).messages())
    folder = tmp_path_factory.mktemp("reference")
    write_jsonl(messages, folder / "stream.jsonl")
    write_config(folder / "reference.toml", folder / "state", "127.0.0.1:1", f"file:{folder / 'stream.jsonl'}")
    reference = Service(load_config(folder / "reference.toml", env={}))
    reference.run()
    reference.close()
    expected = learned_ids(folder / "state")
    assert len(expected) == len(set(expected)) > 0.8 * SPEC.requests
    return messages, expected


def create_topics(broker) -> None:
    broker.create_topics(TOPICS.values(), partitions=1)
    broker.create_topics([n + ".dlq" for n in TOPICS.values()], partitions=1)


def produce(bootstrap: str, messages) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 1 << 20})
    for m in messages:
        producer.produce(TOPICS[m.topic], value=m.value, key=m.key, partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0


def learned_ids(state_dir) -> list[str]:
    path = state_dir / "learned.log"
    return path.read_text().split() if path.exists() else []


class Running:
    """`streamlearn run` in a session of its own (so a signal can go to its whole group), stderr in a file."""

    def __init__(self, config_path) -> None:
        self.log = config_path.parent / "service.log"
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "streamlearn", "run", "--config", str(config_path)],
                                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        self.port = int(wait_for(lambda: re.findall(r"metrics on http://[\d.]+:(\d+)/", self.text()), timeout=60,
                                 what="the metrics line")[0])

    def text(self) -> str:
        return self.log.read_text()

    def probe(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def terminate_group(self, timeout: float = 60.0) -> int:
        """SIGTERM to the service and its intake process at once; the exit code."""
        os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def service(tmp_path, own_broker):
    """Starts the service on `own_broker` (call it with no arguments); killed at the end, its log printed."""
    started: list[Running] = []
    config_path = tmp_path / "service.toml"
    write_config(config_path, tmp_path / "state", own_broker.bootstrap_servers)

    def start() -> Running:
        started.append(Running(config_path))
        return started[-1]

    yield start
    for running in started:
        running.kill()
        print(f"--- service log (exit {running.process.returncode}) ---\n{running.text()[-4000:]}")  # on failure


def unreachable(running: Running, address: str) -> str:
    """/readyz's reason once it names the broker unreachable ("" before), checking /healthz stays ok meanwhile."""
    status, reason = running.probe("/readyz")
    if status == 503 and f"broker {address} unreachable" in reason:
        health, text = running.probe("/healthz")
        assert health == 200 and "unreachable" in text, text
        return reason
    return ""


def assert_clean_exit(running: Running) -> None:
    text = running.text()
    assert "Traceback" not in text, text[-3000:]
    assert "%3|" not in text and "rdkafka#" not in text.replace("kafka client:", ""), "librdkafka wrote to stderr"
    lines = [line for line in text.splitlines() if "snapshotter" not in line]   # one a second: every_seconds
    assert len(lines) < 25, "\n".join(lines[-40:])


def test_broker_paused_30s_nothing_lost_nothing_twice(own_broker, service, stream, tmp_path):
    messages, expected = stream
    create_topics(own_broker)
    half = len(messages) // 2
    produce(own_broker.bootstrap_servers, messages[:half])
    running = service()
    wait_for(lambda: learned_ids(tmp_path / "state"), timeout=120, what="learning to start")

    own_broker.pause()
    paused_at = time.monotonic()
    try:
        reason = wait_for(lambda: unreachable(running, own_broker.bootstrap_servers), timeout=PAUSE_SECONDS - 5,
                          what="/readyz to say the broker is unreachable")
        assert "retrying" in reason
        time.sleep(max(0.0, PAUSE_SECONDS - (time.monotonic() - paused_at)))   # the outage itself, not a wait
        assert running.process.poll() is None
    finally:
        own_broker.resume()
    wait_for(lambda: running.probe("/readyz")[0] == 200, timeout=120, what="/readyz after the broker answers again")
    produce(own_broker.bootstrap_servers, messages[half:])
    wait_for(lambda: len(learned_ids(tmp_path / "state")) >= len(expected), timeout=180, what="the whole stream")

    assert running.terminate_group() == 0
    got = learned_ids(tmp_path / "state")
    assert len(got) == len(set(got)), "an example was learned twice"
    assert sorted(got) == sorted(expected), "an example was lost"
    assert_clean_exit(running)
    log = running.text()
    assert log.count("unreachable (") == 1 and "answers again" in log, log   # the consumer's one line each way


def test_broker_stopped_and_started_on_the_same_port(own_broker, service, stream, tmp_path):
    """Tansu keeps no data across a restart (memory storage): the broker goes away before the stream is produced."""
    messages, expected = stream
    create_topics(own_broker)
    running = service()
    wait_for(lambda: running.probe("/readyz")[0] == 200, timeout=120, what="/readyz")

    own_broker.stop()
    reason = wait_for(lambda: unreachable(running, own_broker.bootstrap_servers), timeout=60,
                      what="/readyz to say the broker is unreachable")
    assert "Connection refused" in reason
    own_broker.start()   # the same port
    create_topics(own_broker)
    produce(own_broker.bootstrap_servers, messages)
    wait_for(lambda: len(learned_ids(tmp_path / "state")) >= len(expected), timeout=180, what="the whole stream")

    assert running.terminate_group() == 0
    got = learned_ids(tmp_path / "state")
    assert len(got) == len(set(got)), "an example was learned twice"
    assert sorted(got) == sorted(expected), "an example was lost"
    assert_clean_exit(running)


def test_sigterm_to_the_group_while_the_broker_is_unreachable(own_broker, service):
    create_topics(own_broker)
    running = service()
    wait_for(lambda: running.probe("/readyz")[0] == 200, timeout=120, what="/readyz")
    own_broker.stop()
    wait_for(lambda: unreachable(running, own_broker.bootstrap_servers), timeout=60, what="the outage to be seen")
    assert running.terminate_group() == 0
    assert_clean_exit(running)
    assert "signal 15" in running.text()


def test_sigterm_to_the_group_while_starting(own_broker, service):
    create_topics(own_broker)
    own_broker.stop()   # the intake cannot start: it waits for the broker
    running = service()
    started = time.monotonic()
    assert running.terminate_group() == 0
    assert time.monotonic() - started < 30
    assert_clean_exit(running)
