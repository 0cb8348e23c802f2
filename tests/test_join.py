"""The symmetric event-time join: matching rule, outcomes, ordering, bounds."""

from __future__ import annotations

import random

import msgspec
import pytest

from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.closed_ids import MERGE_AT
from streamlearn.stream.join import OUTCOMES, FeedbackJoiner, JoinerState


def log(rid: str, ts: float, model: str = "default") -> LogEntry:
    return LogEntry(rid, ts, model, {"x": ts})


def feedback(rid: str, ts: float, label=1) -> LabelEntry:
    return LabelEntry(rid, ts, label, 1.0)


@pytest.fixture
def joiner() -> FeedbackJoiner:
    return FeedbackJoiner(ttl=60, early_ttl=10, max_pending=1000)


def counts(j: FeedbackJoiner) -> dict[str, int]:
    return {k: v for k, v in j.outcomes.items() if v}


def test_log_then_feedback_matches_and_is_released_by_the_watermark(joiner):
    joiner.add_log(log("a", 100))
    joiner.add_feedback(feedback("a", 150))
    assert joiner.advance(149.0) == []          # held until the watermark passes the example's time
    assert joiner.advance(150.0) == []          # at it, a tie may still come: held
    assert joiner.held == 1
    [example] = joiner.advance(150.5)
    assert (example.id, example.features, example.label, example.ts, example.label_ts) == ("a", {"x": 100}, 1, 150, 150)
    assert counts(joiner) == {"matched": 1}
    assert joiner.delays == [50]
    assert joiner.pending == 0


def test_feedback_may_arrive_before_its_log(joiner):
    joiner.add_feedback(feedback("a", 95))
    assert joiner.pending == 1
    joiner.add_log(log("a", 100))
    assert [e.id for e in joiner.advance(100.5)] == ["a"]
    assert counts(joiner) == {"matched": 1}


def test_ttl_boundaries_are_inclusive(joiner):
    joiner.add_log(log("on-time", 100))
    joiner.add_feedback(feedback("on-time", 160))   # exactly ttl after
    joiner.add_feedback(feedback("early", 90))      # exactly early_ttl before
    joiner.add_log(log("early", 100))
    assert counts(joiner) == {"matched": 2}


def test_unmatched_logs_expire_when_the_watermark_passes_their_ttl(joiner):
    joiner.add_log(log("a", 100))
    joiner.advance(160.0)
    assert joiner.pending == 1
    joiner.advance(160.5)
    assert counts(joiner) == {"expired": 1}
    assert joiner.pending == 0
    joiner.add_feedback(feedback("a", 170))         # the label after all: too late
    assert counts(joiner) == {"expired": 1, "late": 1}


def test_feedback_whose_log_never_comes_expires(joiner):
    joiner.add_feedback(feedback("a", 100))
    joiner.advance(111.0)
    assert counts(joiner) == {"expired_feedback": 1}


def test_feedback_too_long_after_a_pending_log_is_late(joiner):
    joiner.add_log(log("a", 100))
    joiner.add_feedback(feedback("a", 161))         # arrived before the watermark expired the log
    assert counts(joiner) == {"late": 1}


def test_log_too_long_after_early_feedback_expires_the_feedback(joiner):
    joiner.add_feedback(feedback("a", 80))
    joiner.add_log(log("a", 100))                   # 20 s after the label: beyond early_ttl
    assert counts(joiner) == {"expired_feedback": 1}
    assert joiner.pending == 1                      # the log still waits for a label of its own


def test_duplicates_on_either_side_are_counted_not_learned(joiner):
    joiner.add_log(log("a", 100))
    joiner.add_log(log("a", 101))                   # replayed log while pending
    joiner.add_feedback(feedback("a", 110))
    joiner.add_feedback(feedback("a", 111))         # second label after the match
    joiner.add_log(log("a", 102))                   # replayed log after the match
    joiner.add_feedback(feedback("b", 110))
    joiner.add_feedback(feedback("b", 111))         # duplicate early feedback
    assert counts(joiner) == {"matched": 1, "duplicate": 4}
    assert len(joiner.advance(1000.0)) == 1


def test_pending_state_stops_at_its_bound_and_counts_evictions():
    joiner = FeedbackJoiner(ttl=3600, early_ttl=60, max_pending=100)
    for i in range(5000):                            # feedback never arrives
        joiner.add_log(log(f"r-{i}", float(i)))
        assert joiner.pending <= 100
    assert joiner.pending == 100
    assert counts(joiner) == {"evicted": 4900}
    joiner.add_feedback(feedback("r-4999", 5000))    # the newest survived: oldest go first
    assert joiner.outcomes["matched"] == 1


