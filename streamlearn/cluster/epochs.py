"""Replicas average their models at event-time epochs: where a sync falls is decided by the data, never the clock.

Each replica learns the examples of its share of the partitions. Every
`cluster.sync_every` seconds of event time (the epoch boundaries) the replicas
average their models' parameters (`ReplicaGroup.average`), each weighted by the
examples it learned since the last sync. A replica is ready for a sync when it has
learned every example before the boundary: an example at or past it arrives (the
batch is cut there: the learner gets the part before, then the sync runs, then the
rest), or its intake says that everything before the boundary has been released
(`IntakeStats.released_to`). A replica that is caught up (its partitions at their
end) has nothing more to learn before any boundary: it joins a sync another replica
is ready for, or asks for one when it learned something since the last. Readiness
goes through the rendezvous store, so a replica waiting for the others polls.

Each sync agrees on the highest boundary any replica was at, and the next one is
that plus `sync_every` on every replica. On a replayable source the same syncs fall
at the same places of every replica's sequence, so two runs end with the same
parameters. With live traffic an example that arrives after its replica joined a
sync in idleness is learned after it, whatever its event time.

**Snapshots are taken at syncs** (Flink's aligned checkpoints, with the sync as the
barrier). A sync also agrees whether any replica's snapshot trigger fired; if so,
every replica asks its intake for a barrier and, until it comes, holds whatever the
intake releases instead of learning it. The snapshot so holds the averaged models of
that sync, the intake's state at its barrier, and the held examples (learned first
after a restore): a state of epoch `syncs` on every replica. A restart takes the
newest epoch that every replica has a snapshot of (`cluster.restore`), and goes on
exactly as a run that was not interrupted.

**A stop is a sync where it falls:** the replica asked to stop tells the others
through the store; each joins one more sync where it is, then all take their final
snapshot there. (A stop, unlike a crash, so lands at a moment of the wall clock:
a run stopped and restarted learns every example once, but its averages fall at
other places than an uninterrupted run's.)
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Callable, Iterator, Mapping, NamedTuple, Optional

import msgspec

from streamlearn.cluster.wire import encode_sets
from streamlearn.config import ClusterConfig, ConfigError
from streamlearn.learners.averaging import Averageable
from streamlearn.learners.contract import Learner
from streamlearn.records import Batch, Example
from streamlearn.telemetry.exporter import ClusterFigures
from streamlearn.telemetry.histogram import LATENCY_BUCKETS, Histogram

log = logging.getLogger(__name__)
POLL_SECONDS = 0.005   # how often a replica waiting for the others looks at the store
LOOK_SECONDS = 0.1     # how often a learning replica looks whether another asked every replica to stop


class ReplicaFailure(RuntimeError):
    """A sync that cannot go on: this replica stops (every replica restarts from the newest common epoch)."""


class PeerLost(ReplicaFailure):
    """The other replicas did not reach a sync within `cluster.timeout`: this replica stops, to be restarted."""


class EpochState(msgspec.Struct):
    """A replica's place among the epochs, as its snapshot keeps it (taken right after sync number `epoch`)."""

    epoch: int                      # syncs so far
    replicas: int
    rank: int
    boundary: Optional[float]       # event time of the next sync (None: no example yet)
    held: list[Example] = []        # released after the sync, before the barrier: learned first after a restore


class Controls(NamedTuple):
    """What a sync asks of the service around it."""

    snapshots: bool                       # snapshots are on: a sync may ask for one
    snapshot_due: Callable[[], bool]      # this replica's snapshot trigger fired
    ask_barrier: Callable[[bool], None]   # asks the intake for a barrier (the argument: this replica's trigger fired)
    ask_stop: Callable[[], None]          # asks the intake to stop (its final batch carries a barrier)


