"""Dead letters exactly once: SIGKILLs at random moments, restarts, and each bad message is in the DLQ once.

The messages after the last snapshot are read again after a crash, and so are their dead letters: the
restarted intake reads the dead-letter topics' tail after the snapshot's mark and does not send those
again (streamlearn/stream/dead_letters.py).
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter

from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec
from streamlearn.stream.dead_letters import FileDeadLetters, letter_key
from streamlearn.stream.decode import DeadLetter
from streamlearn.testing import kafka_toml
from tests.conftest import wait_for
from tests.test_crash_recovery import learned_ids, play, start

SPEC = TrafficSpec(requests=1500, seed=23, model="fraud", malformed_rate=0.06, max_message_bytes=65_536)
KILLS = 5


def write_config(path, state_dir, topics: dict[str, str], bootstrap: str) -> None:
    path.write_text(f"""
source = "kafka"
state_dir = "{state_dir}"
{kafka_toml(bootstrap, f"dlq-{topics['feedback']}", topics)}[kafka.settings]
"group.instance.id" = "dlq-test"
[intake]
batch_size = 50
max_message_bytes = {SPEC.max_message_bytes}
[snapshot]
every_examples = 100
every_seconds = 0.5
audit_log = "{state_dir}/learned.log"
[models.fraud]
model = "logreg"
[metrics]
enabled = false
""")


def dead_letter_keys(bootstrap: str, topics: list[str]) -> Counter:
    """Every key in the dead-letter topics, counted."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(t, 0, 0) for t in topics])
    keys: Counter = Counter()
    while batch := consumer.consume(1000, 3.0):
        keys.update(m.key().decode() for m in batch if m.error() is None)
    consumer.close()
    return keys


def test_sigkills_leave_each_bad_message_in_the_dead_letter_topic_once(broker, tmp_path, running):
    names = {kind: f"d{uuid.uuid4().hex[:8]}-{kind}" for kind in ("inference-logs", "feedback")}
    broker.create_topics(names.values(), partitions=1)
    dlq = [n + ".dlq" for n in names.values()]
    broker.create_topics(dlq, partitions=1)
    messages = list(TrafficGenerator(SPEC).messages())
    expected: set[str] = set()
    offsets: Counter = Counter()
    for m in messages:   # one partition per topic: a message's offset is its place among its topic's messages
        if m.malformed:
            expected.add(letter_key(f"{names[m.topic]}:0", offsets[m.topic]))
        offsets[m.topic] += 1
    assert len(expected) > 50

    state_dir, config_path = tmp_path / "state", tmp_path / "service.toml"
    write_config(config_path, state_dir, names, broker.bootstrap_servers)
    producer = threading.Thread(target=play, args=(broker.bootstrap_servers, names, messages, 45.0))
    producer.start()
    rng = random.Random(7)
    audit = state_dir / "learned.log"
    kills = 0
    for kill in range(KILLS):
        started = time.time()
        process = start(config_path, running)
        # Restore cuts the audit log back to the snapshot: then kill once learning has resumed, at a random moment.
        wait_for(lambda: audit.exists() and audit.stat().st_mtime > started, timeout=120, what="the restore")
        restored = len(learned_ids(state_dir))
        wait_for(lambda: len(learned_ids(state_dir)) > restored or process.poll() is not None
                 or not producer.is_alive(), timeout=120, what=f"learning to resume before kill {kill + 1}")
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += producer.is_alive()   # a kill after the last message is produced would test less
    producer.join()
    assert kills >= KILLS - 1

    process = start(config_path, running)
    wait_for(lambda: set(dead_letter_keys(broker.bootstrap_servers, dlq)) >= expected, timeout=120,
             what="every bad message dead-lettered")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0

    keys = dead_letter_keys(broker.bootstrap_servers, dlq)
    assert set(keys) == expected
    assert [k for k, n in keys.items() if n > 1] == [], "a bad message was dead-lettered twice"


def test_a_file_sink_drops_a_line_cut_short_by_a_crash_and_skips_what_it_delivered(tmp_path):
    path = tmp_path / "events.jsonl.dlq.jsonl"
    sink = FileDeadLetters(path)
    sink.send("inference-logs", "file:events.jsonl", 0, b"{", DeadLetter("invalid_json", "x"))
    sink.flush()
    mark = sink.ends()
    sink.send("inference-logs", "file:events.jsonl", 4, b"[]", DeadLetter("not_object", "x"))
    sink.close()
    with path.open("ab") as file:
        file.write(b'{"key": "file:events.jsonl@9", "reas')   # kill -9 in the middle of a write

    again = FileDeadLetters(path)
    assert again.skip_delivered(mark) == 1   # line 5's letter came after the snapshot's mark
    for line in (4, 9):                      # the replay reads lines 5 and 10 again
        again.send("inference-logs", "file:events.jsonl", line, b"?", DeadLetter("schema", "x"))
    again.close()
    lines = path.read_bytes().splitlines()
    assert [line.split(b'"')[3] for line in lines] == [b"file:events.jsonl@0", b"file:events.jsonl@4",
                                                       b"file:events.jsonl@9"]
