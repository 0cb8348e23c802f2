"""Dead-letter sinks: bad input is kept, with its original bytes and a reason, never dropped.

Kafka: `<topic>.dlq` with headers `reason`, `detail`, `topic`, `partition`, `offset`.
File source: `<file>.dlq.jsonl`, one JSON object per refused line.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Mapping, Protocol

import orjson

from streamlearn.config import KafkaConfig, Setting
from streamlearn.stream.decode import DeadLetter

log = logging.getLogger(__name__)


class DeadLetterSink(Protocol):
    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None: ...

    def flush(self) -> None:
        """Blocks until everything sent is durable (before offsets move past it)."""
        ...

    def close(self) -> None: ...


class FileDeadLetters:
    """Appends refused lines to `<file>.dlq.jsonl` (the original bytes base64-encoded)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab")

    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None:
        record = {"reason": letter.reason, "detail": letter.detail, "topic": topic, "line": offset + 1,
                  "raw_b64": base64.b64encode(raw).decode()}
        self._file.write(orjson.dumps(record) + b"\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class KafkaDeadLetters:
    """Produces refused messages to `<topic>.dlq` through the configured client."""

    def __init__(self, config: KafkaConfig, settings: Mapping[str, Setting]) -> None:
        self._confluent = config.client == "confluent-kafka"
        if self._confluent:
            from confluent_kafka import Producer

            self._producer = Producer({"bootstrap.servers": config.bootstrap_servers, "linger.ms": 50, **settings})
        else:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(bootstrap_servers=config.bootstrap_servers, linger_ms=50, **settings)

    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None:
        headers = [("reason", letter.reason.encode()), ("detail", letter.detail[:500].encode()),
                   ("topic", topic.encode()), ("partition", partition.rpartition(":")[2].encode()),
                   ("offset", str(offset).encode())]
        if self._confluent:
            self._produce_confluent(f"{topic}.dlq", raw, headers)
        else:
            self._producer.send(f"{topic}.dlq", value=raw, headers=headers).add_errback(_report_failure)

    def _produce_confluent(self, topic: str, raw: bytes, headers: list) -> None:
        while True:
            try:
                self._producer.produce(topic, value=raw, headers=headers, on_delivery=_report_failure)
                break
            except BufferError:  # the local queue is full: wait for deliveries rather than drop one
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self.flush()
        if hasattr(self._producer, "close"):  # stop the client now, not at garbage collection (older confluent-kafka has no close)
            self._producer.close()


def _report_failure(err, msg=None) -> None:
    if err is not None:  # confluent calls back on success too, with err None
        log.error("dead letter could not be produced: %s", err)
