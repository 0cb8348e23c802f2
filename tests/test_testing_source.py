"""The in-memory source and sink of `streamlearn.testing`: markers, partitions, and a crash resumed exactly once."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import msgspec
import orjson
import pytest

from streamlearn.config import Config, parse_config
from streamlearn.stream.events import Feedback, InferenceLog
from streamlearn.stream.intake import Intake
from streamlearn.testing import (ABORT, EOF, MemoryDeadLetters, MemorySource, Resume, SourceAborted,
                                 memory_intake)


def fb(i: int) -> bytes:
    return orjson.dumps({"request_id": f"r-{i}", "ts": 1000 + i + 0.5, "label": i % 3 == 0})


def lg(i: int) -> bytes:
    return orjson.dumps({"request_id": f"r-{i}", "ts": 1000 + i, "features": {"x": float(i), "c": "web"}})


def values(source: MemorySource, max_records: int = 100) -> dict[str, list[tuple[int, bytes]]]:
    """One poll, as `{key: [(offset, bytes), ...]}`."""
    return {c.partition: list(zip(c.offsets, c.values)) for c in source.poll(max_records, 0)}


def test_eof_ends_a_partition_and_a_source_started_past_it_reads_on():
    items = [b"m0", b"m1", EOF(), b"m3"]
    source = MemorySource({"feedback:0": items})
    chunk, = source.poll(100, 0)
    assert (chunk.topic, chunk.values, chunk.offsets, chunk.next_offset) == ("feedback", [b"m0", b"m1"], [0, 1], 3)
    assert source.exhausted() and source.caught_up() == {"feedback:0"}
    assert source.poll(100, 0) == []
    after = MemorySource({"feedback:0": items}, start={"feedback:0": chunk.next_offset})
    assert not after.exhausted()
    assert values(after) == {"feedback:0": [(3, b"m3")]}
    assert after.exhausted()   # the end of the items ends the partition too (not following)


def test_abort_crashes_once_and_a_resumed_source_passes_it_by():
    items = [b"m0", ABORT(), b"m2", EOF()]
    source = MemorySource({"feedback:0": items})
    assert values(source) == {"feedback:0": [(0, b"m0")]}   # what lies before the marker is delivered first
    with pytest.raises(SourceAborted, match=r"feedback:0@1"):
        source.poll(100, 0)
    with pytest.raises(SourceAborted):   # a crashed run stays crashed
        source.poll(100, 0)
    resumed = MemorySource({"feedback:0": items}, start={"feedback:0": 1})
    chunk, = resumed.poll(100, 0)
    assert (chunk.values, chunk.offsets, chunk.next_offset) == ([b"m2"], [2], 4)
    assert resumed.exhausted()
    with pytest.raises(SourceAborted):   # a new marker fires again
        MemorySource({"feedback:0": [ABORT(), b"m1"]}).poll(100, 0)


def test_markers_alone_move_the_position():
    items = [b"m0", ABORT(), EOF()]
    source = MemorySource({"feedback:0": items})
    source.poll(100, 0)
    with pytest.raises(SourceAborted):
        source.poll(100, 0)
    resumed = MemorySource({"feedback:0": items}, start={"feedback:0": 1})
    chunk, = resumed.poll(100, 0)
    assert (chunk.values, chunk.next_offset) == ([], 3)   # an empty chunk: past the ABORT and the EOF


def test_several_partitions_interleave_in_key_order_with_pause_resume_and_lag():
    log = InferenceLog("r-1", 5.0, {"x": 1.0})
    label = {"request_id": "r-1", "ts": 6, "label": 1}
    source = MemorySource({"inference-logs:1": [log] * 3, "feedback:0": [label] * 3,
                           "inference-logs:0": [b"a", b"b", b"c"]}, per_poll=2)
    assert source.partitions() == ["feedback:0", "inference-logs:0", "inference-logs:1"]
    chunks = source.poll(5, 0)
    assert [(c.partition, c.offsets) for c in chunks] == [("feedback:0", [0, 1]), ("inference-logs:0", [0, 1]),
                                                         ("inference-logs:1", [0])]
    assert msgspec.json.decode(chunks[2].values[0], type=InferenceLog) == log   # records go out as JSON
    assert orjson.loads(chunks[0].values[0])["label"] == 1
    assert source.lag() == {("feedback", 0): 1, ("inference-logs", 0): 1, ("inference-logs", 1): 2}
    source.pause({"inference-logs:1", "unknown:0"})
    assert source.paused() == {"inference-logs:1"}
    assert [c.partition for c in source.poll(100, 0)] == ["feedback:0", "inference-logs:0"]
    assert source.poll(100, 0) == [] and not source.exhausted()   # the paused one still holds input
    assert source.caught_up() == {"feedback:0", "inference-logs:0"}
    source.resume({"inference-logs:1"})
    assert [(c.partition, c.offsets) for c in source.poll(100, 0)] == [("inference-logs:1", [1, 2])]
    assert source.exhausted() and source.lag() == {("feedback", 0): 0, ("inference-logs", 0): 0,
                                                   ("inference-logs", 1): 0}
    source.commit({"feedback:0": 3, "gone:0": 9})
    assert source.committed == {"feedback:0": 3}


def test_following_waits_at_the_end_of_the_items_until_more_come_or_an_eof():
    source = MemorySource({"feedback:0": [b"m0"]}, follow=True)
    assert values(source) == {"feedback:0": [(0, b"m0")]}
    assert source.poll(100, 0.01) == [] and source.caught_up() == {"feedback:0"} and not source.exhausted()
    source.extend("feedback:0", [b"m1", EOF()])
    assert source.caught_up() == set()
    assert values(source) == {"feedback:0": [(1, b"m1")]}
    assert source.exhausted()


def test_bad_items_and_keys_are_refused_with_where_they_are():
    with pytest.raises(TypeError, match=r"feedback:0@1: a message is bytes, a dict or an event record, not str"):
        MemorySource({"feedback:0": [b"ok", "not bytes"]})
    with pytest.raises(ValueError, match="expected 'topic:partition'"):
        MemorySource({"feedback": [b"ok"]})
    source = MemorySource({"feedback:0": [b"ok"]})
    source.close()
    with pytest.raises(RuntimeError, match="closed"):
        source.poll(1, 0)


# Through the intake ------------------------------------------------------------------------------------------

HOSTILE = [b"{broken", b'{"request_id": "h-\xff\xfe", "ts": 1, "label": 1}', bytes(range(128, 256)),
           b"[" * 1500 + b"]" * 1500, b'{"request_id": "h-nan", "ts": 1, "features": {"x": NaN}}',
           orjson.dumps({"request_id": "h-big", "ts": 1, "features": {"s": "x" * 5000}})]


def config() -> Config:
    return parse_config({"intake": {"batch_size": 8, "max_message_bytes": 4096}}, env={})


def traffic(requests: int, crash_at: Optional[int]) -> dict[str, list]:
    """Logs and feedback over two partitions each, hostile bytes early and late; an ABORT in `feedback:0`."""
    parts: dict[str, list] = {"inference-logs:0": [], "inference-logs:1": [], "feedback:0": [], "feedback:1": []}
    for i in range(requests):
        parts[f"inference-logs:{i % 2}"].append(lg(i))
        parts[f"feedback:{i % 2}"].append(fb(i))
    parts["inference-logs:0"][3:3] = HOSTILE[:3]     # read before the snapshot
    parts["feedback:1"][40:40] = HOSTILE[3:]         # read after it, and again after the crash
    if crash_at is not None:
        parts["feedback:0"].insert(crash_at, ABORT())
    return parts


class LearnerSide:
    """The service's part in miniature: learns (records) each batch, snapshots once at a barrier, commits cuts."""

    def __init__(self, snapshot_after: int) -> None:
        self.learned: list[tuple[str, float, object]] = []
        self.snapshot: Optional[tuple[int, Resume]] = None
        self.snapshot_after = snapshot_after

    def run(self, intake: Intake) -> None:
        for batch in intake.batches():
            self.learned += [(e.id, e.ts, e.label) for e in batch.examples]
            if batch.barrier is not None and self.snapshot is None:
                self.snapshot = (len(self.learned), Resume(dict(batch.offsets), batch.barrier))
            if batch.cut:
                intake.commit(batch.offsets)
            if self.snapshot is None and len(self.learned) >= self.snapshot_after:
                intake.barrier_requested = True

    def restart(self) -> Resume:
        """Back to the snapshot: what was learned after it is gone with the crashed process."""
        count, resume = self.snapshot
        del self.learned[count:]
        return resume


