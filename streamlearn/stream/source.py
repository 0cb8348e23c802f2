"""The small interface every source implements, and the chunk of messages it yields.

Sources hand out messages grouped per partition, in offset order: one Python
object per partition per poll instead of one per message keeps the intake cheap.
With `intake.processes = K`, intake `k` reads a `Share` of the partitions: the
same partition numbers of every topic, so that a log and its feedback (keyed by
request id, co-partitioned) meet in one intake.

>>> Share(1, 2).partitions({"inference-logs": 4, "feedback": 4})
['feedback:1', 'feedback:3', 'inference-logs:1', 'inference-logs:3']
>>> Share(0, 2).partitions({"inference-logs": 4, "feedback": 2})
Traceback (most recent call last):
...
streamlearn.config.ConfigError: config error: intake.processes: 2 intake processes need co-partitioned topics (the same partition count, keyed by request id): feedback has 2 partitions, inference-logs 4
"""

from __future__ import annotations

from typing import Optional, Protocol

import msgspec

from streamlearn.config import ConfigError


class Chunk(msgspec.Struct):
    """Consecutive messages of one topic partition, and the offset after the last one."""

    topic: str
    partition: str          # "topic:partition" for Kafka, "file:PATH" for a file: the position key
    values: list[bytes]
    offsets: list[int]
    next_offset: int
    timestamps: list[float] = []   # broker timestamps in seconds (append or create time), one per message
                                   # (NaN: that message has none); empty: the source has none


class Source(Protocol):
    """A replayable stream of messages with offsets the service can commit and seek to."""

    def poll(self, max_records: int, timeout: float) -> list[Chunk]: ...

    def partitions(self) -> list[str]:
        """The position keys currently assigned to this consumer."""
        ...

    def exhausted(self) -> bool:
        """True when there will never be more input (end of a file); Kafka never is."""
        ...

    def caught_up(self) -> set[str]:
        """The position keys that have delivered everything they hold now (the broker's word, not a timeout)."""
        ...

    def pause(self, keys: set[str]) -> None:
        """Stops fetching these partitions (they ran ahead in event time) until `resume`."""
        ...

    def resume(self, keys: set[str]) -> None: ...

    def commit(self, offsets: dict[str, int]) -> None:
        """Records offsets as processed (for lag monitoring; restore uses the snapshot's own)."""
        ...

    def lag(self) -> dict[tuple[str, int], int]: ...

    def problem(self) -> str:
        """What keeps the source from reading, in words (e.g. "broker HOST:PORT unreachable for 12 s ..."); "" if nothing."""
        ...

    def close(self) -> None: ...


class Share(msgspec.Struct, frozen=True):
    """The partitions one of `count` intake processes reads: those whose number is `index` modulo `count`."""

    index: int
    count: int

    def holds(self, key: str) -> bool:
        """Whether position key `key` ("topic:partition") is in this share."""
        return split_position(key)[1] % self.count == self.index

    def partitions(self, counts: dict[str, int]) -> list[str]:
        """This share's position keys, given each topic's partition count (which must be equal: co-partitioned)."""
        if len(set(counts.values())) > 1:
            (first, n), *rest = sorted(counts.items())
            found = ", ".join([f"{first} has {n} partitions", *(f"{t} {m}" for t, m in rest)])
            raise ConfigError(f"config error: intake.processes: {self.count} intake processes need co-partitioned "
                              f"topics (the same partition count, keyed by request id): {found}")
        return sorted(position_key(topic, p) for topic, n in counts.items() for p in range(n)
                      if p % self.count == self.index)


def intake_share(replicas: int, rank: int, processes: int, index: int) -> Optional[Share]:
    """The share of intake `index` of `processes` in replica `rank` of `replicas` (None: one reads everything).

    Replica r's intakes together read the partitions p with p mod `replicas` = r.

    >>> intake_share(2, 1, 2, 1)
    Share(index=3, count=4)
    """
    if replicas * processes == 1:
        return None
    return Share(rank + replicas * index, replicas * processes)


def split_position(key: str) -> tuple[str, int]:
    """`"feedback:3"` -> `("feedback", 3)`."""
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)


def partition_number(key: str) -> int:
    """The Kafka partition number of a position key, -1 for a file's ("file:PATH").

    >>> partition_number("feedback:3"), partition_number("file:/tmp/events.jsonl")
    (3, -1)
    """
    if key.startswith("file:"):
        return -1
    return split_position(key)[1]


def position_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"

