"""Catching up on a backlog: the same joins and examples as the file source, snapshots inside it, a prompt tail.

A backlog (two models' inference logs and delayed feedback, some feedback missing,
arrival a little shuffled against event time within each partition) is produced
up front to 4 partitions per topic of the real broker (`bench/backlog.py` makes
it). `streamlearn run` catches up on it with default join and intake settings;
the same events read from a file are the reference. The small cases run in the
default suite; the large one is marked `backlog` (`pytest -m backlog`).
"""

from __future__ import annotations

import dataclasses
import random
import signal
import uuid
from collections import Counter
from pathlib import Path

import pytest

from bench.backlog import (BacklogSpec, Produced, RunResult, backlog_messages, create_topics, in_order, learned_ids,
                           produce, run_file, run_kafka, start_service, write_config)
from streamlearn.checkpoints.audit import AuditLog
from streamlearn.checkpoints.store import SnapshotStore
from tests.conftest import wait_for

# 5 requests per second and model: the small backlog spans 2000 s of event time, longer than join.early_ttl
# (300 s), so that a watermark moved past a partition with input left can expire feedback (lost joins).
SMALL = BacklogSpec(requests=20_000, seed=23, rate=5.0)
KILLED = BacklogSpec(requests=50_000, seed=29, rate=5.0)
LARGE = BacklogSpec(requests=400_000, seed=31)
SMALL_EVERY = 2000        # snapshot.every_examples of the small runs: up to 9 snapshots in a catch-up
TAIL_BOUND = 10.0         # seconds from the last message consumed to the last example learned (goal: under 1 s)
KILLS = 10
# Small hand-offs (as in tests/test_crash_recovery.py): more cuts for the kills to fall between, and each life's
# first snapshot comes after a few thousand examples, so the restarts make progress through the backlog.
KILLED_BATCH = 200
SMALL_FETCHES = '[kafka.settings]\n"max.partition.fetch.bytes" = 16384\n'
# Static membership (KIP-345): a restarted service takes its killed predecessor's place at once (see
# tests/test_crash_recovery.py for what Tansu does without it).
STATIC_MEMBER = '[kafka.settings]\n"group.instance.id" = "backlog-test"\n'


@dataclasses.dataclass
class Backlog:
    """A backlog on the broker, the same events as a JSONL file, and the file source's run over them."""

    spec: BacklogSpec
    topics: dict[str, str]
    produced: Produced
    reference: RunResult
    folder: Path


def make_backlog(broker, folder: Path, spec: BacklogSpec, every_examples: int) -> Backlog:
    """Produces the backlog and runs the file source over the same events (with `in_order(spec)`: see there)."""
    jsonl = folder / "backlog.jsonl"
    topics = create_topics(broker, spec.partitions)
    produced = produce(broker.bootstrap_servers, topics, backlog_messages(spec), spec.partitions, jsonl)
    state = folder / "file"
    config = write_config(folder / "file.toml", state, f"file:{jsonl}", broker.bootstrap_servers, topics, "unused",
                          every_examples, metrics=False, extra=in_order(spec))
    reference = run_file(config, state)
    assert reference.summary["join"]["matched"] > 0.85 * spec.requests
    assert len(reference.ids) == len(set(reference.ids)) == reference.summary["learned"] + reference.summary["held_out"]
    return Backlog(spec, topics, produced, reference, folder)


def catch_up(broker, backlog: Backlog, name: str, every_examples: int, extra: str = "",
             timeout: float = 180.0, processes: int = 1) -> RunResult:
    """One `streamlearn run` on the backlog with a consumer group of its own, until the file's examples are learned."""
    state = backlog.folder / name
    config = write_config(backlog.folder / f"{name}.toml", state, "kafka", broker.bootstrap_servers, backlog.topics,
                          f"{name}-{uuid.uuid4().hex[:6]}", every_examples, extra=extra, processes=processes)
    return run_kafka(config, state, backlog.produced, backlog.reference.summary["learned"], timeout=timeout)


