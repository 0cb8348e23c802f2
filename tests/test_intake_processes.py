"""`intake.processes = 2`: two intake processes, each over half of the partitions, learn what one learns, in its order.

The backlog of `tests/test_backlog.py` (two models, 4 partitions per topic, feedback a little shuffled within
each partition) is read by two intakes (partitions 0 and 2, 1 and 3), whose examples the learner merges in event
time. With the disorder within `join.max_out_of_order`, one intake learns the file source's sequence
(`tests/test_backlog.py`); two must learn that same sequence, across SIGKILLs too.
"""

from __future__ import annotations

import random
import uuid

import msgspec
import pytest

from bench.backlog import BacklogSpec, create_topics, in_order, start_service, write_config
from streamlearn.config import ConfigError, parse_config
from streamlearn.records import Example, IntakeStats
from streamlearn.stream.merge import EventTimeMerge, FanInState, check_intakes, fan_in_state, merged_stats
from streamlearn.telemetry.histogram import HistogramState
from tests.test_backlog import (KILLED_BATCH, STATIC_MEMBER, assert_same_as_file, catch_up, killed_then_finished,
                                make_backlog)

SPEC = BacklogSpec(requests=20_000, seed=41, rate=5.0)
KILLED = BacklogSpec(requests=30_000, seed=43, rate=5.0)
EVERY = 2000
KILLS = 5


@pytest.fixture(scope="module")
def backlog(broker, tmp_path_factory):
    return make_backlog(broker, tmp_path_factory.mktemp("processes"), SPEC, EVERY)


def test_two_intake_processes_learn_the_sequence_of_one(broker, backlog):
    run = catch_up(broker, backlog, "two-intakes", EVERY, extra=in_order(SPEC), processes=2)
    assert_same_as_file(run, backlog.reference)
    assert run.ids == backlog.reference.ids, "two intakes learned in another order than one"
    assert run.snapshots >= 1, "no snapshot was cut across the two intakes during the catch-up"


def test_sigkills_with_two_intake_processes_end_as_an_uninterrupted_run(broker, tmp_path, running):
    backlog = make_backlog(broker, tmp_path, KILLED, 1000)
    config = write_config(tmp_path / "killed.toml", tmp_path / "killed", "kafka", broker.bootstrap_servers,
                          backlog.topics, f"killed-{uuid.uuid4().hex[:6]}", every_examples=1000,
                          extra=STATIC_MEMBER + in_order(KILLED), batch_size=KILLED_BATCH, processes=2)
    killed_then_finished(config, tmp_path / "killed", backlog, running, KILLS, random.Random(11))


def test_topics_not_co_partitioned_stop_the_service_with_one_line(broker, tmp_path):
    topics = create_topics(broker, 2)
    feedback = f"feedback-{uuid.uuid4().hex[:8]}"
    broker.create_topics([feedback, feedback + ".dlq"], partitions=3)
    topics["feedback"] = feedback
    state = tmp_path / "state"
    config = write_config(tmp_path / "bad.toml", state, "kafka", broker.bootstrap_servers, topics,
                          f"bad-{uuid.uuid4().hex[:6]}", processes=2)
    log = tmp_path / "bad.log"
    process = start_service(config, log)
    try:
        assert process.wait(timeout=120) != 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "intake.processes: 2 intake processes need co-partitioned topics" in text, text[-2000:]
    assert f"{topics['inference-logs']} has 2 partitions, {feedback} 3" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("seed", range(5))
def test_the_merge_lets_out_the_sequence_of_one_intake(seed):
    # Three intakes release their examples in pieces, each below its own watermark, interleaved at random; the
    # merged sequence is the global (ts, id) order, and nothing is let out before every older one has come.
    rng = random.Random(seed)
    streams = [sorted((round(rng.uniform(0, 100), 1), f"{k}-{i}") for i in range(200)) for k in range(3)]
    merge, out, given = EventTimeMerge(3), [], [0, 0, 0]
    while any(given[k] < len(streams[k]) for k in range(3)):
        k = rng.randrange(3)
        upto = min(len(streams[k]), given[k] + rng.randrange(0, 30))
        piece = streams[k][given[k]:upto]
        given[k] = upto
        merge.add(Example(rid, "default", {}, 1, 1.0, ts, ts) for ts, rid in piece)
        rest = streams[k][upto:]
        merge.mark(k, released_to=rest[0][0] if rest else 100.0, caught_up=not rest and rng.random() < 0.5)
        out += [(e.ts, e.id) for e in merge.release()]
        unseen = [item for j, stream in enumerate(streams) for item in stream[given[j]:]]
        assert not unseen or not out or out[-1] < min(unseen), "an example was let out before an older one came"
    out += [(e.ts, e.id) for e in merge.flush()]
    assert out == sorted(item for s in streams for item in s)


def test_merged_counters_are_the_sums_of_each_intakes():
    h = HistogramState((1.0,), [1, 2], 3.0)
    a = IntakeStats(events={("feedback", "ok"): 3}, join={"matched": 2}, join_pending=4, feedback_delay=h,
                    stages={"kafka": h}, watermark=10.0, assigned=["feedback:0"], caught_up=False)
    b = IntakeStats(events={("feedback", "ok"): 1}, join={"matched": 1, "expired": 1}, join_pending=1,
                    stages={"kafka": h, "join": h}, watermark=7.0, assigned=["feedback:1"], caught_up=True,
                    broker="broker down")
    m = merged_stats([a, b], held=5)
    assert m.events == {("feedback", "ok"): 4} and m.join == {"matched": 3, "expired": 1}
    assert m.join_pending == 10 and m.feedback_delay.counts == [1, 2]
    assert m.stages["kafka"].counts == [2, 4] and m.stages["join"].counts == [1, 2]
    assert m.watermark == 10.0, "a caught-up intake does not hold the watermark back"
    assert m.assigned == ["feedback:0", "feedback:1"] and not m.caught_up and m.broker == "broker down"


def test_a_snapshot_restores_with_the_number_of_intakes_that_took_it():
    two = msgspec.msgpack.encode(FanInState([b"a", b"b"], [Example("r-1", "default", {}, 1, 1.0, 2.0, 2.0)]))
    assert fan_in_state(two, 2).held[0].id == "r-1"
    with pytest.raises(ConfigError, match="taken with 2 intake processes; restore it with intake.processes = 2"):
        fan_in_state(two, 1)
    one = msgspec.msgpack.encode({"joiner": [], "newest": {}, "floor": 0.0})   # an intake's own state: a map
    with pytest.raises(ConfigError, match="taken with 1 intake process; restore it with intake.processes = 1"):
        fan_in_state(one, 3)
    check_intakes(one, 1)
    assert fan_in_state(None, 2).intakes == [b"", b""]


@pytest.mark.parametrize("table", [{"source": "file:x.jsonl", "intake": {"processes": 2}},
                                   {"intake": {"processes": 2, "mode": "inline"}}])
def test_several_intakes_need_kafka_and_processes(table):
    with pytest.raises(ConfigError, match="intake.processes: more than 1 needs source"):
        parse_config(table, env={})
