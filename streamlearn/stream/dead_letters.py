"""Dead-letter sinks: bad input is kept, with its original bytes and a reason, never dropped and never twice.

Every dead letter has a key naming what it refuses: `topic:partition@offset` for a message of the
source (`file:PATH@line` for a file), `learn_error:MODEL:ID` for an example a model refused. After a
crash the messages after the last snapshot are read again, and with them come their dead letters. So
a snapshot keeps where the sink's output ended (`ends()`, in the intake's state), and on restore the
sink reads what was delivered after that mark (`skip_delivered`) and sends none of those keys again:
after any number of kill -9s each bad message is dead-lettered exactly once. No Kafka transactions
are needed (the embedded broker does not honour them).

Kafka: `<topic>.dlq`, message key = the dead letter's key, headers `reason`, `detail`, `topic`,
`partition`, `offset` (and `truncated_from`, the original size, when the bytes were cut to
`MAX_LETTER_BYTES`). File source: `<file>.dlq.jsonl`, one JSON object per refused line.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl.dlq.jsonl"
>>> sink = FileDeadLetters(path)
>>> sink.send("feedback", "file:events.jsonl", 6, b"{broken", DeadLetter("invalid_json", "truncated"))
>>> sink.flush()
True
>>> mark = sink.ends(); sink.close()
>>> again = FileDeadLetters(path)          # a restart that replays line 7 from an older snapshot
>>> again.skip_delivered({"bytes": 0})
1
>>> again.send("feedback", "file:events.jsonl", 6, b"{broken", DeadLetter("invalid_json", "truncated"))
>>> again.close(); len(path.read_text().splitlines())
1
"""

from __future__ import annotations

import base64
import itertools
import logging
import time
from pathlib import Path
from typing import Mapping, Optional, Protocol

import orjson

from streamlearn.config import KafkaConfig, Setting
from streamlearn.stream.broker_watch import client_callbacks
from streamlearn.stream.decode import DeadLetter
from streamlearn.stream.producer import Producer

log = logging.getLogger(__name__)
# Reading the dead-letter topics' tail ends when the broker has had nothing more for this long. (The
# embedded broker undercounts high watermarks, so "position >= end offset" cannot tell the end.)
TAIL_QUIET_SECONDS = 1.0
# How long a restarting intake keeps trying to read that tail while the broker cannot be reached.
TAIL_PATIENCE_SECONDS = 60.0
# A dead letter's bytes are cut to this size: a `too_large` message (up to intake.max_message_bytes, 1 MiB by
# default) would be over both clients' default request limit (1,000,000 bytes) and the broker's, and fail to send.
MAX_LETTER_BYTES = 512 * 1024


def letter_key(partition: str, offset: int) -> str:
    """The key of a source message's dead letter: its position, `topic:partition@offset`."""
    return f"{partition}@{offset}"


class DeadLetterSink(Protocol):
    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter,
             key: Optional[str] = None) -> None:
        """Dead-letters `raw` (message `offset` of `partition` of `topic`), unless `key` was delivered already."""
        ...

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Blocks until everything sent is durable (or `timeout`); True when it is."""
        ...

    def ends(self) -> dict[str, int]:
        """Where the sink's output ends now (after a flush): the mark a snapshot keeps."""
        ...

    def skip_delivered(self, since: Optional[Mapping[str, int]]) -> int:
        """Reads the keys delivered after the mark `since` (None: all) and will not send them again; how many."""
        ...

    def close(self) -> None: ...