def test_a_crash_resumed_from_the_snapshot_learns_every_example_once_and_dead_letters_once():
    requests = 120
    reference = LearnerSide(snapshot_after=10**9)
    reference.run(memory_intake(config(), MemorySource(traffic(requests, None), per_poll=5)))
    assert [r[0] for r in reference.learned] == [f"r-{i}" for i in range(requests)]

    feed, sink = traffic(requests, crash_at=45), MemoryDeadLetters()
    side = LearnerSide(snapshot_after=16)
    with pytest.raises(SourceAborted, match=r"feedback:0@45"):
        side.run(memory_intake(config(), MemorySource(feed, per_poll=5), sink))
    assert side.snapshot is not None and 16 <= side.snapshot[0] < len(side.learned) < requests
    resume = side.restart()
    assert resume.offsets["feedback:1"] <= 40   # the late hostile bytes are read again after the restart
    assert len(sink.letters) == len(HOSTILE)      # ... and were dead-lettered before the crash

    intake = memory_intake(config(), MemorySource(feed, start=resume.offsets, per_poll=5), sink, resume=resume)
    side.run(intake)
    assert side.learned == reference.learned     # every example once, in the uninterrupted run's order
    late = [f"feedback:1@{40 + k}" for k in range(len(HOSTILE) - 3)]
    assert [letter.key for letter in sink.letters] == [f"inference-logs:0@{3 + k}" for k in range(3)] + late
    assert [letter.raw for letter in sink.letters] == HOSTILE
    assert sum(intake.stats().dead_letters.values()) == len(HOSTILE)   # counted once across the restart
    assert intake.source.committed == {k: len(v) for k, v in feed.items()}


