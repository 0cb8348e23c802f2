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
goes through the rendezvous store, so a replica waiting for the others polls, and
a stop is heard, rather than sitting in a collective.

Each sync agrees on the highest boundary any replica was at, and the next one is
that plus `sync_every` on every replica. On a replayable source the same syncs fall
at the same places of every replica's sequence, so two runs end with the same
parameters. With live traffic an example that arrives after its replica joined a
sync in idleness is learned after it, whatever its event time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Callable, Iterator, Mapping, Optional

from streamlearn.cluster.group import ReplicaGroup
from streamlearn.cluster.wire import encode_sets
from streamlearn.config import ClusterConfig, ConfigError
from streamlearn.learners.averaging import Averageable
from streamlearn.learners.contract import Learner
from streamlearn.records import Batch

log = logging.getLogger(__name__)
POLL_SECONDS = 0.005   # how often a replica waiting for the others looks at the store


class EpochSync:
    """Cuts the learner's batches at epoch boundaries and averages the models with the other replicas there."""

    def __init__(self, cluster: ClusterConfig, rank: int, learners: Mapping[str, Learner],
                 group: Optional[ReplicaGroup] = None) -> None:
        self.every = cluster.sync_every
        self.learners = dict(learners)
        self._params = {name: _averageable(name, learner) for name, learner in self.learners.items()}
        self.group = group or ReplicaGroup(rank, cluster.replicas, cluster.init_method, timeout=cluster.timeout)
        self.boundary: Optional[float] = None   # event time of the next sync (None: no example yet)
        self.syncs = 0
        self._learned_at_sync = self._learned()

    def batches(self, inner: Iterator[Batch], stopping: Callable[[], bool]) -> Iterator[Batch]:
        """`inner`'s batches, cut at epoch boundaries; the syncs run between the pieces (after the learner took
        the piece before), and after a batch that released everything before a boundary."""
        for batch in inner:
            yield from self._pieces(batch, stopping)
            if batch.final:
                return
            self._sync_if_passed(batch, stopping)

    def _pieces(self, batch: Batch, stopping: Callable[[], bool]) -> Iterator[Batch]:
        examples, start = batch.examples, 0
        if self.boundary is None and examples:
            self.boundary = (math.floor(examples[0].ts / self.every) + 1) * self.every
        while self.boundary is not None:
            cut = next((i for i in range(start, len(examples)) if examples[i].ts >= self.boundary), None)
            if cut is None:
                break
            yield Batch(examples[start:cut], stats=batch.stats, cut=False, sent=batch.sent, received=batch.received)
            start = cut   # learned: what follows is the rest, with or without the sync (a stop while waiting)
            if not self._sync(stopping):
                break
        if start:
            batch.examples = examples[start:]
        yield batch

    def _sync_if_passed(self, batch: Batch, stopping: Callable[[], bool]) -> None:
        stats = batch.stats
        if stats is None:
            return
        while self.boundary is not None and stats.released_to >= self.boundary and not stopping():
            if not self._sync(stopping):
                return
        if stats.caught_up and (self._learned() != self._learned_at_sync or self.group.ready(self.syncs)):
            self._sync(stopping)

    def _sync(self, stopping: Callable[[], bool]) -> bool:
        """Says this replica is ready, waits for the others, averages. False: stopped while waiting."""
        self.group.post_ready(self.syncs)
        while self.group.ready(self.syncs) < self.group.size:
            if stopping():
                self.group.post_ready(self.syncs, -1)
                return False
            time.sleep(POLL_SECONDS)
        agreed = self.group.highest(self.boundary if self.boundary is not None else -math.inf)
        learned = self._learned()
        sets = {name: self._params[name].get(weight=learned[name] - self._learned_at_sync[name])
                for name in self.learners}
        merged = self.group.average(sets)
        for name, learner in self.learners.items():
            self._params[name].set(merged[name])
            self._params[name] = _averageable(name, learner)   # a model the learner replaced since is read anew
        self._learned_at_sync = learned
        self.boundary = agreed + self.every if math.isfinite(agreed) else None
        self.syncs += 1
        log.info("sync %d at event time %.3f; %d examples learned here so far", self.syncs, agreed,
                 sum(learned.values()))
        return True

    def _learned(self) -> dict[str, int]:
        return {name: learner.evaluation.learned for name, learner in self.learners.items()}

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
    if learner.kind == "torch":   # the FeatureEncoder gives columns as names come: replicas must agree on them first
        raise ConfigError(f"config error: models.{name}: torch models with cluster.replicas > 1 are not built yet "
                          "(their feature columns must agree across replicas)")
    return found.parameters
