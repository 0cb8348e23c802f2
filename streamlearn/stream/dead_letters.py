"""Dead-letter sinks: bad input is kept, with its original bytes and a reason, never dropped.

Kafka: `<topic>.dlq` with headers `reason`, `detail`, `topic`, `partition`, `offset`.
File source: `<file>.dlq.jsonl`, one JSON object per refused line.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Mapping, Protocol

import orjson

from streamlearn.config import KafkaConfig, Setting
from streamlearn.stream.decode import DeadLetter
from streamlearn.stream.producer import Producer


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
        self._producer = Producer(config, settings, "dead letter")

    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter) -> None:
        headers = [("reason", letter.reason.encode()), ("detail", letter.detail[:500].encode()),
                   ("topic", topic.encode()), ("partition", partition.rpartition(":")[2].encode()),
                   ("offset", str(offset).encode())]
        self._producer.send(f"{topic}.dlq", raw, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()