def test_memory_of_closed_ids_is_bounded_too():
    joiner = FeedbackJoiner(ttl=10, early_ttl=1, max_pending=50)
    for i in range(2000):
        joiner.add_log(log(f"r-{i}", float(i)))
        joiner.add_feedback(feedback(f"r-{i}", i + 1.0))
        joiner.advance(float(i))
    assert len(joiner._closed) <= 51
    assert joiner.outcomes["matched"] == 2000


def test_regression_labels_must_be_numbers():
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=10, regression_models=frozenset({"price"}))
    joiner.add_log(log("a", 1, model="price"))
    joiner.add_feedback(feedback("a", 2, label="expensive"))
    joiner.add_log(log("b", 1, model="price"))
    joiner.add_feedback(feedback("b", 2, label=3.5))
    assert counts(joiner) == {"invalid_label": 1, "matched": 1}
    assert [e.label for e in joiner.advance(100.0)] == [3.5]


def test_release_order_does_not_depend_on_arrival_order():
    """Same events, any interleaving of the partitions: the same examples in the same order."""
    events = []
    for i in range(300):
        events.append(("log", log(f"r-{i:03d}", i * 0.5)))
        events.append(("fb", feedback(f"r-{i:03d}", i * 0.5 + (i * 7919 % 40))))
    runs = []
    for seed in range(5):
        order = events[:]
        random.Random(seed).shuffle(order)
        joiner = FeedbackJoiner(ttl=60, early_ttl=60, max_pending=10_000)
        for kind, event in order:
            (joiner.add_log if kind == "log" else joiner.add_feedback)(event)
        released = joiner.advance(500.0) + joiner.flush()
        runs.append([(e.id, e.ts) for e in released])
    assert all(run == runs[0] for run in runs)
    assert len(runs[0]) == 300
    assert runs[0] == sorted(runs[0], key=lambda item: (item[1], item[0]))


def test_pre_joined_examples_are_released_in_event_time_order(joiner):
    from streamlearn.records import Example

    for rid, ts in [("b", 5.0), ("a", 3.0), ("c", 9.0)]:
        joiner.add_example(Example(rid, "default", {}, 1, 1.0, ts, ts))
    assert [e.id for e in joiner.advance(6.0)] == ["a", "b"]
    assert [e.id for e in joiner.flush()] == ["c"]


def test_every_input_is_accounted_for():
    """matched pairs + pending + one outcome per other input = inputs, under random traffic."""
    rng = random.Random(7)
    joiner = FeedbackJoiner(ttl=30, early_ttl=5, max_pending=200)
    inputs = 0
    for i in range(5000):
        rid = f"r-{rng.randrange(3000)}"            # collisions make duplicates
        t = i * 0.1 + rng.uniform(-10, 40)
        if rng.random() < 0.5:
            joiner.add_log(log(rid, t))
        else:
            joiner.add_feedback(feedback(rid, t))
        inputs += 1
        if i % 100 == 0:
            joiner.advance(i * 0.1 - 20)
    o = joiner.outcomes
    accounted = 2 * (o["matched"] + o["invalid_label"]) + joiner.pending + sum(
        o[k] for k in ("expired", "expired_feedback", "late", "duplicate", "evicted"))
    assert accounted == inputs
    assert set(o) == set(OUTCOMES)


def example(rid: str, ts: float, label=1, model: str = "default"):
    from streamlearn.records import Example

    return Example(rid, model, {"x": ts}, label, 1.0, ts, ts)


def test_pre_joined_examples_are_counted_and_never_learned_twice(joiner):
    joiner.add_example(example("e", 10))
    joiner.add_example(example("e", 11))             # the same example again
    joiner.add_log(log("e", 12))                     # its id as a request afterwards
    joiner.add_feedback(feedback("e", 13))
    joiner.add_log(log("r", 20))
    joiner.add_feedback(feedback("r", 21))
    joiner.add_example(example("r", 22))             # a request matched here, then joined upstream too
    joiner.add_log(log("p", 30))
    joiner.add_example(example("p", 31))             # while its log is pending: it could still match
    assert counts(joiner) == {"prejoined": 1, "matched": 1, "duplicate": 5}
    assert [e.id for e in joiner.advance(100.0)] == ["e", "r"]


