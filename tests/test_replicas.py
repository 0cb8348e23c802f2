"""Two replicas of one service on one backlog: every example learned once across them, one model at the end.

The backlog of `tests/test_backlog.py` (4 partitions per topic, co-partitioned by request id) is read by two
`streamlearn run` processes, replica 0 reading partitions 0 and 2, replica 1 partitions 1 and 3. They average
their River models every 60 s of event time over torch.distributed (gloo, TCP on loopback).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import signal
import threading
import uuid
from pathlib import Path

import pytest

from bench.backlog import (BacklogSpec, in_order, learned_ids, metrics_port, run_kafka, scrape, start_service,
                           write_config)
from streamlearn.cluster.epochs import Controls, EpochSync, PeerLost
from streamlearn.cluster.group import SoloGroup
from streamlearn.config import ConfigError, parse_config, replica_rank
from streamlearn.learners.contract import build_learner
from streamlearn.records import Batch, Example
from streamlearn.service import Service, _handoff
from streamlearn.stream.broker import free_port
from streamlearn.stream.source import Share, intake_share
from tests.conftest import wait_for
from tests.test_backlog import make_backlog

SPEC = BacklogSpec(requests=20_000, seed=47, rate=5.0)
LARGE = dataclasses.replace(SPEC, requests=80_000, seed=53)   # `pytest -m scale`


@pytest.fixture(scope="module")
def backlog(broker, tmp_path_factory):
    return make_backlog(broker, tmp_path_factory.mktemp("replicas"), SPEC, 2000)


@pytest.fixture(scope="module")
def large_backlog(broker, tmp_path_factory):
    return make_backlog(broker, tmp_path_factory.mktemp("large"), LARGE, 2000)


@pytest.fixture(scope="module")
def numeric_backlog(broker, tmp_path_factory):
    """The same traffic without its string feature, for `scaled_logreg` (numeric features only)."""
    return make_backlog(broker, tmp_path_factory.mktemp("numeric"), dataclasses.replace(SPEC, numeric=True), 2000)


def replica_config(broker, backlog, state: Path, group: str, cluster: str = "", snapshots: bool = False,
                   model: str = "logreg") -> Path:
    """The backlog's config with no probes (every example is learned: the learned count says when all are), the
    drift policy off (not yet with replicas), snapshots on or off, and `cluster`."""
    config = write_config(state.parent / f"{state.name}.toml", state, "kafka", broker.bootstrap_servers, backlog.topics,
                          group, every_examples=1000, extra=in_order(SPEC) + "[eval]\nprobe_size = 0\n"
                          "[drift.policy]\nenabled = false\n" + cluster)
    text = config.read_text().replace('model = "logreg"', f'model = "{model}"')
    config.write_text(text if snapshots else text.replace("[snapshot]\n", "[snapshot]\nenabled = false\n"))
    return config


class Life:
    """`count` replicas started together (a fresh rendezvous port), from whatever their snapshots hold."""

    def __init__(self, broker, backlog, name: str, count: int, running: list, group: str, snapshots: bool = False,
                 shared: str = "", model: str = "logreg") -> None:
        port = free_port()
        self.states = [backlog.folder / f"{name}-{rank}" for rank in range(count)]
        self.processes, self.logs = [], []
        for rank, state in enumerate(self.states):
            cluster = (f"[cluster]\nreplicas = {count}\nrank = {rank}\ninit_method = \"tcp://127.0.0.1:{port}\"\n"
                       f"sync_every = 60\ntimeout = 60\n" + (f"snapshot_dir = \"{shared}\"\n" if shared else ""))
            config = replica_config(broker, backlog, state, group, cluster, snapshots, model)
            state.mkdir(exist_ok=True)
            self.logs.append(backlog.folder / f"{name}-{rank}-{uuid.uuid4().hex[:4]}.log")
            self.processes.append(start_service(config, self.logs[-1]))
            running.append((self.processes[-1], self.logs[-1]))
        self.ports = [metrics_port(log, p) for log, p in zip(self.logs, self.processes)]   # after the restore
        self.baseline = [restored_count(log) for log in self.logs]   # learning may have begun by a first scrape

    def counts(self) -> list[float]:
        """Each replica's examples learned, restored ones included."""
        return [(scrape(p) or (0.0, 0.0))[0] for p in self.ports]

    def learned(self) -> float:
        """Examples learned in this life, across the replicas."""
        return sum(self.counts()) - sum(self.baseline)

    def finish(self, remaining: int) -> list[dict]:
        """Runs until the replicas learned `remaining` more and synced after it, then stops them; their summaries."""
        wait_for(lambda: self.learned() >= remaining, timeout=180, what="the replicas to learn the backlog")

        def synced_after_all() -> bool:   # each replica's newest sync came after everything it learned
            counts = self.counts()
            syncs = [re.findall(r"sync \d+ at event time [\d.-]+; (\d+) examples learned", log.read_text())
                     for log in self.logs]
            return all(s and int(s[-1]) == int(c) for s, c in zip(syncs, counts))

        wait_for(synced_after_all, timeout=120, what="a last sync after the backlog")
        return self.stop()

    def stop(self) -> list[dict]:
        for p in self.processes:
            p.send_signal(signal.SIGTERM)
        for p, log in zip(self.processes, self.logs):
            assert p.wait(timeout=120) == 0, log.read_text()[-3000:]
        return [json.loads((state / "summary.json").read_text()) for state in self.states]

    def kill(self, first: int) -> None:
        """SIGKILLs replica `first`, then the others, as torchrun's agent does when one dies."""
        for rank in [first] + [r for r in range(len(self.processes)) if r != first]:
            self.processes[rank].send_signal(signal.SIGKILL)
            self.processes[rank].wait()


