"""A JSONL file source: one event per line, read to the end, for backfills and tests.

A line's topic is told from its shape, as a producer would have chosen it: an
object with feedback (`label`, or a language model's `rating` or `correction`) is
a joined example if it has `features` or `messages` too, else feedback; anything
else (including a line that is not JSON or cannot be read) goes to the
inference-log decoder, which dead-letters it with the right reason if it is not
a valid log. Positions are line numbers.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
>>> _ = path.write_text('{"request_id": "r-1", "ts": 1, "label": 0}\\n')
>>> [(c.topic, c.next_offset) for c in FileSource(path, max_message_bytes=1024).poll(10, 0)]
[('feedback', 1)]
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from streamlearn.stream.events import EXAMPLES_TOPIC, FEEDBACK_TOPIC, INFERENCE_TOPIC
from streamlearn.stream.source import Chunk

_FEEDBACK_FIELDS = frozenset({"label", "rating", "correction"})
_INPUT_FIELDS = frozenset({"features", "messages"})   # what a model was given: a log's, or a joined example's


class FileSource:
    """Reads a JSONL file from a line position to its end."""

    def __init__(self, path: str | Path, max_message_bytes: int, start_line: int = 0) -> None:
        self.path = Path(path)
        self.key = f"file:{self.path}"
        self._max_bytes = max_message_bytes
        self._file = self.path.open("rb")
        self._line = 0
        self._eof = False
        while self._line < start_line and self._file.readline():
            self._line += 1

    def poll(self, max_records: int, timeout: float) -> list[Chunk]:
        chunks: dict[str, Chunk] = {}
        for _ in range(max_records):
            raw = self._file.readline()
            if not raw:
                self._eof = True
                break
            self._line += 1
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue  # blank lines are layout, not messages
            topic = self._topic_of(raw)
            chunk = chunks.get(topic)
            if chunk is None:
                chunk = chunks[topic] = Chunk(topic, self.key, [], [], 0)
            chunk.values.append(raw)
            chunk.offsets.append(self._line - 1)
        for chunk in chunks.values():
            chunk.next_offset = self._line
        return list(chunks.values())

    def _topic_of(self, raw: bytes) -> str:
        """The topic a line's shape names; a line that cannot be read goes to the log decoder, which names why."""
        if len(raw) > self._max_bytes:
            return INFERENCE_TOPIC
        try:
            event = _parse_leniently(raw)
        except Exception:   # noqa: BLE001 - not JSON to us (bad bytes, nested too deep, ...): one line, not the file
            return INFERENCE_TOPIC
        if isinstance(event, dict) and not _FEEDBACK_FIELDS.isdisjoint(event):
            return EXAMPLES_TOPIC if not _INPUT_FIELDS.isdisjoint(event) else FEEDBACK_TOPIC
        return INFERENCE_TOPIC

    def partitions(self) -> list[str]:
        return [self.key]

    def exhausted(self) -> bool:
        return self._eof

    def problem(self) -> str:
        return ""   # a file is read or it is missing (a config error at start)

    def caught_up(self) -> set[str]:
        return {self.key} if self._eof else set()

    def pause(self, keys: set[str]) -> None:
        pass  # one partition: never ahead of itself

    def resume(self, keys: set[str]) -> None:
        pass

    def commit(self, offsets: dict[str, int]) -> None:
        pass  # a file has no group; its position lives in the snapshot

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    def close(self) -> None:
        self._file.close()


def _parse_leniently(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:   # NaN, Infinity or 1e999: route the line, let the decoder name the reason
        return json.loads(raw)
