"""Two replicas of one service on one backlog: every example learned once across them, one model at the end.

The backlog of `tests/test_backlog.py` (4 partitions per topic, co-partitioned by request id) is read by two
`streamlearn run` processes, replica 0 reading partitions 0 and 2, replica 1 partitions 1 and 3. They average
their River models every 60 s of event time over torch.distributed (gloo, TCP on loopback).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import uuid
from pathlib import Path

import pytest

from bench.backlog import (BacklogSpec, in_order, learned_ids, metrics_port, run_kafka, scrape, start_service,
                           write_config)
from streamlearn.cluster.epochs import EpochSync
from streamlearn.config import ConfigError, parse_config, replica_rank
from streamlearn.learners.contract import build_learner
from streamlearn.records import Batch, Example
from streamlearn.stream.broker import free_port
from streamlearn.stream.source import Share, intake_share
from tests.conftest import wait_for
from tests.test_backlog import make_backlog

SPEC = BacklogSpec(requests=20_000, seed=47, rate=5.0)


@pytest.fixture(scope="module")
def backlog(broker, tmp_path_factory):
    return make_backlog(broker, tmp_path_factory.mktemp("replicas"), SPEC, 2000)


def replica_config(broker, backlog, state: Path, group: str, cluster: str = "") -> Path:
    """The backlog's config with snapshots off (not yet with replicas), no probes (every example is learned: the
    learned count says when all are), the drift policy off (not yet with replicas), and `cluster`."""
    config = write_config(state.parent / f"{state.name}.toml", state, "kafka", broker.bootstrap_servers, backlog.topics,
                          group, extra=in_order(SPEC) + "[eval]\nprobe_size = 0\n[drift.policy]\nenabled = false\n"
                          + cluster)
    config.write_text(config.read_text().replace("[snapshot]\n", "[snapshot]\nenabled = false\n"))
    return config


def run_replicas(broker, backlog, name: str, running: list) -> list[dict]:
    """Both replicas to the end of the backlog and past their last sync; their summaries."""
    port, group = free_port(), f"{name}-{uuid.uuid4().hex[:6]}"
    states = [backlog.folder / f"{name}-{rank}" for rank in range(2)]
    processes, logs = [], []
    for rank, state in enumerate(states):
        config = replica_config(broker, backlog, state, group, f"[cluster]\nreplicas = 2\nrank = {rank}\n"
                                f"init_method = \"tcp://127.0.0.1:{port}\"\nsync_every = 60\n")
        state.mkdir()
        logs.append(backlog.folder / f"{name}-{rank}.log")
        processes.append(start_service(config, logs[-1]))
        running.append((processes[-1], logs[-1]))
    ports = [metrics_port(log, p) for log, p in zip(logs, processes)]
    expected = len(backlog.reference.ids)   # learned and held out by the single-process reference

    def learned() -> list[float]:
        return [(scrape(p) or (0.0, 0.0))[0] for p in ports]

    wait_for(lambda: sum(learned()) >= expected, timeout=180, what="the two replicas to learn the backlog")

    def synced_after_all() -> bool:   # each replica's newest sync came after everything it learned
        counts = learned()
        syncs = [re.findall(r"sync \d+ at event time [\d.]+; (\d+) examples learned", log.read_text()) for log in logs]
        return all(s and int(s[-1]) == int(c) for s, c in zip(syncs, counts))

    wait_for(synced_after_all, timeout=120, what="a last sync after the backlog")
    for p in processes:
        p.send_signal(signal.SIGTERM)
    for p in processes:
        assert p.wait(timeout=120) == 0
    return [json.loads((state / "summary.json").read_text()) for state in states]


def test_two_replicas_learn_each_example_once_and_end_with_one_model(broker, backlog, running):
    first = run_replicas(broker, backlog, "two", running)
    ids = [i for rank in range(2) for i in learned_ids(backlog.folder / f"two-{rank}")]
    assert len(ids) == len(set(ids)), "an example was learned by both replicas"
    assert set(ids) == set(backlog.reference.ids), "an example was lost"
    assert sum(s["learned"] for s in first) == len(backlog.reference.ids)
    assert {k: first[0]["join"][k] + first[1]["join"][k] for k in first[0]["join"]} == backlog.reference.summary["join"]
    assert first[0]["cluster"]["parameters"] == first[1]["cluster"]["parameters"], "the replicas' models differ"
    assert first[0]["cluster"]["syncs"] >= 10
    second = run_replicas(broker, backlog, "again", running)
    assert second[0]["cluster"]["parameters"] == first[0]["cluster"]["parameters"], "a second run ended elsewhere"


def test_the_averaged_model_scores_as_well_as_one_learner(broker, backlog, running):
    state = backlog.folder / "one"
    config = replica_config(broker, backlog, state, f"one-{uuid.uuid4().hex[:6]}")
    one = run_kafka(config, state, backlog.produced, len(backlog.reference.ids), timeout=180).summary
    replicas = run_replicas(broker, backlog, "quality", running)
    for model, scores in one["models"].items():
        learned = [r["models"][model]["learned"] for r in replicas]
        accuracy = sum(n * r["models"][model]["scores"]["accuracy"] for n, r in zip(learned, replicas)) / sum(learned)
        print(f"{model}: one learner {scores['scores']['accuracy']:.4f}, two replicas {accuracy:.4f}")
        assert accuracy >= 0.98 * scores["scores"]["accuracy"]


@pytest.mark.parametrize("table, env, problem", [
    ({"source": "file:x.jsonl"}, {}, "cluster.replicas: more than 1 needs source"),
    ({"cluster": {"rank": 2}}, {}, "cluster.rank: 2 is not below cluster.replicas (2)"),
    ({"snapshot": {"enabled": True}}, {"RANK": "0"}, "snapshot.enabled: not yet with cluster.replicas > 1"),
    ({"publish": {"enabled": True}}, {"RANK": "0"}, "publish.enabled: not yet with cluster.replicas > 1"),
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


class SilentPeer:
    """A group whose other replica never gets ready: only readiness is asked of it (no collective runs)."""

    rank, size = 0, 2

    def __init__(self) -> None:
        self.posted: dict[int, int] = {}

    def post_ready(self, sync: int, count: int = 1) -> None:
        self.posted[sync] = self.posted.get(sync, 0) + count

    def ready(self, sync: int) -> int:
        return self.posted.get(sync, 0)   # this replica's word only

    def close(self) -> None:
        pass


def test_a_stop_while_waiting_for_the_others_learns_each_example_once_and_takes_the_word_back():
    config = parse_config({"cluster": {"replicas": 2, "rank": 0, "sync_every": 10}, "snapshot": {"enabled": False},
                           "drift": {"policy": {"enabled": False}}}, env={})
    learner = build_learner("default", config.models["default"], config)
    peer = SilentPeer()
    epochs = EpochSync(config.cluster, 0, {"default": learner}, group=peer)
    batch = Batch([Example(f"e-{i}", "default", {"x": float(i)}, i % 2, 1.0, float(i), float(i)) for i in range(25)])
    stop = threading.Event()
    out = []
    for piece in epochs.batches(iter([batch]), stop.is_set):
        out += [e.id for e in piece.examples]
        stop.set()   # asked to stop while the first sync waits for the silent peer
    assert out == [f"e-{i}" for i in range(25)], "an example was handed over twice, or lost"
    assert peer.posted == {0: 0}, "the readiness was not taken back"
    assert epochs.syncs == 0