def restored_count(log: Path) -> int:
    """The examples a replica's restored models had learned (0 from scratch), as its log says."""
    found = re.search(r"restored .*: (\d+) examples learned", log.read_text())
    return int(found.group(1)) if found else 0


def run_replicas(broker, backlog, name: str, running: list, snapshots: bool = False, model: str = "logreg") -> list[dict]:
    """Both replicas from scratch to the end of the backlog and past their last sync; their summaries."""
    life = Life(broker, backlog, name, 2, running, f"{name}-{uuid.uuid4().hex[:6]}", snapshots, model=model)
    return life.finish(len(backlog.reference.ids))   # learned and held out by the single-process reference


def ids_by_rank(backlog, name: str, count: int) -> list[list[str]]:
    return [learned_ids(backlog.folder / f"{name}-{rank}") for rank in range(count)]


def test_two_replicas_learn_each_example_once_and_end_with_one_model(broker, backlog, running):
    first = run_replicas(broker, backlog, "two", running)
    ids = [i for rank in ids_by_rank(backlog, "two", 2) for i in rank]
    assert len(ids) == len(set(ids)), "an example was learned by both replicas"
    assert set(ids) == set(backlog.reference.ids), "an example was lost"
    assert sum(s["learned"] for s in first) == len(backlog.reference.ids)
    assert {k: first[0]["join"][k] + first[1]["join"][k] for k in first[0]["join"]} == backlog.reference.summary["join"]
    assert first[0]["cluster"]["parameters"] == first[1]["cluster"]["parameters"], "the replicas' models differ"
    assert first[0]["cluster"]["syncs"] >= 10
    second = run_replicas(broker, backlog, "again", running)
    assert second[0]["cluster"]["parameters"] == first[0]["cluster"]["parameters"], "a second run ended elsewhere"


@pytest.mark.parametrize("stream, kills", [("backlog", 5), pytest.param("large_backlog", 12, marks=pytest.mark.scale)])
def test_sigkills_of_a_replica_with_restarts_end_as_the_uninterrupted_run(broker, running, stream, kills, request):
    """`kills` times, one replica is SIGKILLed at a random point (then the other, as a supervisor does) and both
    restart from the newest epoch they both have a snapshot of; the end equals an uninterrupted run's."""
    backlog = request.getfixturevalue(stream)
    steady = run_replicas(broker, backlog, "steady", running, snapshots=True)
    expected = ids_by_rank(backlog, "steady", 2)
    assert sorted(expected[0] + expected[1]) == sorted(backlog.reference.ids)
    rng, group, shared = random.Random(5), f"killed-{uuid.uuid4().hex[:6]}", str(backlog.folder / "killed-snapshots")
    for kill in range(kills):
        life = Life(broker, backlog, "killed", 2, running, group, snapshots=True, shared=shared)
        restored = sum(map(len, ids_by_rank(backlog, "killed", 2)))
        assert restored < len(backlog.reference.ids), f"the backlog was learned before kill {kill + 1}"
        target = rng.randrange(1000, 3000)
        wait_for(lambda: life.learned() >= target, timeout=120, interval=0.02, what=f"the point of kill {kill + 1}")
        victim = rng.randrange(2)
        life.kill(victim)
        print(f"kill {kill + 1}: replica {victim} at {restored} + {target} examples")
    last = Life(broker, backlog, "killed", 2, running, group, snapshots=True, shared=shared)
    restored = sum(map(len, ids_by_rank(backlog, "killed", 2)))
    ended = last.finish(len(backlog.reference.ids) - restored)
    assert ids_by_rank(backlog, "killed", 2) == expected, "the learned ids or their order differ"
    assert [s["cluster"]["parameters"] for s in ended] == [s["cluster"]["parameters"] for s in steady]