def test_a_request_that_expired_unmatched_may_arrive_joined_upstream(joiner):
    joiner.add_log(log("a", 100))
    joiner.advance(1000.0)                           # expired: never learned here
    joiner.add_example(example("a", 1001))
    assert counts(joiner) == {"expired": 1, "prejoined": 1}
    assert [e.id for e in joiner.advance(2000.0)] == ["a"]


def test_regression_labels_are_checked_for_pre_joined_examples_and_bounded():
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=10, regression_models=frozenset({"price"}),
                            max_abs_label={"price": 1e6})
    joiner.add_example(example("a", 1, label="expensive", model="price"))
    joiner.add_example(example("b", 1, label=True, model="price"))
    joiner.add_example(example("c", 1, label=-1e300, model="price"))
    joiner.add_example(example("d", 1, label=1e6, model="price"))
    joiner.add_example(example("e", 1, label=1e300, model="default"))   # a class label: any value
    joiner.add_log(log("f", 1, model="price"))
    joiner.add_feedback(feedback("f", 2, label=2e6))                       # joined here: the same bound
    joiner.add_example(example("c", 2, label=5.0, model="price"))          # its id was used: a duplicate
    assert counts(joiner) == {"invalid_label": 4, "prejoined": 2, "duplicate": 1}
    assert [e.id for e in joiner.advance(100.0)] == ["d", "e"]


def test_held_examples_count_against_the_bound_and_leave_early_not_lost():
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=100)
    for i in range(5000):                            # the watermark never moves: all would be held
        joiner.add_example(example(f"e-{i}", 5000.0 - i))
        assert joiner.pending + len(joiner._ready) <= 100
    released = joiner.advance(0.0)                   # the early ones, oldest (by event time) first at each step
    assert len(released) == 4900 and joiner.held == 100
    assert [e.id for e in released[:3]] == ["e-100", "e-101", "e-102"]   # each newcomer is the oldest held
    rest = joiner.advance(10_000.0)
    assert sorted(e.id for e in released + rest) == sorted(f"e-{i}" for i in range(5000))
    assert counts(joiner) == {"prejoined": 5000}


def test_held_examples_are_released_before_anything_pending_is_evicted():
    joiner = FeedbackJoiner(ttl=3600, early_ttl=60, max_pending=10)
    for i in range(10):
        joiner.add_log(log(f"r-{i}", float(i)))
        joiner.add_feedback(feedback(f"r-{i}", i + 1.0))   # matched, held: the watermark stays at 0
    for i in range(10):
        joiner.add_log(log(f"q-{i}", 100.0 + i))          # pending: pushes the held ones out, evicts nothing
    assert counts(joiner) == {"matched": 10}
    assert [e.id for e in joiner.advance(0.0)] == [f"r-{i}" for i in range(10)]
    joiner.add_log(log("q-10", 200.0))
    assert counts(joiner) == {"matched": 10, "evicted": 1}


def test_a_snapshot_restores_examples_held_or_released_early_and_closed_ids():
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=3)
    for i in range(5):
        joiner.add_example(example(f"e-{i}", 10.0 + i))
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(joiner.state()), type=JoinerState)
    restored = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=3)
    restored.restore(state)
    restored.add_example(example("e-1", 99.0))              # remembered as seen
    assert restored.outcomes["duplicate"] == 1 and restored.held == 5
    assert [e.id for e in restored.advance(100.0)] == [e.id for e in joiner.advance(100.0)]


def test_a_snapshot_without_the_overflow_field_still_restores():
    old = msgspec.msgpack.encode([[], [], [], [], {"matched": 3}])   # JoinerState before `overflow` existed
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=3)
    joiner.restore(msgspec.msgpack.decode(old, type=JoinerState))
    assert joiner.outcomes["matched"] == 3 and joiner.held == 0