class EpochSync:
    """Cuts the learner's batches at epoch boundaries and averages the models with the other replicas there."""

    def __init__(self, cluster: ClusterConfig, learners: Mapping[str, Learner], group, controls: Controls,
                 state: Optional[EpochState] = None) -> None:
        self.every = cluster.sync_every
        self.timeout = cluster.timeout
        self.learners = dict(learners)
        self.group = group   # a `ReplicaGroup`, or a `SoloGroup` for one replica
        self.controls = controls
        self._params = {name: _averageable(name, learner) for name, learner in self.learners.items()}
        self.syncs = state.epoch if state is not None else 0
        self.boundary = state.boundary if state is not None else None
        self._held: list[Example] = list(state.held) if state is not None else []
        self._frozen = False         # a barrier is asked for: what the intake releases is held until it comes
        self._stop_heard = False     # a stop was asked here or by another replica
        self._stopping = False       # the stop sync is done: the intake is asked for its final batch
        self._next_look = 0.0
        self._durable: dict[int, dict[str, int]] = {}   # epoch -> offsets of this replica's durable snapshot of it
        self._committable: dict[str, int] = {}
        self._handed = 0   # examples handed to the learners since the last sync (learned, or queued in a micro-batch)
        self.wait_seconds = Histogram(LATENCY_BUCKETS)
        self.average_seconds = Histogram(LATENCY_BUCKETS)
        self._learned_at_sync = self._learned()

    def batches(self, inner: Iterator[Batch], stopping: Callable[[], bool]) -> Iterator[Batch]:
        """`inner`'s batches, cut at epoch boundaries; the syncs run between the pieces (after the learner took
        the piece before), and after a batch that released everything before a boundary."""
        if self._held:   # restored: what the snapshot held goes first, as it would have
            yield from self._release_held(None, stopping)
        for batch in inner:
            if not self._frozen and not self._stopping and self._stop_asked(stopping):
                self._sync(stopping)   # the stop sync: every replica joins it where it is
            yield from self._pieces(batch, stopping)
            if batch.final:
                return
            if self._frozen and batch.barrier is not None:   # the service took the snapshot
                yield from self._release_held(batch, stopping)
            if not self._frozen and not self._stopping:
                self._sync_if_passed(batch, stopping)

    def _release_held(self, batch: Optional[Batch], stopping: Callable[[], bool]) -> Iterator[Batch]:
        self._frozen = False
        held, self._held = self._held, []
        yield from self._pieces(Batch(held, stats=batch.stats if batch else None, cut=False), stopping)

    def _pieces(self, batch: Batch, stopping: Callable[[], bool]) -> Iterator[Batch]:
        examples, start = batch.examples, 0
        if self.boundary is None and examples:
            self.boundary = (math.floor(examples[0].ts / self.every) + 1) * self.every
        while not self._frozen and not self._stopping and self.boundary is not None:
            cut = next((i for i in range(start, len(examples)) if examples[i].ts >= self.boundary), None)
            if cut is None:
                break
            yield Batch(examples[start:cut], stats=batch.stats, cut=False, sent=batch.sent, received=batch.received)
            self._handed += cut - start
            start = cut
            self._sync(stopping)
        if self._frozen:   # held for the snapshot (the rest of the batch, then every batch until the barrier)
            self._held.extend(examples[start:])
            start = len(examples)
        if start:
            batch.examples = examples[start:]
        self._handed += len(batch.examples)
        yield batch

    def _sync_if_passed(self, batch: Batch, stopping: Callable[[], bool]) -> None:
        stats = batch.stats
        if stats is None:
            return
        while self.boundary is not None and stats.released_to >= self.boundary and not self._frozen:
            self._sync(stopping)
        if self._frozen:
            return
        if stats.caught_up and (self._handed or self.group.ready(self.syncs)):
            self._sync(stopping)

    def _stop_asked(self, stopping: Callable[[], bool]) -> bool:
        """Whether this replica was asked to stop (it tells the others) or another one was (looked at now and then)."""
        if not self._stop_heard and stopping():
            self.group.post_stop()
            self._stop_heard = True
        elif not self._stop_heard and time.monotonic() >= self._next_look:
            self._next_look = time.monotonic() + LOOK_SECONDS
            self._stop_heard = self.group.stop_posted()
        return self._stop_heard

    def _sync(self, stopping: Callable[[], bool]) -> None:
        """Learns what the learners queue, says this replica is ready, waits for the others, averages; then asks for
        the snapshot or the stop the replicas agreed on."""
        for learner in self.learners.values():   # a queued micro-batch is learned before the average, not after
            learner.flush(time.time())
        self._stop_asked(stopping)   # any sync after a stop is asked is the stop sync
        self.group.post_ready(self.syncs)
        started = time.perf_counter()
        self._wait_for_all(stopping)
        waited = time.perf_counter()
        self.wait_seconds.observe(waited - started)
        want = self.controls.snapshots and self.controls.snapshot_due()
        boundary = self.boundary if self.boundary is not None else -math.inf
        agreed, snapshot, stop = self.group.agree([boundary, float(want), float(self._stop_heard)])
        learned = self._learned()
        sets = {name: self._params[name].get(weight=learned[name] - self._learned_at_sync[name])
                for name in self.learners}
        merged = self.group.average(sets)
        for name, learner in self.learners.items():
            try:
                self._params[name].set(merged[name])
            except ValueError as err:   # e.g. more string columns across the replicas than encoder.string_slots
                raise ReplicaFailure(f"models.{name}: the average of sync {self.syncs + 1} cannot be taken: "
                                     f"{err}") from None
            self._params[name] = _averageable(name, learner)   # a model the learner replaced since is read anew
        self.average_seconds.observe(time.perf_counter() - waited)
        self._learned_at_sync = learned
        self._handed = 0
        self.boundary = agreed + self.every if math.isfinite(agreed) else None
        self.syncs += 1
        log.info("sync %d at event time %.3f; %d examples learned here so far", self.syncs, agreed,
                 sum(learned.values()))
        if stop:
            self._stopping = True
            self._frozen = self.controls.snapshots   # without snapshots, what comes until the end is learned
            self.controls.ask_stop()
        elif snapshot:
            self._frozen = True
            self.controls.ask_barrier(want)

    def _wait_for_all(self, stopping: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        while self.group.ready(self.syncs) < self.group.size:
            self._stop_asked(stopping)   # a stop asked while waiting: the others join this sync, all stop after it
            if time.monotonic() > deadline:
                raise PeerLost(f"replica {self.group.rank}: not every replica reached sync {self.syncs + 1} within "
                               f"cluster.timeout = {self.timeout:g} s; every replica must restart (from the newest "
                               "epoch they all have a snapshot of)")
            time.sleep(POLL_SECONDS)

    def agreed_offsets(self, snapshots) -> dict[str, int]:
        """The offsets of the newest epoch whose snapshots are durable on every replica (what the group may commit:
        a restart goes back to that epoch). This replica's newest durable one is told to the others here."""
        offsets, meta = snapshots.newest_durable
        if "epoch" in meta and int(meta["epoch"]) not in self._durable:
            epoch = int(meta["epoch"])
            self.group.post_durable(epoch)
            self._durable[epoch] = offsets
        for epoch in sorted(self._durable, reverse=True):
            if self.group.durable(epoch) >= self.group.size:
                self._committable = self._durable[epoch]
                self._durable = {e: o for e, o in self._durable.items() if e >= epoch}
                break
        return self._committable

    def _learned(self) -> dict[str, int]:
        return {name: learner.evaluation.learned for name, learner in self.learners.items()}

    def state(self) -> EpochState:
        """What a snapshot taken now keeps of the epochs (the held examples included)."""
        return EpochState(self.syncs, self.group.size, self.group.rank, self.boundary, list(self._held))

    def figures(self) -> ClusterFigures:
        return ClusterFigures(self.group.size, self.syncs, self.wait_seconds.state(), self.average_seconds.state())

    def summary(self) -> dict:
        """Rank, syncs so far, and a digest of each model's averageable parameters (equal on every replica after
        a sync that nothing was learned after)."""
        sets = {name: p.get(weight=0.0) for name, p in self._params.items()}
        return {"rank": self.group.rank, "replicas": self.group.size, "syncs": self.syncs,
                "parameters": hashlib.sha256(encode_sets(sets)).hexdigest()[:16]}

    def close(self) -> None:
        self.group.close()


def _averageable(name: str, learner: Learner) -> Averageable:
    found = learner.parameters()
    if found.parameters is None:
        raise ConfigError(f"config error: models.{name}.model: cannot be averaged across replicas: {found.reason}")
    return found.parameters