@pytest.mark.parametrize("stream, counts", [
    ("backlog", [2, 1, 2]), pytest.param("large_backlog", [2, 1, 3, 2], marks=pytest.mark.scale)])
def test_rescaling_learns_every_example_once(broker, running, stream, counts, request):
    """Replicas stop, another number goes on from their snapshots, and so on (2 -> 1 -> 2): each id once."""
    backlog = request.getfixturevalue(stream)
    group, shared = f"rescaled-{uuid.uuid4().hex[:6]}", str(backlog.folder / "rescaled-snapshots")
    total, ranks = len(backlog.reference.ids), max(counts)
    for step, count in enumerate(counts):
        share = (step + 1) / len(counts)
        life = Life(broker, backlog, "rescaled", count, running, group, snapshots=True, shared=shared)
        before = sum(map(len, ids_by_rank(backlog, "rescaled", ranks)))
        assert before < total, f"the backlog was learned before the rescale to {count}: make it larger"
        if share < 1.0:
            wait_for(lambda: before + life.learned() >= total * share, timeout=120, what=f"{share:.0%} learned")
            life.stop()
        else:
            ended = life.finish(total - before)
    ids = [i for rank in ids_by_rank(backlog, "rescaled", ranks) for i in rank]
    assert len(ids) == len(set(ids)), "an example was learned twice"
    assert set(ids) == set(backlog.reference.ids), "an example was lost"
    joins = [s["join"] for s in ended]
    assert {k: sum(j.get(k, 0) for j in joins) for k in joins[0]} == backlog.reference.summary["join"]


@pytest.mark.parametrize("model, stream", [("logreg", "backlog"), ("scaled_logreg", "numeric_backlog"),
                                           ("mlp", "backlog")])
def test_the_averaged_model_scores_as_well_as_one_learner(broker, running, model, stream, request):
    backlog = request.getfixturevalue(stream)
    state = backlog.folder / f"one-{model}"
    config = replica_config(broker, backlog, state, f"one-{uuid.uuid4().hex[:6]}", model=model)
    one = run_kafka(config, state, backlog.produced, len(backlog.reference.ids), timeout=180).summary
    replicas = run_replicas(broker, backlog, f"quality-{model}", running, model=model)
    assert replicas[0]["cluster"]["parameters"] == replicas[1]["cluster"]["parameters"]
    for name, scores in one["models"].items():
        learned = [r["models"][name]["learned"] for r in replicas]
        accuracy = sum(n * r["models"][name]["scores"]["accuracy"] for n, r in zip(learned, replicas)) / sum(learned)
        print(f"{model} {name}: one learner {scores['scores']['accuracy']:.4f}, two replicas {accuracy:.4f}")
        assert accuracy >= 0.98 * scores["scores"]["accuracy"]


