"""In-memory stand-ins for a broker: a `Source` with end-of-input and crash markers, and a dead-letter sink.

`MemorySource` holds the messages of several `topic:partition` keys in memory and hands
them to an `Intake` as the Kafka sources do (chunks of one partition, offsets, pause and
resume, caught up, lag), so tests and docstring examples need neither a broker nor a file.
A message is given as bytes (hostile ones too), a dict, or an event-contract record
(`InferenceLog`, `Feedback`, `LabeledExample`), encoded to JSON as a producer would.
Two markers steer a run, as bytewax's `TestingSource` does:

- `EOF()`: the partition's input ends here for this run, as it does at the end of its
  items. When every partition has ended, the source is `exhausted()` (like the end of a
  file) and the intake sends its final batch. A source started past the marker reads on
  after it. (With `follow=True` only an EOF ends a partition: at the end of its items it
  is caught up, as a Kafka partition is, until `extend` brings more.)
- `ABORT()`: the first poll that reaches it raises `SourceAborted` (a crash). The marker
  remembers that it fired: a new source over the same lists, started from a snapshot's
  offsets, passes it by, so a test can crash a run mid-stream and resume it.

Every item, marker or message, takes one offset (as Kafka's transaction markers do), so
offsets are the list indices to read next. `MemoryDeadLetters` keeps dead letters in a
list that outlives the intake (as a topic outlives its producer): hand the same sink to
the intake of the resumed run and it sends none of the letters delivered after the
snapshot's mark again. `memory_intake` builds an `Intake` from a `Config` over both.

>>> from streamlearn.config import parse_config
>>> config = parse_config({"intake": {"batch_size": 1}}, env={})
>>> crash = ABORT()
>>> feed = {"inference-logs:0": [{"request_id": "r-1", "ts": 1, "features": {"x": 1}},
...                              {"request_id": "r-2", "ts": 3, "features": {"x": 2}}, EOF()],
...         "feedback:0": [{"request_id": "r-1", "ts": 2, "label": 1},
...                        {"request_id": "r-2", "ts": 4, "label": 0}, crash, EOF()]}
>>> intake, learned = memory_intake(config, MemorySource(feed)), []
>>> intake.barrier_requested = True          # what a snapshot asks for: the intake's state at the next cut
>>> try:
...     for batch in intake.batches():
...         learned += [e.id for e in batch.examples]
...         if batch.barrier:
...             snapshot = (list(learned), Resume(batch.offsets, batch.barrier))
... except SourceAborted as crashed:
...     print(crashed)
memory source crashed at feedback:0@2 (ABORT marker)
>>> learned, resume = snapshot               # back to the snapshot, as a restarted service would be
>>> again = memory_intake(config, MemorySource(feed, start=resume.offsets), resume=resume)
>>> learned + [e.id for batch in again.batches() for e in batch.examples]
['r-1', 'r-2']
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Mapping, Optional, Union

import msgspec
import orjson

from streamlearn.config import Config
from streamlearn.stream.dead_letters import letter_key
from streamlearn.stream.decode import DeadLetter
from streamlearn.stream.intake import Intake, Resume
from streamlearn.stream.source import Chunk, split_position

__all__ = ["ABORT", "EOF", "Letter", "MemoryDeadLetters", "MemorySource", "Resume", "SourceAborted",
           "encode_message", "kafka_toml", "memory_intake"]


class EOF:
    """Marker: this partition's input ends here (for this run); every partition at one: the source is exhausted."""

    def __repr__(self) -> str:
        return "EOF()"


class ABORT:
    """Marker: the first poll that reaches it raises `SourceAborted`; after that it is passed by."""

    def __init__(self) -> None:
        self.fired = False   # on the marker, not the source: a resumed run over the same lists skips it

    def __repr__(self) -> str:
        return f"ABORT(fired={self.fired})"


class SourceAborted(RuntimeError):
    """The run reached an `ABORT` marker: a crash, as if the process had been killed there."""


Message = Union[bytes, bytearray, dict, msgspec.Struct]
Item = Union[Message, EOF, ABORT]


def encode_message(message: Message) -> bytes:
    """The wire bytes of a message: bytes as given, a dict or an event record as the JSON a producer sends.

    JSON encoders write a NaN as `null`: give a message that no encoder would write (NaN, bad UTF-8) as bytes.
    """
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    if isinstance(message, msgspec.Struct):
        return msgspec.json.encode(message)
    if isinstance(message, dict):
        return orjson.dumps(message)
    raise TypeError(f"a message is bytes, a dict or an event record, not {type(message).__name__}")


