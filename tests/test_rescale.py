"""Dividing old replicas' snapshots for another number of replicas: each entry of the join state goes to the replica
that now reads its partition, counters add up, nothing is lost or doubled (pure logic: no broker)."""

from __future__ import annotations

import msgspec
import numpy as np

from streamlearn.checkpoints.content import Content, ServiceFigures
from streamlearn.cluster.epochs import EpochState
from streamlearn.cluster.restore import Candidate, newest_complete, rescaled
from streamlearn.learners.contract import LearnerSnapshot
from streamlearn.records import Example, IntakeStats
from streamlearn.stream.closed_ids import ClosedIdsState
from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.intake import IntakeState
from streamlearn.stream.join import JoinerState

PARTITIONS = 4


def example(rid: str, partition: int, ts: float) -> Example:
    return Example(rid, "default", {"x": 1.0}, 1, 1.0, ts, ts, partition=partition)


def old_replica(rank: int, replicas: int) -> tuple[Content, dict[str, int]]:
    """What old replica `rank` of `replicas` held: entries of its own partitions only, as a replica does."""
    mine = [p for p in range(PARTITIONS) if p % replicas == rank]
    joiner = JoinerState(
        logs=[LogEntry(f"log-{p}", 10.0 + p, "default", {"x": 1.0}, partition=p) for p in mine],
        early=[LabelEntry(f"early-{p}", 11.0 + p, 1, 1.0, partition=p) for p in mine],
        closed=[(f"closed-{p}", 5.0, True) for p in mine],
        ready=[example(f"ready-{p}", p, 9.0 + p) for p in mine],
        outcomes={"matched": 10 * (rank + 1)},
        closed_hashed=ClosedIdsState([], np.array([7 + rank, 3 + 10 * rank], np.uint64).tobytes(),
                                     np.array([1.0, 2.0]).tobytes(), np.array([True, False]).tobytes()))
    stats = IntakeStats(events={("feedback", "ok"): 100 * (rank + 1)}, join={"matched": 10 * (rank + 1)})
    intake = IntakeState(joiner, {f"feedback:{p}": 12.0 + p for p in mine}, 8.0 + rank, stats, {"dlq:0": 3 + rank})
    epoch = EpochState(7, replicas, rank, 120.0, [example(f"held-{p}", p, 121.0) for p in mine])
    learners = {"default": LearnerSnapshot("river", f"model of replica {rank}".encode(), {})}
    figures = ServiceFigures(learned=50 * (rank + 1), learning_seconds=1.0, audit_length=1000 * (rank + 1))
    content = Content(learners, msgspec.msgpack.encode(intake), figures, None, msgspec.msgpack.encode(epoch))
    offsets = {f"{topic}:{p}": 40 + p for topic in ("feedback", "inference-logs") for p in mine}
    return content, offsets


def divided(old: int, new: int) -> list:
    olds = [old_replica(rank, old) for rank in range(old)]
    return [rescaled([c for c, _ in olds], [o for _, o in olds], new, rank, audit_size=77) for rank in range(new)]


def intake_of(point) -> IntakeState:
    return msgspec.msgpack.decode(point.content.intake_state, type=IntakeState)


def epoch_of(point) -> EpochState:
    return msgspec.msgpack.decode(point.content.epoch, type=EpochState)


def test_each_entry_goes_to_the_replica_that_now_reads_its_partition():
    for old, new in [(2, 1), (1, 2), (2, 3), (3, 2)]:
        points = divided(old, new)
        for rank, point in enumerate(points):
            owned = {p for p in range(PARTITIONS) if p % new == rank}
            joiner = intake_of(point).joiner
            assert {e.partition for e in joiner.logs} == owned, (old, new, rank)
            assert {e.partition for e in joiner.early} == owned
            assert {e.partition for e in joiner.ready} == owned
            assert {e.partition for e in epoch_of(point).held} == owned
            assert {int(k.rsplit(":", 1)[1]) for k in point.offsets} == owned
            assert {int(k.rsplit(":", 1)[1]) for k in intake_of(point).newest} == owned
        logs = [e.request_id for point in points for e in intake_of(point).joiner.logs]
        assert sorted(logs) == sorted(f"log-{p}" for p in range(PARTITIONS)), "a log was lost or doubled"


def test_counters_add_up_on_the_new_replica_zero_and_closed_ids_are_kept_everywhere():
    points = divided(2, 3)
    outcomes = [intake_of(p).joiner.outcomes for p in points]
    assert outcomes[0] == {"matched": 30} and outcomes[1] == outcomes[2] == {}
    assert intake_of(points[0]).stats.events == {("feedback", "ok"): 300}
    assert intake_of(points[1]).stats.events == {}
    for point in points:
        closed = intake_of(point).joiner
        assert sorted(c[0] for c in closed.closed) == [f"closed-{p}" for p in range(PARTITIONS)]
        keys = np.frombuffer(closed.closed_hashed.keys, np.uint64)
        assert keys.tolist() == sorted(keys.tolist()) and len(keys) == 4, "hashed ids merged, sorted"
        assert intake_of(point).floor == 8.0, "the lowest watermark: nothing is released early"
        assert intake_of(point).dead_letter_ends == {"dlq:0": 4}


def test_the_models_are_one_old_replicas_and_the_epoch_counts_the_rescale_as_a_sync():
    points = divided(2, 3)
    states = [p.content.learners["default"].state for p in points]
    assert states == [b"model of replica 0", b"model of replica 1", b"model of replica 0"]
    assert [epoch_of(p).epoch for p in points] == [8, 8, 8] and epoch_of(points[0]).boundary == 120.0
    assert [p.content.figures.audit_length for p in points] == [1000, 2000, 77], \
        "an old rank's audit log is cut back to its snapshot; a new rank's is kept as it is"
    assert all(p.seq is None for p in points)


def test_the_newest_epoch_every_rank_of_its_count_has_is_taken():
    found = [Candidate(2, 5, 0, 0, 9), Candidate(2, 5, 1, 1, 8), Candidate(2, 6, 0, 0, 10),
             Candidate(1, 6, 0, 0, 11)]
    assert newest_complete(found, 2) == (1, 6), "one replica's snapshot of epoch 6 is a complete epoch of one"
    assert newest_complete(found[:3], 2) == (2, 5)
    assert newest_complete([Candidate(2, 6, 0, 0, 10)], 2) is None