def assert_same_as_file(run: RunResult, reference: RunResult) -> None:
    """Join outcomes, learned count and the learned ids (each once) are the file source's."""
    assert run.complete, f"learned {run.learned_before_stop:.0f} of the file source's {reference.summary['learned']} " \
                         f"examples before the stop (and {run.summary['learned']} once the stop had drained the joiner)"
    assert run.summary["join"] == reference.summary["join"]
    assert run.summary["learned"] == reference.summary["learned"]
    assert run.summary["held_out"] == reference.summary["held_out"]
    duplicates = [i for i, n in Counter(run.ids).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} examples learned twice, e.g. {duplicates[:3]}"
    assert set(run.ids) == set(reference.ids)


@pytest.fixture(scope="module")
def small(broker, tmp_path_factory) -> Backlog:
    return make_backlog(broker, tmp_path_factory.mktemp("backlog"), SMALL, SMALL_EVERY)


def test_catch_up_with_default_settings_learns_what_the_file_source_learns(broker, small):
    run = catch_up(broker, small, "kafka-defaults", SMALL_EVERY)
    assert_same_as_file(run, small.reference)
    # Inside the catch-up, not only after it (before issue 15 the release was one block: no cut inside it). Not
    # all of `expected`: while a write is in flight no barrier is asked for, and at ~40k examples/s one write
    # (~50 ms) spans about SMALL_EVERY examples (bench/backlog.py shows the interval kept at 100,000).
    expected = run.summary["learned"] // SMALL_EVERY
    assert run.snapshots >= expected // 4, \
        f"{run.snapshots} snapshots while catching up on {run.summary['learned']} examples (every {SMALL_EVERY})"
    assert run.tail_s < TAIL_BOUND, f"the tail was learned {run.tail_s:.1f} s after the last message was consumed"


def test_two_catch_ups_learn_the_file_sources_sequence(broker, small):
    first = catch_up(broker, small, "kafka-1", SMALL_EVERY, extra=in_order(SMALL))
    second = catch_up(broker, small, "kafka-2", SMALL_EVERY, extra=in_order(SMALL))
    for run in (first, second):
        assert_same_as_file(run, small.reference)
    assert first.ids == small.reference.ids, "the learned order differs from the file source's"
    assert second.ids == first.ids, "two runs over the same backlog learned in different orders"


@pytest.mark.parametrize("idle_timeout", [0.05, 60.0])
def test_idle_timeout_neither_loses_joins_nor_holds_the_tail(broker, small, idle_timeout):
    # A partition that still held a backlog but was not delivered for idle_timeout counted as idle, and the
    # watermark passed it (lost joins); a finished backlog waited for the timeout before its tail was learned.
    # Small fetches interleave the partitions finely, as a backlog larger than the client's fetch does.
    run = catch_up(broker, small, f"kafka-idle-{idle_timeout:g}", SMALL_EVERY,
                   extra=f"[join]\nidle_timeout = {idle_timeout}\n{SMALL_FETCHES}")
    assert_same_as_file(run, small.reference)
    assert run.tail_s < TAIL_BOUND, f"the tail was learned {run.tail_s:.1f} s after the last message was consumed"


def test_sigkills_mid_backlog_end_as_an_uninterrupted_run(broker, tmp_path, running):
    backlog = make_backlog(broker, tmp_path, KILLED, 1000)
    config = write_config(tmp_path / "killed.toml", tmp_path / "killed", "kafka", broker.bootstrap_servers,
                          backlog.topics, f"killed-{uuid.uuid4().hex[:6]}", every_examples=1000,
                          extra=STATIC_MEMBER + in_order(KILLED), batch_size=KILLED_BATCH)
    killed_then_finished(config, tmp_path / "killed", backlog, running, KILLS, random.Random(7))