class _Partition:
    """One partition's items and the offset to read next."""

    def __init__(self, key: str, start: int, follow: bool) -> None:
        self.key = key
        self.topic = split_position(key)[0]
        self.items: list[Union[bytes, EOF, ABORT]] = []
        self.next = start
        self.follow = follow
        self.at_eof = False   # read up to an EOF in this run

    @property
    def ended(self) -> bool:
        """No more input in this run: an EOF was read, or (not following) the items ran out."""
        return self.at_eof or (not self.follow and self.next >= len(self.items))

    def extend(self, items: Iterable[Item]) -> None:
        for item in items:
            try:
                self.items.append(item if isinstance(item, (EOF, ABORT)) else encode_message(item))
            except TypeError as err:
                raise TypeError(f"{self.key}@{len(self.items)}: {err}") from None

    def ready(self) -> bool:
        """Something to read now: a message, a marker to pass or a crash to raise."""
        return not self.ended and self.next < len(self.items)

    def at_crash(self) -> bool:
        item = self.items[self.next] if self.ready() else None
        return isinstance(item, ABORT) and not item.fired

    def read(self, limit: int) -> Optional[Chunk]:
        """Up to `limit` messages from `next`, stopping after an EOF or before an ABORT that has not fired."""
        start, values, offsets = self.next, [], []
        while self.ready() and len(values) < limit and not self.at_crash():
            item = self.items[self.next]
            self.next += 1
            if isinstance(item, EOF):
                self.at_eof = True
            elif isinstance(item, bytes):
                values.append(item)
                offsets.append(self.next - 1)
        if self.next == start:
            return None
        # Markers alone still move the position (an empty chunk), so a snapshot after them starts past them.
        return Chunk(self.topic, self.key, values, offsets, self.next)


class MemorySource:
    """A `Source` over in-memory partitions (`"topic:partition"` -> items), with `EOF` and `ABORT` markers.

    `start` gives each key's offset to read first (a snapshot's offsets; 0 for keys not in it).
    `follow`: a partition at the end of its items waits for more (Kafka) instead of ending (a file).
    `per_poll` caps the messages one poll takes from one partition (default: `max_records`), so that
    partitions interleave as a broker's fetches do. A poll with nothing to read waits up to its
    timeout, as a consumer's long poll does, or until `extend` brings more.
    """

    def __init__(self, partitions: Mapping[str, Iterable[Item]], start: Optional[Mapping[str, int]] = None,
                 per_poll: Optional[int] = None, follow: bool = False) -> None:
        self._parts: dict[str, _Partition] = {}
        self._start = dict(start or {})
        self._per_poll = per_poll
        self._follow = follow
        self._paused: set[str] = set()
        self._problem = ""
        self._crashed = ""
        self._closed = False
        self._more = threading.Condition()
        self.committed: dict[str, int] = {}   # what the intake committed (for assertions)
        for key, items in partitions.items():
            self.extend(key, items)

    def extend(self, key: str, items: Iterable[Item]) -> None:
        """Appends items to a partition (a new key: a partition newly assigned) and wakes a waiting poll."""
        with self._more:
            part = self._parts.get(key)
            if part is None:
                try:
                    split_position(key)
                except ValueError:
                    raise ValueError(f"partition key {key!r}: expected 'topic:partition', e.g. 'feedback:0'") from None
                part = self._parts[key] = _Partition(key, self._start.get(key, 0), self._follow)
            part.extend(items)
            self._more.notify_all()

    def poll(self, max_records: int, timeout: float) -> list[Chunk]:
        """The next messages of the unpaused partitions, in key order; raises `SourceAborted` at a fresh ABORT."""
        with self._more:
            self._check_open()
            live = [p for key, p in sorted(self._parts.items()) if key not in self._paused]
            if not any(p.ready() for p in live) and not self.exhausted():
                self._more.wait_for(lambda: any(p.ready() for p in live) or self._closed, timeout)
                self._check_open()
            for part in live:
                if part.at_crash():
                    self._crash(part)
            chunks, room = [], max_records
            for part in live:
                if room <= 0:
                    break
                chunk = part.read(min(room, self._per_poll or room))
                if chunk is not None:
                    chunks.append(chunk)
                    room -= len(chunk.values)
            return chunks

    def _crash(self, part: _Partition) -> None:
        part.items[part.next].fired = True
        self._crashed = f"memory source crashed at {part.key}@{part.next} (ABORT marker)"
        raise SourceAborted(self._crashed)

    def _check_open(self) -> None:
        if self._crashed:   # a crashed run stays crashed: resume with a new source from the snapshot's offsets
            raise SourceAborted(self._crashed)
        if self._closed:
            raise RuntimeError("memory source is closed")

    def partitions(self) -> list[str]:
        return sorted(self._parts)

    def exhausted(self) -> bool:
        """True once every partition has ended (an EOF marker, or the end of its items unless following)."""
        return all(p.ended for p in self._parts.values())

    def caught_up(self) -> set[str]:
        """The partitions with nothing left to read now: ended, or at the end of their items."""
        return {key for key, p in self._parts.items() if not p.ready()}

    def pause(self, keys: set[str]) -> None:
        self._paused |= keys & set(self._parts)

    def resume(self, keys: set[str]) -> None:
        self._paused -= keys

    def paused(self) -> set[str]:
        """The partitions the intake paused (they ran ahead in event time)."""
        return set(self._paused)

    def commit(self, offsets: dict[str, int]) -> None:
        self.committed.update({k: v for k, v in offsets.items() if k in self._parts})

    def lag(self) -> dict[tuple[str, int], int]:
        """Per partition, the offsets not read yet (markers included, as Kafka counts its control records)."""
        return {split_position(key): max(0, len(p.items) - p.next) for key, p in self._parts.items()}

    def set_problem(self, text: str) -> None:
        """What `problem()` says from now on (e.g. an outage, for `/readyz`); "" for none."""
        self._problem = text

    def problem(self) -> str:
        return self._problem

    def close(self) -> None:
        with self._more:
            self._closed = True
            self._more.notify_all()


