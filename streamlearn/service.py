"""The service: intake batches in, test-then-train per model, metrics out.

The learner side owns everything a snapshot will need: the models, the scores,
the offsets of the last batch learned and the intake's counters at that point.

>>> import tempfile, pathlib
>>> from streamlearn.config import parse_config
>>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
>>> _ = path.write_text('{"id": "e-1", "ts": 1, "features": {"x": 1.0}, "label": 1}\\n')
>>> cfg = parse_config({"source": f"file:{path}", "state_dir": str(path.parent), "intake": {"mode": "inline"},
...                     "metrics": {"enabled": False}}, env={})
>>> Service(cfg).run()["learned"]
1
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn, Optional

import msgspec
from prometheus_client import CollectorRegistry

from streamlearn.checkpoints.audit import AuditLog
from streamlearn.checkpoints.catalog import open_store, problem_with
from streamlearn.checkpoints.content import Content, ServiceFigures, pack, unpack
from streamlearn.checkpoints.cut import Cut
from streamlearn.checkpoints.snapshotter import Serialize, Snapshotter, config_fingerprint
from streamlearn.checkpoints.store import Snapshot, SnapshotStore
from streamlearn.config import Config, ConfigError, ModelConfig, replica_rank
from streamlearn.learners.contract import Learner, build_learner
from streamlearn.learners.evaluation import ModelEvaluation
from streamlearn.learners.models import ModelError
from streamlearn.learners.served import ServedScores
from streamlearn.records import Batch, Example, IntakeStats, Rejected
from streamlearn.stream.channel import Channel, start_intake
from streamlearn.stream.intake import Resume
from streamlearn.telemetry.exporter import ClusterCollector, ReplicaLabelled, ServiceCollector
from streamlearn.telemetry.histogram import STAGE_BUCKETS, Histogram, HistogramState
from streamlearn.telemetry.history import HistoryRecorder, HistoryWriter
from streamlearn.telemetry.server import MetricsServer
from streamlearn.triggers import Trigger

if TYPE_CHECKING:
    from streamlearn.cluster.epochs import EpochSync

log = logging.getLogger(__name__)
STALL_SECONDS = 60.0  # /healthz fails when the loop has not turned for this long
# The feedback loop's stages timed on the learner side, per example (wall clock, measurement only; the intake times
# kafka, join and batch): handoff: the intake handed the batch over -> this process received it; queue: received ->
# its learning started; learn: started -> the whole batch learned.
LEARNER_STAGES = ("handoff", "queue", "learn")


class LearnFailure(RuntimeError):
    """A model refused an example under `on_error = "fail"`: the service stopped at its last durable state."""


class Service:
    """One running streamlearn: the learners, the intake channel and the metrics endpoint."""

    def __init__(self, config: Config, registry: Optional[CollectorRegistry] = None,
                 from_snapshot: Optional[int] = None) -> None:
        self.config = config
        self.learners = {name: _build_learner(name, m, config) for name, m in config.models.items()}
        self.served = {name: ServedScores(m.task, config.eval.served_versions) for name, m in config.models.items()}
        self.history = _history_recorder(config)
        self.stats: Optional[IntakeStats] = None
        self.offsets: dict[str, int] = {}
        self.snapshots: Optional[Snapshotter] = None
        self.restored_from: Optional[int] = None
        self._learning_seconds = 0.0
        self.stages = {name: Histogram(STAGE_BUCKETS) for name in LEARNER_STAGES}   # counted since this start
        self._resume = Resume()
        self._deploy_state: Optional[bytes] = None
        audit_length = None
        epoch: Optional[bytes] = None   # a replica's place among the epochs, as restored
        self._group = _replica_group(config)   # here: the rendezvous waits for every replica
        if config.snapshot.enabled and self._group is not None:
            if from_snapshot is not None:
                raise ConfigError("config error: cluster: --from-snapshot is not for replicas (they restore the "
                                  "newest epoch they all have a snapshot of)")
            audit_length, epoch = self._restore_epoch()
        elif config.snapshot.enabled:
            audit_length = self._restore(from_snapshot)
        elif from_snapshot is not None:
            raise ConfigError("config error: snapshot.enabled: --from-snapshot needs snapshots enabled")
        self.handoff = _handoff(config, self.learners, self._deploy_state)
        self.audit = AuditLog(config.snapshot.audit_log, audit_length) if config.snapshot.audit_log else None
        self.registry = registry or CollectorRegistry()
        collector = ServiceCollector(lambda: self.stats, lambda: self.learners.values(), lambda: self.snapshots,
                                     lambda: self.served, lambda: self.handoff,
                                     config.kafka.examples_topic or config.kafka.inference_topic, self.stage_states)
        if self._group is None:
            self.registry.register(collector)
        else:   # every replica's metrics carry its rank, so that dashboards add them up or tell them apart
            self.registry.register(ReplicaLabelled(collector, self._group.rank))
            self.registry.register(ReplicaLabelled(ClusterCollector(lambda: self._epochs.figures()),
                                                   self._group.rank))
        self.metrics: Optional[MetricsServer] = None
        self._channel: Optional[Channel] = None
        self._epochs: Optional["EpochSync"] = self._epoch_sync(epoch) if self._group is not None else None
        self._stop = threading.Event()
        self._intake_stopping = threading.Event()   # replicas: the stop sync is done, the intake is asked to stop
        self._last_turn = time.monotonic()
        self._started = 0.0
        self._cut = Cut(self.snapshots)   # barrier, snapshot and commit, in the order `checkpoints.cut` numbers
        if self._epochs is not None:
            self._cut.agreed = self._epochs.agreed_offsets
        for learner in self.learners.values():
            learner.evaluation.on_evaluation = self._record_evaluation

    def _restore(self, wanted: Optional[int]) -> Optional[int]:
        """Loads the newest snapshot that verifies (or exactly `wanted`); returns its audit length."""
        store = open_store(self.config)
        fingerprint = config_fingerprint(self.config)
        self.snapshots = Snapshotter(self.config.snapshot, store, fingerprint)
        snapshot = _usable_snapshot(store, fingerprint, wanted)
        if snapshot is None:
            return None
        self._take_over(unpack(snapshot), snapshot.manifest.offsets, snapshot.manifest.seq)
        if wanted is not None and wanted != store.latest_seq():
            # A rollback is made the newest snapshot at once: a crash before the next one must not undo it.
            m = snapshot.manifest
            copy = store.write(snapshot.files, m.offsets, fingerprint, m.meta, parent=m.seq)
            log.info("rolled back: snapshot %d is now snapshot %d", m.seq, copy.seq)
        return self.restored_audit_length

    def _restore_epoch(self) -> tuple[Optional[int], Optional[bytes]]:
        """A replica's restore: the newest epoch every replica has a snapshot of, agreed with them
        (`cluster.restore`); its audit length and epoch state."""
        from streamlearn.cluster.restore import restore_point

        fingerprint = config_fingerprint(self.config)
        self.snapshots = Snapshotter(self.config.snapshot, open_store(self.config), fingerprint)
        point = restore_point(self.config, self._group, self._group.rank, fingerprint)
        if point is None:
            return None, None
        self._take_over(point.content, point.offsets, point.seq)
        return self.restored_audit_length, point.content.epoch

    def _take_over(self, content: Content, offsets: dict[str, int], seq: Optional[int]) -> None:
        """Makes a snapshot's content this service's state (the intake's part starts with the channel)."""
        for name, learner in self.learners.items():
            learner.restore(content.learners[name])
        self._learning_seconds = content.figures.learning_seconds
        for name, tallies in content.figures.served.items():
            if name in self.served:
                model = self.config.models[name]
                self.served[name] = ServedScores(model.task, self.config.eval.served_versions, tallies)
        self._deploy_state = content.deploy
        self.snapshots.trigger = Trigger("snapshot", self.config.snapshot, time.monotonic(),
                                         content.figures.snapshot_trigger)
        self._resume = Resume(offsets, content.intake_state)
        self.offsets = dict(offsets)
        self.restored_from = self.snapshots.parent = seq
        self.restored_audit_length = content.figures.audit_length
        what = f"snapshot {seq}" if seq is not None else "the old replicas' snapshots, divided"
        log.info("restored %s: %d examples learned", what, content.figures.learned)

    def start_metrics(self) -> Optional[MetricsServer]:
        """Starts the HTTP endpoint (idempotent); its port is `self.metrics.port`."""
        if self.metrics is None and self.config.metrics.enabled:
            m = self.config.metrics
            try:
                self.metrics = MetricsServer(self.registry, m.host, m.port, self.health, self.ready)
            except OSError as err:
                raise ConfigError(f"config error: metrics.port: cannot listen on {m.host}:{m.port}: "
                                  f"{err.strerror} (0 picks a free port)") from None
            self.metrics.start()
        return self.metrics

    def run(self, until: Optional[Callable[["Service"], bool]] = None,
            on_batch: Optional[Callable[["Service", Batch], None]] = None) -> dict:
        """Learns until the source ends, `stop()` is called, a signal arrives or `until(self)` holds."""
        self.start_metrics()
        restore = _install_signal_handlers(self.stop)
        self._started = time.monotonic()
        self._channel = start_intake(self.config, self._resume)
        self._cut.begin()
        stopping = False
        try:
            # A stop is heard even while no batch comes; a replica's intake stops when the replicas agreed to.
            heard = self._stop.is_set if self._epochs is None else self._intake_stopping.is_set
            batches = self._channel.batches(heard)
            if self._epochs is not None:   # cut at epoch boundaries, where the replicas average their models
                batches = self._epochs.batches(batches, self._stop.is_set)
            for batch in batches:
                self._learn_or_stop(batch, batches)
                if on_batch is not None:
                    on_batch(self, batch)
                if batch.final:
                    break
                if self._epochs is not None:   # replicas stop together, and snapshot at syncs (`EpochSync`)
                    if until is not None and until(self):
                        self.stop()
                elif not stopping and (self._stop.is_set() or (until is not None and until(self))):
                    self._channel.request_stop()  # the intake drains and sends a final batch (with a barrier)
                    stopping = True
                else:   # cut step 1; steps 3-4 run in `_learn` when the barrier arrives
                    self._cut.ask_if_due(self._channel, lambda: self.learned, self._drifts, self._lowest_score)
                self._cut.commit_if_due(self._channel, self.offsets)   # cut step 6
            self._cut.finish(self._channel, self.offsets)   # cut steps 5-6: the write in flight, the last commit
        finally:
            self._channel.close()
            if self._epochs is not None:
                self._epochs.close()
            restore()
        return self.summary()

    def _learn_or_stop(self, batch: Batch, batches: Iterator[Batch]) -> None:
        try:
            self._learn(batch)
        except LearnFailure as failure:
            self._stop_on_failure(failure, batches)

    def _stop_on_failure(self, failure: LearnFailure, batches: Iterator[Batch]) -> NoReturn:
        """on_error = "fail": drains the intake without learning, commits the last durable offsets, raises.

        Nothing of the failing batch reaches a snapshot or a commit: a restart reads it again.
        """
        self._channel.request_stop()
        for batch in batches:   # not learned; the final cut's barrier is not honoured either
            if batch.final:
                break
        self._cut.finish(self._channel, self.offsets)   # the write in flight ends, then the last commit
        if self.snapshots is not None:
            seq = self.snapshots.store.latest_seq()
            where = f"state and offsets stay at snapshot {seq}" if seq is not None else \
                "no snapshot yet, no offsets committed"
        else:
            where = "offsets stay at the batch before (snapshots are off)"
        raise LearnFailure(f"{failure}; {where}") from None

    def _quarantine(self, rejected: list[Rejected]) -> None:
        """Sends examples the models refused to the dead letters; raises for a model with on_error = "fail"."""
        for r in rejected:
            if self.config.models[r.model].on_error == "fail":
                detail = " ".join(r.detail.split())
                raise LearnFailure(f"model \"{r.model}\" refused example \"{r.example.id[:200]}\": {r.error}: "
                                   f"{detail} (models.{r.model}.on_error = \"fail\" stops the service)")
        if rejected and self._channel is not None:
            self._channel.reject(rejected)

    def _unhealthy_models(self) -> list[str]:
        """One line for each model that refuses most of its recent examples."""
        return [problem for l in self.learners.values() if (problem := l.evaluation.health_problem()) is not None]

    def _lowest_score(self) -> float:
        return min((l.evaluation.watched_score for l in self.learners.values()), default=float("nan"))

    def _drifts(self) -> int:
        return sum(l.evaluation.drift.total for l in self.learners.values())

    def _record_evaluation(self, evaluation: ModelEvaluation) -> None:
        if self.history is not None:
            self.history.record(evaluation, self.stats, time.time())

    def _capture(self, intake_state: bytes, final: bool) -> Serialize:
        """Cut step 3: the whole state as it is at the barrier, as files when called (where the writer runs)."""
        if final:
            self.snapshots.trigger.fire("shutdown", self.learned, time.monotonic(), self._drifts())
        audit_length = self.audit.sync() if self.audit is not None else 0
        figures = ServiceFigures(self.learned, self._learning_seconds, audit_length, self.snapshots.trigger.state(),
                                 {name: served.state() for name, served in self.served.items()})
        learners = dict(self.learners)
        handoff = self.handoff.state if self.handoff is not None else lambda: None   # serialized where the writer runs
        # The learners' snapshots are taken where the writer runs too (the forked child: a copy-on-write image of
        # them as they are now), so that the loop does not stall on pickling them.
        epoch = msgspec.msgpack.encode(self._epochs.state()) if self._epochs is not None else None   # now: it moves
        return lambda: pack({name: l.snapshot() for name, l in learners.items()}, intake_state, figures, handoff(),
                            epoch)

    def _snapshot_meta(self) -> dict[str, float]:
        """The figures a snapshot's manifest shows (a replica's: its epoch, count and rank, what a restart picks by)."""
        meta = {"learned": float(self.learned)}
        if self._epochs is not None:
            state = self._epochs.state()
            meta.update(epoch=float(state.epoch), replicas=float(state.replicas), rank=float(state.rank))
        return meta

    def _epoch_sync(self, epoch: Optional[bytes]) -> "EpochSync":
        """The replica's epochs: syncs at event-time boundaries, snapshots at syncs the replicas agree on."""
        from streamlearn.cluster.epochs import Controls, EpochState, EpochSync

        def ask_stop() -> None:
            self._intake_stopping.set()
            self._channel.request_stop()

        def ask_barrier(mine: bool) -> None:
            if not mine:   # another replica's trigger fired: this one's starts its count again too
                self.snapshots.trigger.fire("replicas", self.learned, time.monotonic(), self._drifts())
            self._cut.ask(self._channel)

        controls = Controls(self.snapshots is not None,
                            lambda: self._cut.due(lambda: self.learned, self._drifts, self._lowest_score),
                            ask_barrier, ask_stop)
        state = msgspec.msgpack.decode(epoch, type=EpochState) if epoch is not None else None
        return EpochSync(self.config.cluster, self.learners, self._group, controls, state)

    def stop(self) -> None:
        """Asks the loop to drain the current batch and return (safe from any thread or signal)."""
        self._stop.set()

    def close(self) -> None:
        """Stops the metrics endpoint and closes the audit log."""
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.audit is not None:
            self.audit.close()
        if self.history is not None:
            self.history.close()
        if self.handoff is not None:
            self.handoff.close()

    def _learn(self, batch: Batch) -> None:
        self._last_turn = time.monotonic()
        started, now = time.perf_counter(), time.time()
        for name, examples in _by_model(batch.examples, len(self.learners)) if batch.examples else ():
            self.served[name].observe(examples)
            if self.handoff is not None:   # shadow scoring, and the gate's held-out share
                examples = self.handoff.before_learning(name, examples)
            if self.history is not None:   # cut at every eval.sample_every-th example, to sample the scores
                self.history.learn(self.learners[name], examples, now)
            else:
                self.learners[name].learn_batch(examples, now)
        # The last partial micro-batch is learned at the end of the input; on a stop it stays queued in the
        # final snapshot (unless none is kept), so that a restart continues as if never stopped.
        if batch.exhausted or (batch.final and self.snapshots is None):
            for learner in self.learners.values():
                learner.flush(now)
        self._time_stages(batch, now)
        self._quarantine([r for learner in self.learners.values() for r in learner.evaluation.take_rejected()])
        self._learning_seconds += time.perf_counter() - started
        if self.audit is not None and batch.examples:
            self.audit.append(ex.id for ex in batch.examples)
        if batch.cut:
            self.offsets = batch.offsets
        if self.handoff is not None:
            self.handoff.after_learning(self.offsets, self._newest_snapshot)
        self.stats = batch.stats
        if batch.barrier is not None and self.snapshots is not None:   # cut steps 3-4
            self._cut.take(batch.barrier, batch.final, self.offsets, self._snapshot_meta(), self._capture)

    def _time_stages(self, batch: Batch, started: float) -> None:
        """Observes the learner-side stages of a batch learned from `started` (wall time) until now."""
        count = len(batch.examples)
        if not count or not batch.sent or not batch.received:   # nothing to time, or not stamped
            return
        now = time.time()
        self.stages["handoff"].observe(max(0.0, batch.received - batch.sent), count)
        self.stages["queue"].observe(max(0.0, started - batch.received), count)
        self.stages["learn"].observe(max(0.0, now - started), count)

    def stage_states(self) -> dict[str, HistogramState]:
        """Every stage of the feedback loop timed so far, in loop order: the intake's (as of its newest batch), then
        the learner's."""
        intake = self.stats.stages if self.stats is not None else {}
        return {**intake, **{name: h.state() for name, h in self.stages.items()}}

    def _newest_snapshot(self) -> Optional[int]:
        return self.snapshots.store.latest_seq() if self.snapshots is not None else None

    @property
    def learned(self) -> int:
        return sum(l.evaluation.learned for l in self.learners.values())

    @property
    def held_out(self) -> int:
        """Examples kept aside as forgetting probes or for the gate: taken from the stream but never learned."""
        probes = sum(l.evaluation.probes.held_out for l in self.learners.values() if l.evaluation.probes is not None)
        return probes + (self.handoff.held_out if self.handoff is not None else 0)

    def health(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._last_turn
        if self._channel is not None and stalled > STALL_SECONDS:
            return False, f"learning loop has not turned for {stalled:.0f} s"
        problem = self._source_problem()
        return True, f"ok (the loop turns; {problem})" if problem else "ok"

    def _source_problem(self) -> str:
        """What keeps the intake from reading (e.g. the broker unreachable), as of its newest batch; "" if nothing."""
        return self.stats.broker if self.stats is not None else ""

    def ready(self) -> tuple[bool, str]:
        if self.stats is None:
            return False, "waiting for the intake"
        if self._source_problem():
            return False, self._source_problem()
        if not self.stats.assigned:
            return False, "no partitions assigned yet"
        if self.snapshots is not None:
            age = self.snapshots.age(time.time())
            age = age if age is not None else time.monotonic() - self._started
            if age > self.config.snapshot.max_age_seconds:
                return False, f"newest good snapshot is {age:.0f} s old"
        if sick := self._unhealthy_models():
            return False, "; ".join(sick)
        return True, "ok"

    def summary(self) -> dict:
        stats = self.stats or IntakeStats()
        elapsed = time.monotonic() - self._started if self._started else 0.0
        events: dict[str, dict[str, int]] = {}
        for (topic, outcome), n in sorted(stats.events.items()):
            events.setdefault(topic, {})[outcome] = n
        dead: dict[str, int] = {}
        for (_, reason), n in stats.dead_letters.items():
            dead[reason] = dead.get(reason, 0) + n
        return {
            "events": events,
            "dead_letters": dict(sorted(dead.items())),
            "join": dict(sorted(stats.join.items())),
            "join_pending": stats.join_pending,
            "learned": self.learned,
            "held_out": self.held_out,
            "models": {name: {**l.evaluation.summary(), **l.metrics().extra,
                              "served_versions": self.served[name].summary()} for name, l in self.learners.items()},
            "offsets": dict(sorted(self.offsets.items())),
            "elapsed_seconds": round(elapsed, 3),
            "learning_seconds": round(self._learning_seconds, 3),
            "examples_per_second": round(self.learned / elapsed, 1) if elapsed else 0.0,
            **({"deploy": self.handoff.summary()} if self.handoff is not None else {}),
            **({"cluster": self._epochs.summary()} if self._epochs is not None else {}),
        }


def _by_model(examples: list[Example], models: int):
    """Splits a batch per model, keeping each model's examples in order."""
    if models == 1:
        return [(examples[0].model, examples)]
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.model, []).append(ex)
    return list(groups.items())


def _install_signal_handlers(stop: Callable[[], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT drain and stop; a second SIGINT interrupts at once. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("signal %d: draining the current batch, then stopping", signum)
        stop()

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _usable_snapshot(store: SnapshotStore, fingerprint: str, wanted: Optional[int]) -> Optional[Snapshot]:
    """The newest snapshot that verifies and fits this config, or exactly `wanted` (a ConfigError if unusable)."""
    for seq, snapshot in store.newest_valid(at_most=wanted):
        if wanted is not None and seq != wanted:
            break
        problem = problem_with(snapshot, fingerprint)
        if problem is None:
            return snapshot
        if wanted is not None:
            raise ConfigError(f"config error: --from-snapshot: snapshot {seq} cannot be used: {problem}")
        log.warning("snapshot %d skipped: %s", seq, problem)
    if wanted is not None:
        raise ConfigError(f"config error: --from-snapshot: no snapshot {wanted} in {store.root}")
    return None


def _build_learner(name: str, model: ModelConfig, config: Config) -> Learner:
    """A learner per configured model; a model that cannot be built is a config error naming its key."""
    try:
        return build_learner(name, model, config)
    except ModelError as err:
        raise ConfigError(f"config error: models.{name}.{err.key}: {err}") from None


def _replica_group(config: Config):
    """This replica's group (a `ReplicaGroup` over torch.distributed, a `SoloGroup` alone); None outside a cluster."""
    if not config.cluster.enabled:
        return None
    from streamlearn.cluster.group import ReplicaGroup, SoloGroup   # here: one service never imports torch.distributed

    cluster = config.cluster
    if cluster.replicas == 1:
        return SoloGroup()
    return ReplicaGroup(replica_rank(config), cluster.replicas, cluster.init_method, timeout=cluster.timeout)


def _handoff(config: Config, learners: dict[str, Learner], state: Optional[bytes]):
    """Candidates, gate and publishing, when `publish.enabled` (imported only then)."""
    if not config.publish.enabled or replica_rank(config) != 0:   # replicas: rank 0 publishes for them all
        return None
    from streamlearn.deploy.handoff import Handoff

    return Handoff(config, learners, state)


def _history_recorder(config: Config) -> Optional[HistoryRecorder]:
    if not config.eval.history:
        return None
    writer = HistoryWriter(Path(config.state_dir) / "history.jsonl", int(config.eval.history_max_mb * 2 ** 20))
    return HistoryRecorder(writer, config.eval.sample_every)