def test_hostile_bytes_become_dead_letters_with_their_reasons():
    source = MemorySource({"inference-logs:0": [lg(1), *HOSTILE, EOF()], "feedback:0": [fb(1), EOF()]})
    intake = memory_intake(config(), source)
    learned = [e.id for batch in intake.batches() for e in batch.examples]
    assert learned == ["r-1"]
    sink = intake.dead_letters
    assert [(letter.key, letter.raw) for letter in sink.letters] == [
        (f"inference-logs:0@{1 + k}", raw) for k, raw in enumerate(HOSTILE)]
    assert Counter(letter.reason for letter in sink.letters) == {
        "invalid_json": 3, "not_object": 1, "non_finite": 1, "too_large": 1}
    assert intake.stats().dead_letters == {("inference-logs", "invalid_json"): 3, ("inference-logs", "not_object"): 1,
                                           ("inference-logs", "non_finite"): 1, ("inference-logs", "too_large"): 1}


def test_the_intake_pauses_a_partition_that_runs_ahead_and_resumes_it():
    slow = [{"request_id": f"a-{i}", "ts": 100 + i, "features": {"x": 1.0}} for i in range(5)]
    fast = [Feedback(f"a-{i}", 1100.0 + i, True) for i in range(5)]
    source = MemorySource({"inference-logs:0": slow, "feedback:0": fast}, per_poll=1)
    intake = memory_intake(config(), source)
    intake.poll(timeout=0)
    assert source.paused() == {"feedback:0"}      # 1000 s ahead of the logs, over intake.max_ahead (600 s)
    learned = [e.id for batch in intake.batches() for e in batch.examples]
    assert learned == [f"a-{i}" for i in range(5)] and source.paused() == set()