class Letter(msgspec.Struct, frozen=True):
    """One dead letter as `MemoryDeadLetters` keeps it: what it refuses, why, and the original bytes."""

    key: str
    topic: str
    partition: str
    offset: int
    raw: bytes
    reason: str
    detail: str


class MemoryDeadLetters:
    """A dead-letter sink in a list, with the sinks' rule: a key delivered after the snapshot's mark is not sent again.

    Give the same sink to a restarted intake (a topic outlives its producer); `close()` keeps the letters.
    """

    def __init__(self) -> None:
        self.letters: list[Letter] = []
        self._delivered: set[str] = set()

    def send(self, topic: str, partition: str, offset: int, raw: bytes, letter: DeadLetter,
             key: Optional[str] = None) -> None:
        key = key or letter_key(partition, offset)
        if key not in self._delivered:
            self.letters.append(Letter(key, topic, partition, offset, bytes(raw), letter.reason, letter.detail))

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True   # a list append is as durable as this sink gets

    def ends(self) -> dict[str, int]:
        return {"letters": len(self.letters)}

    def skip_delivered(self, since: Optional[Mapping[str, int]]) -> int:
        start = 0 if since is None else since.get("letters", 0)
        self._delivered.update(letter.key for letter in self.letters[start:])
        return len(self._delivered)

    def close(self) -> None:
        pass   # the letters stay readable, and the sink usable by the next run's intake


def memory_intake(config: Config, source: MemorySource, dead_letters: Optional[MemoryDeadLetters] = None,
                  resume: Optional[Resume] = None, clock: Callable[[], float] = time.monotonic) -> Intake:
    """An `Intake` over an in-memory source and dead-letter sink (a new one unless given), set up from `config`.

    The partition keys' topics are read as `open_intake` reads Kafka's: the configured topic names
    (`kafka.inference_topic`, ...) or the contract's own (`inference-logs`, `feedback`, `examples`).
    """
    return Intake(config, source, dead_letters if dead_letters is not None else MemoryDeadLetters(),
                  clock=clock, resume=resume)


def kafka_toml(bootstrap: str, group: str, topics: Mapping[str, str], examples_topic: str = "") -> str:
    """The `[kafka]` table of a test or bench config: a broker, a group, the two input topics (a short session,
    so that a killed member's partitions come back quickly).

    >>> print(kafka_toml("127.0.0.1:9092", "g", {"inference-logs": "logs", "feedback": "fb"}).splitlines()[2])
    group_id = "g"
    """
    return (f'[kafka]\nbootstrap_servers = "{bootstrap}"\ngroup_id = "{group}"\nsession_timeout_ms = 6000\n'
            f'inference_topic = "{topics["inference-logs"]}"\nfeedback_topic = "{topics["feedback"]}"\n'
            f'examples_topic = "{examples_topic}"\n')