def test_every_input_is_accounted_for_with_pre_joined_examples_too():
    """Logs and feedback as before; each pre-joined example ends in exactly one outcome of its own."""
    rng = random.Random(11)
    joiner = FeedbackJoiner(ttl=30, early_ttl=5, max_pending=200)
    pairs_in = examples_in = 0
    for i in range(5000):
        rid = f"r-{rng.randrange(3000)}"
        t = i * 0.1 + rng.uniform(-10, 40)
        if rng.random() < 0.5:
            joiner.add_log(log(rid, t))
            pairs_in += 1
        else:
            joiner.add_feedback(feedback(rid, t))
            pairs_in += 1
        if rng.random() < 0.2:
            before = dict(joiner.outcomes)
            joiner.add_example(example(f"x-{rng.randrange(500)}", t))
            examples_in += 1
            changed = {k: joiner.outcomes[k] - before[k] for k in OUTCOMES if joiner.outcomes[k] != before[k]}
            assert changed in ({"prejoined": 1}, {"duplicate": 1}), changed
        if i % 100 == 0:
            joiner.advance(i * 0.1 - 20)
    o = joiner.outcomes
    assert o["prejoined"] > 0 and o["duplicate"] > 0
    assert o["prejoined"] <= examples_in


def test_closed_ids_past_the_compact_merge_are_still_told_apart_and_survive_a_snapshot():
    """Beyond `MERGE_AT` the closed ids are kept as hashes: duplicates and late feedback are still recognised."""
    joiner = FeedbackJoiner(ttl=3600, early_ttl=300, max_pending=1_000_000)
    n = MERGE_AT + 5_000
    for i in range(n):
        joiner.add_log(log(f"r-{i}", i * 0.01))
        if i % 10:
            joiner.add_feedback(feedback(f"r-{i}", i * 0.01 + 1))
    joiner.advance(n * 0.01 + 3601)    # every unmatched log expires; ids closed before 78 s are forgotten
    assert counts(joiner) == {"matched": n - n // 10 - 1, "expired": n // 10 + 1}
    restored = FeedbackJoiner(ttl=3600, early_ttl=300, max_pending=1_000_000)
    restored.restore(msgspec.msgpack.decode(msgspec.msgpack.encode(joiner.state()), type=JoinerState))
    for j in (joiner, restored):
        j.add_log(log("r-10011", 5000.0))                # matched long ago, its id hashed: a duplicate
        j.add_feedback(feedback("r-10010", 5000.0))      # its log expired: late
        j.add_feedback(feedback(f"r-{n - 1}", 5000.0))   # the newest ids, still strings: matched, a duplicate
        assert (j.outcomes["duplicate"], j.outcomes["late"]) == (2, 1)


def test_closed_ids_are_forgotten_after_ttl_plus_early_ttl_and_bounded_by_max_pending():
    joiner = FeedbackJoiner(ttl=10, early_ttl=5, max_pending=MERGE_AT + 100)
    for i in range(MERGE_AT + 1_000):
        joiner.add_log(log(f"r-{i}", 0.0))
        joiner.add_feedback(feedback(f"r-{i}", 1.0))
    joiner.advance(2.0)
    assert len(joiner._closed) <= MERGE_AT + 100         # the oldest tenth went at once, by close time
    joiner.add_log(log(f"r-{MERGE_AT + 999}", 2.0))      # the newest are kept
    assert joiner.outcomes["duplicate"] == 1
    joiner.advance(16.5)                                  # closed at 1.0: forgotten once the horizon passes 1.0
    joiner.add_log(log("r-1", 17.0))
    joiner.add_feedback(feedback("r-1", 18.0))
    assert joiner.outcomes["duplicate"] == 1 and joiner.outcomes["matched"] == MERGE_AT + 1_001


def test_a_snapshot_from_before_the_hashed_closed_ids_still_restores():
    old = msgspec.msgpack.encode([[], [], [["r-1", 5.0, True], ["r-2", 6.0, False]], [], {"matched": 1}, []])
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=10)
    joiner.restore(msgspec.msgpack.decode(old, type=JoinerState))
    joiner.add_log(log("r-1", 7.0))
    joiner.add_feedback(feedback("r-2", 8.0))
    assert (joiner.outcomes["duplicate"], joiner.outcomes["late"]) == (1, 1)


def test_pending_logs_kept_packed_come_back_whole_after_a_snapshot():
    joiner = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=100)
    joiner.add_log(LogEntry("a", 1.0, "m", {"x": 1.5, "c": "pos", "on": True}, "7", True))
    joiner.add_log(LogEntry("b", 2.0, "m", {"x": 2.5}))
    restored = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=100)
    restored.restore(msgspec.msgpack.decode(msgspec.msgpack.encode(joiner.state()), type=JoinerState))
    restored.add_feedback(feedback("a", 3.0))
    [example] = restored.advance(100.0)
    assert (example.features, example.model_version, example.served) == ({"x": 1.5, "c": "pos", "on": True}, "7", True)
    assert counts(restored) == {"matched": 1, "expired": 1}
