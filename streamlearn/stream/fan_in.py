"""Several intake processes feeding one learner (`intake.processes = K`).

Intake `k` reads partitions `p` with `p % K == k` of every topic (co-partitioned by
request id, so that a log and its feedback meet in one intake) and joins them; the
learner's side merges their examples in event time (`EventTimeMerge`), so that the
learner sees the sequence one intake would have released.

A snapshot needs one consistent cut across all of them: barrier alignment, as Flink
does it. A barrier asked for goes to every intake; each attaches its state to its
next cut; an intake that has delivered its barrier is not read again until every
other one has delivered its own (what it sends after the barrier lies after the
cut). The cut then carries every intake's state, and the examples the merge still
holds, as one `FanInState`; every batch's offsets are those of every intake.

A snapshot holds the state of K intakes: it restores with the same K only (the join
state is not kept per partition, so it cannot be divided anew).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, Optional

import msgspec

from streamlearn.config import Config, replica_rank
from streamlearn.records import Batch, Example, IntakeStats, Rejected, handoff_pieces
from streamlearn.stream.channel import WAKE_SECONDS, IntakeDied, ProcessIntake, StopPatience
from streamlearn.stream.intake import HEARTBEAT_SECONDS, Resume
from streamlearn.stream.merge import EventTimeMerge, FanInState, fan_in_state, merged_stats
from streamlearn.stream.source import intake_share

log = logging.getLogger(__name__)
BATCHES_PER_LOOK = 4   # batches taken from one intake before the others are looked at




class FanInIntake:
    """K intake processes, each over its share of the partitions, merged into one channel of batches."""

    def __init__(self, config: Config, resume: Resume) -> None:
        count = config.intake.processes
        state = fan_in_state(resume.state, count)
        self._merge = EventTimeMerge(count, state.held)
        self._batch_size = config.intake.batch_size
        self._flush_at_end = not config.snapshot.enabled   # else the merge's held examples stay in the final state
        self._offsets = dict(resume.offsets)
        self._stats: list[IntakeStats] = [IntakeStats() for _ in range(count)]
        self._states: list[Optional[bytes]] = [None] * count   # each intake's state at its latest barrier
        self._aligned: set[int] = set()    # intakes whose barrier came for the one asked for (not read meanwhile)
        self._ended: set[int] = set()      # intakes whose final batch came
        self._barrier_asked = False
        self._sent = self._received = 0.0
        self._intakes: list[ProcessIntake] = []
        try:
            for k, intake_state in enumerate(state.intakes):
                # Only its own partitions' offsets: an intake's batches carry every offset it was given, and one it
                # does not read would go back, stale, into the merged offsets of every later cut.
                share = intake_share(config.cluster.replicas, replica_rank(config), count, k)
                offsets = {key: offset for key, offset in resume.offsets.items() if share.holds(key)}
                self._intakes.append(ProcessIntake(config, Resume(offsets, intake_state or None), share))
        except BaseException:
            self.close()
            raise

    # --- the merged batches --------------------------------------------------------------------------------

    def batches(self, stopping: Callable[[], bool] = lambda: False) -> Iterator[Batch]:
        """The merged batches, up to the final one (every intake's final); after `stopping()`, as `ProcessIntake`."""
        patience = StopPatience(self.request_stop)
        last_yield = time.monotonic()
        while True:
            try:
                heard = self._gather()
            except IntakeDied as died:
                if not stopping():
                    raise
                log.warning("an intake process ended (exit code %s) while stopping", died.code)
                return
            if heard:
                patience.heard()
            elif stopping() and patience.exhausted():
                self.abandon()
                return
            if len(self._ended) == len(self._intakes):
                yield from self._out(self._merge.flush() if self._flush_at_end else self._merge.release(), final=True)
                return
            if self._barrier_asked and len(self._aligned) == len(self._intakes):
                yield from self._out(self._merge.release(), barrier=True)
                last_yield = time.monotonic()
                continue
            released = self._merge.release()
            if released or (heard and time.monotonic() - last_yield >= HEARTBEAT_SECONDS):
                yield from self._out(released)
                last_yield = time.monotonic()

    def _gather(self) -> bool:
        """Takes the batches that have come from the intakes still read; if none had, waits a moment for the one
        that holds the merge back. Whether any came."""
        readable = [k for k in range(len(self._intakes)) if k not in self._aligned and k not in self._ended]
        heard = False
        for k in readable:
            for _ in range(BATCHES_PER_LOOK):
                batch = self._intakes[k].next_batch(0.0)
                if batch is None:
                    break
                heard = True
                if not self._take(k, batch):
                    break
        if heard or not readable:
            return heard
        slowest = self._merge.slowest(readable)
        batch = self._intakes[readable[0] if slowest is None else slowest].next_batch(WAKE_SECONDS)
        if batch is not None:
            self._take(readable[0] if slowest is None else slowest, batch)
        return batch is not None

    def _take(self, k: int, batch: Batch) -> bool:
        """Adds intake `k`'s batch to the merge; whether that intake may be read on (not at a barrier or its end)."""
        self._merge.add(batch.examples)
        if batch.cut:   # only a cut's counters cover every example handed over before it
            self._offsets.update(batch.offsets)
            self._stats[k] = stats = batch.stats or self._stats[k]
            self._merge.mark(k, stats.released_to, stats.caught_up)
            self._sent, self._received = max(self._sent, batch.sent), max(self._received, batch.received)
        if batch.barrier is not None:
            self._states[k] = batch.barrier
            if self._barrier_asked:
                self._aligned.add(k)
        if batch.final:
            self._ended.add(k)
        return batch.barrier is None and not batch.final

    def _out(self, examples: list[Example], barrier: bool = False, final: bool = False) -> Iterator[Batch]:
        """`examples` in batches of at most `batch_size`; the last one is a cut with every intake's offsets, and
        with `barrier` or `final` the state of every intake and of the merge."""
        stats = merged_stats(self._stats, len(self._merge))
        leading, last = handoff_pieces(examples, self._batch_size)
        for piece in leading:
            yield Batch(piece, stats=stats, cut=False, sent=self._sent, received=self._received)
        state = None
        if (barrier or final) and None not in self._states:
            state = msgspec.msgpack.encode(FanInState(list(self._states), self._merge.held()))
        if barrier:
            self._barrier_asked = False
            self._aligned.clear()
        yield Batch(last, dict(self._offsets), stats, final=final, barrier=state,
                    sent=self._sent, received=self._received)

    # --- the channel's other words, to every intake ----------------------------------------------------------

    def commit(self, offsets: dict[str, int], final: bool = False) -> None:
        for intake in self._intakes:   # each commits the partitions it reads
            intake.commit(offsets, final)

    def request_stop(self) -> None:
        for intake in self._intakes:
            intake.request_stop()

    def request_barrier(self) -> None:
        if not self._barrier_asked:
            self._barrier_asked = True
            for intake in self._intakes:
                intake.request_barrier()

    def reject(self, rejected: list[Rejected]) -> None:
        """Dead-letters examples a model refused, through the first intake's sink (any one sink: one rule)."""
        self._intakes[0].reject(rejected)

    def examples_in_flight(self) -> int:
        return sum(intake.examples_in_flight() for intake in self._intakes) + len(self._merge)

    def abandon(self) -> None:
        for intake in self._intakes:
            intake.abandon()

    def close(self) -> None:
        for intake in self._intakes:
            intake.close()