def killed_then_finished(config: Path, state: Path, backlog: Backlog, running: list, kills: int,
                         rng: random.Random) -> None:
    """Runs the service `kills` times, each SIGKILLed at a random point a little past its restore, then to the
    end; the learned ids must be the file source's, each once and in its order (`in_order` configs)."""
    expected = backlog.reference.ids
    state.mkdir()
    offsets: dict[str, int] = {}
    for kill in range(kills):
        log = state.parent / f"{state.name}-{kill}.log"
        process = start_service(config, log)
        running.append((process, log))
        # The metrics line comes after the restore, which cuts the audit log back to its snapshot.
        wait_for(lambda: "metrics on" in log.read_text() or process.poll() is not None, timeout=120,
                 what="the restore")
        assert process.poll() is None, f"the service exited ({process.returncode}) while starting"
        after_restore = len(learned_ids(state))
        assert after_restore < len(expected), f"the backlog was learned before kill {kill + 1}: make it larger"
        # A random point in the backlog, a little past the restored one (the audit log grows in 8 kB writes).
        target = after_restore + rng.randrange(1000, 6000)
        wait_for(lambda: len(learned_ids(state)) >= target or process.poll() is not None, timeout=120,
                 interval=0.02, what=f"learning to reach the point of kill {kill + 1}")
        at_kill = len(learned_ids(state))
        process.send_signal(signal.SIGKILL)
        process.wait()
        print(f"kill {kill + 1}: {after_restore} ids in the audit log after the restore, {at_kill} at the kill")
        offsets = newer_offsets(state, offsets)
    # Learned ids past the last snapshot are cut back on restore; the uninterrupted end follows.
    final = run_kafka(config, state, backlog.produced, backlog.reference.summary["learned"], timeout=180)
    assert final.summary["learned"] == backlog.reference.summary["learned"]
    assert final.summary["join"] == backlog.reference.summary["join"]
    got = learned_ids(state)
    assert len(got) == len(set(got)), "an example was learned twice"
    assert set(got) == set(expected), "an example was lost"
    assert got == expected, "the learned order differs from the uninterrupted run's"


def newer_offsets(state: Path, before: dict[str, int]) -> dict[str, int]:
    """The newest snapshot's offsets, none of them behind `before` (a partition read again: learned or joined twice)."""
    store = SnapshotStore(state / "snapshots")
    seq = store.latest_seq()
    now = store.manifest(seq).offsets if seq is not None else {}
    behind = {key: (offset, now.get(key)) for key, offset in before.items() if now.get(key, -1) < offset}
    assert not behind, f"snapshot {seq} went back on partitions (before, now): {behind}"
    return now


def test_audit_log_length_is_right_for_a_snapshot_just_after_a_restore(tmp_path):
    # A snapshot can come before the restored service learns anything (its trigger restored as due): the length
    # it records must be the cut-back file's, or the next restore pads the log with zeros and keeps ids twice.
    path = tmp_path / "learned.log"
    audit = AuditLog(path)
    audit.append(["a", "b"])
    length = audit.sync()
    audit.append(["c", "d"])   # learned after the snapshot, then killed
    audit.sync()
    audit.close()
    restored = AuditLog(path, truncate_to=length)
    assert restored.sync() == length == path.stat().st_size
    restored.close()


@pytest.mark.backlog
def test_large_backlog_catch_up_equals_the_file_source(broker, tmp_path):
    backlog = make_backlog(broker, tmp_path, LARGE, 100_000)
    defaults = catch_up(broker, backlog, "kafka-defaults", 100_000, timeout=600)
    first = catch_up(broker, backlog, "kafka-1", 100_000, extra=in_order(LARGE), timeout=600)
    second = catch_up(broker, backlog, "kafka-2", 100_000, extra=in_order(LARGE), timeout=600)
    for run in (defaults, first, second):
        assert_same_as_file(run, backlog.reference)
        assert run.snapshots >= 2, f"{run.snapshots} snapshots while catching up on {run.summary['learned']} examples"
        assert run.tail_s < TAIL_BOUND
    assert first.ids == backlog.reference.ids
    assert second.ids == first.ids