class _KeyedSink:
    """What both sinks share: a dead letter's key, and the keys a restore found delivered already."""

    def __init__(self) -> None:
        self._delivered: set[str] = set()

    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter,
             key: Optional[str] = None) -> None:
        key = key or letter_key(partition, offset)
        if key not in self._delivered:
            self._write(key, topic, partition, offset, raw, letter)

    def _write(self, key: str, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None:
        raise NotImplementedError


class FileDeadLetters(_KeyedSink):
    """Appends refused lines to `<file>.dlq.jsonl` (the original bytes base64-encoded)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._file = path.open("ab")

    def _write(self, key: str, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None:
        record = {"key": key, "reason": letter.reason, "detail": letter.detail, "topic": topic, "line": offset + 1,
                  "raw_b64": base64.b64encode(raw).decode()}
        self._file.write(orjson.dumps(record) + b"\n")

    def flush(self, timeout: Optional[float] = None) -> bool:
        self._file.flush()
        return True

    def ends(self) -> dict[str, int]:
        return {"bytes": self._file.tell()}

    def skip_delivered(self, since: Optional[Mapping[str, int]]) -> int:
        self._file.flush()
        with self.path.open("r+b") as file:
            file.seek((since or {}).get("bytes", 0))
            tail = file.read()
            complete = tail.rfind(b"\n") + 1
            if complete < len(tail):  # a line cut short by a crash was never a dead letter: drop it
                file.truncate(file.tell() - len(tail) + complete)
        self._file.seek(0, 2)
        for line in tail[:complete].splitlines():
            try:
                self._delivered.add(orjson.loads(line)["key"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue   # written before dead letters had keys
        return len(self._delivered)

    def close(self) -> None:
        self._file.close()


class KafkaDeadLetters(_KeyedSink):
    """Produces refused messages to `<topic>.dlq` through the configured client."""

    def __init__(self, config: KafkaConfig, settings: Mapping[str, Setting], topics: list[str]) -> None:
        super().__init__()
        self._config = config
        self._settings = dict(settings)
        self._topics = [f"{t}.dlq" for t in topics]
        self._producer = Producer(config, settings, "dead letter")

    def _write(self, key: str, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None:
        headers = [("reason", letter.reason.encode()), ("detail", letter.detail[:500].encode()),
                   ("topic", topic.encode()), ("partition", partition.rpartition(":")[2].encode()),
                   ("offset", str(offset).encode())]
        if len(raw) > MAX_LETTER_BYTES:
            headers.append(("truncated_from", str(len(raw)).encode()))
            raw = raw[:MAX_LETTER_BYTES]
        self._producer.send(f"{topic}.dlq", raw, key=key.encode(), headers=headers)

    def flush(self, timeout: Optional[float] = None) -> bool:
        return self._producer.flush(timeout)

    def ends(self) -> dict[str, int]:
        return dict(self._producer.ends)

    def skip_delivered(self, since: Optional[Mapping[str, int]]) -> int:
        deadline = time.monotonic() + TAIL_PATIENCE_SECONDS
        for attempt in itertools.count():
            try:
                self._delivered |= _read_keys(self._config, self._settings, self._topics, since)
                return len(self._delivered)
            except Exception as err:   # the broker is not reachable yet: the intake could not read either
                if attempt == 0:
                    log.warning("cannot read the dead-letter topics yet (%s); retrying for up to %.0f s",
                                err, TAIL_PATIENCE_SECONDS)
                if time.monotonic() > deadline:
                    log.warning("could not read the dead-letter topics (%s): dead letters of messages read again "
                                "after this restart may be sent twice", err)
                    return len(self._delivered)
                time.sleep(1.0)

    def close(self) -> None:
        self._producer.close()


def _read_keys(config: KafkaConfig, settings: dict, topics: list[str], since: Optional[Mapping[str, int]]) -> set[str]:
    """The keys of every message in `topics` from the mark `since` (None: from the beginning) to the end."""
    if config.client == "confluent-kafka":
        return _read_keys_confluent(config.bootstrap_servers, settings, topics, since)
    return _read_keys_kafka_python(config.bootstrap_servers, settings, topics, since)


def _read_keys_confluent(bootstrap: str, settings: dict, topics: list[str], since) -> set[str]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    # Assigned, never subscribed: the group id is required by the client but no group is joined.
    _, callbacks = client_callbacks(bootstrap, "dead-letter reader", stats=False)   # its retries: one log line
    consumer = Consumer({"bootstrap.servers": bootstrap, **settings, "group.id": "streamlearn-dead-letter-reader",
                         "enable.auto.commit": False, **callbacks})
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [TopicPartition(t, p, (since or {}).get(f"{t}:{p}", OFFSET_BEGINNING if since is None else 0))
                      for t in topics if t in metadata.topics and metadata.topics[t].error is None
                      for p in metadata.topics[t].partitions]
        keys: set[str] = set()
        if not partitions:
            return keys
        consumer.assign(partitions)
        while batch := consumer.consume(1000, TAIL_QUIET_SECONDS):
            for msg in batch:
                if msg.error() is None and msg.key():
                    keys.add(msg.key().decode(errors="replace"))
                elif msg.error() is not None and msg.error().fatal():
                    raise KafkaException(msg.error())
        return keys
    finally:
        consumer.close()


def _read_keys_kafka_python(bootstrap: str, settings: dict, topics: list[str], since) -> set[str]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **settings)
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        keys: set[str] = set()
        if not partitions:
            return keys
        consumer.assign(partitions)
        for tp in partitions:
            if since is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, since.get(f"{tp.topic}:{tp.partition}", 0))
        while records := consumer.poll(timeout_ms=int(TAIL_QUIET_SECONDS * 1000), max_records=1000):
            keys.update(r.key.decode(errors="replace") for batch in records.values() for r in batch if r.key)
        return keys
    finally:
        consumer.close()