@pytest.mark.parametrize("table, env, problem", [
    ({"source": "file:x.jsonl"}, {}, "cluster.replicas: more than 1 needs source"),
    ({"cluster": {"rank": 2}}, {}, "cluster.rank: 2 is not below cluster.replicas (2)"),
    ({"cluster": {"replicas": 1, "snapshot_dir": "shared"}, "source": "file:x.jsonl"}, {},
     "cluster.snapshot_dir: a cluster needs source"),
    ({"drift": {"policy": {"enabled": True}}}, {"RANK": "0"}, "drift.policy.enabled: set it false"),
])
def test_what_replicas_cannot_do_yet_stops_at_start_with_one_line(table, env, problem):
    base = {"cluster": {"replicas": 2}, "snapshot": {"enabled": False}, "drift": {"policy": {"enabled": False}}}
    merged = {**base, **{k: ({**base.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in table.items()}}
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_config(merged, env=env)


def test_the_rank_comes_from_the_config_or_from_torchrun():
    table = {"cluster": {"replicas": 3}, "snapshot": {"enabled": False}, "drift": {"policy": {"enabled": False}}}
    assert replica_rank(parse_config(table, env={}), env={"RANK": "2"}) == 2
    assert replica_rank(parse_config({**table, "cluster": {"replicas": 3, "rank": 1}}, env={}), env={}) == 1
    with pytest.raises(ConfigError, match="cluster.rank: not set, and RANK=None"):
        replica_rank(parse_config(table, env={}), env={})
    assert intake_share(3, 1, 2, 1) == Share(4, 6)   # replica 1's second intake: partitions 4, 10, ... (p mod 3 = 1)


class SilentPeer(SoloGroup):
    """A group whose other replica never gets ready: only this replica's word reaches the store."""

    size = 2


def ten_second_epochs(**cluster):
    config = parse_config({"cluster": {"replicas": 2, "rank": 0, "sync_every": 10, **cluster},
                           "snapshot": {"enabled": False}, "drift": {"policy": {"enabled": False}}}, env={})
    return config, build_learner("default", config.models["default"], config)


def examples(start: int, stop: int) -> list[Example]:
    return [Example(f"e-{i}", "default", {"x": float(i)}, i % 2, 1.0, float(i), float(i)) for i in range(start, stop)]


def test_a_replica_whose_peers_never_come_fails_after_the_timeout_with_one_line_and_a_stop_tells_them():
    config, learner = ten_second_epochs(timeout=0.3)
    peer = SilentPeer()
    epochs = EpochSync(config.cluster, {"default": learner}, peer, Controls(False, lambda: False, None, None))
    out, stop = [], threading.Event()
    with pytest.raises(PeerLost, match=r"replica 0: not every replica reached sync 1 within cluster.timeout = 0.3 s"):
        for piece in epochs.batches(iter([Batch(examples(0, 25))]), stop.is_set):
            out += [e.id for e in piece.examples]
            stop.set()   # asked to stop while the first sync waits: the others are told, so they join it
    assert out == [f"e-{i}" for i in range(10)], "what was before the boundary was not handed over once"
    assert peer.stop_posted(), "the other replicas were not told to stop"


def test_a_snapshot_at_a_sync_holds_what_comes_until_the_barrier_and_a_restore_learns_it_first():
    """With one replica (SoloGroup): the sync at 10 s agrees on a snapshot; until the barrier comes, what the
    intake releases is held, and kept in the epoch state; the learned sequence is the input's either way."""
    config, learner = ten_second_epochs(replicas=1, snapshot_dir="shared")
    asked = []
    controls = Controls(True, lambda: len(asked) == 0, lambda mine: asked.append(mine), None)
    epochs = EpochSync(config.cluster, {"default": learner}, SoloGroup(), controls)
    inner = [Batch(examples(0, 15)), Batch(examples(15, 20)), Batch(examples(20, 30), barrier=b"intake"),
             Batch(examples(30, 35))]
    out, at_barrier = [], None
    for piece in epochs.batches(iter(inner), lambda: False):
        out += [e.id for e in piece.examples]
        if piece.barrier is not None:
            at_barrier = epochs.state()
    assert out == [f"e-{i}" for i in range(35)] and asked == [True]
    assert at_barrier.epoch == 1 and at_barrier.boundary == 20.0
    assert [e.id for e in at_barrier.held] == [f"e-{i}" for i in range(10, 30)]
    assert epochs.syncs == 3, "the held examples passed two more boundaries (20 s and 30 s)"
    _, fresh = ten_second_epochs(replicas=1, snapshot_dir="shared")
    restored = EpochSync(config.cluster, {"default": fresh}, SoloGroup(), controls, at_barrier)
    again = [e.id for piece in restored.batches(iter([Batch(examples(30, 35))]), lambda: False) for e in piece.examples]
    assert again == [f"e-{i}" for i in range(10, 35)] and restored.syncs == 3


def test_replica_zero_publishes_for_all_and_every_metric_carries_the_replica_label(tmp_path):
    table = {"state_dir": str(tmp_path), "drift": {"policy": {"enabled": False}}, "publish": {"enabled": True},
             "metrics": {"enabled": False}, "kafka": {"bootstrap_servers": "127.0.0.1:1"}}
    alone = Service(parse_config({**table, "cluster": {"snapshot_dir": str(tmp_path / "shared")}}, env={}))
    try:
        assert alone.handoff is not None, "replica 0 makes candidates and publishes"
        families = {f.name: f for f in alone.registry.collect()}
        assert families["streamlearn_cluster_replicas"].samples[0].labels == {"replica": "0"}
        assert all(s.labels.get("replica") == "0" for f in families.values() for s in f.samples)
        assert (tmp_path / "shared" / "replica-0").is_dir(), "its snapshots go to its folder of the shared one"
    finally:
        alone.close()
    second = parse_config({**table, "cluster": {"replicas": 2, "rank": 1}}, env={})
    assert _handoff(second, {}, None) is None, "only replica 0 publishes"
