"""The cut procedure: the one sequence by which a snapshot and a commit are taken, step by step.

A cut is a batch boundary where the learner side and the intake state describe the same point of the
stream. A snapshot is taken, and offsets committed, only there, in this order (the numbers are those of
the `# n.` comments below, in `Snapshotter` and in `Intake._barrier`):

1. **Barrier asked.** When the snapshot trigger fires (examples, seconds, drift, score; counting the
   examples already on their way, since the barrier rides on the intake's next cut) and no write is in
   flight, the learner sends `barrier` to the intake. It asks for no other until this one is taken.
2. **The intake attaches its state** (`Intake._barrier`, in the intake process): at its next cut, once
   every dead letter before it has landed, it attaches its `IntakeState` (pending joins, watermarks,
   offsets, counters, where the dead letters end) to that batch as `Batch.barrier`. The final cut
   always carries one.
3. **The learner reaches the barrier** having learned exactly the examples before it (the batch that
   carries it is learned first, and its offsets taken); the learner side's state is captured now,
   the only moment it matches the intake state.
4. **Fork and write** (`Snapshotter.submit`): a forked child holds a copy-on-write image of that state,
   pickles it and writes the snapshot's files (or the loop pickles and a thread writes, with
   `snapshot.serialize = "inline"`); the loop stalls for this step alone (`snapshot_stall_seconds`).
5. **Durable** (`SnapshotStore.write`, then `Snapshotter._finish`): tmp → fsync → rename → `LATEST`
   names it the newest snapshot; only then do its offsets become `Snapshotter.durable_offsets`.
   A failed write keeps the previous snapshot and its offsets.
6. **Offsets committed to the group**, every `COMMIT_SECONDS` and at the end: those of the newest
   durable snapshot, never newer (with snapshots off: the offsets of the last cut learned). They serve
   lag, and a partition no restored snapshot covers; a restart from a snapshot starts at its offsets.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Protocol

from streamlearn.checkpoints.snapshotter import Serialize, Snapshotter

COMMIT_SECONDS = 1.0   # how often group offsets follow the newest durable snapshot: fresh lag, few broker calls


class Controls(Protocol):
    """What the cut needs of the channel to the intake (`streamlearn.stream.channel.Channel`)."""

    def request_barrier(self) -> None: ...

    def commit(self, offsets: dict[str, int], final: bool = False) -> None: ...

    def examples_in_flight(self) -> int: ...


Capture = Callable[[bytes, bool], Serialize]   # (intake state, final) → the whole state's files, when called


class Cut:
    """The learner side of the cut procedure (steps 1, 3, 4 and 6; step 2 is the intake's, 5 the writer's)."""

    def __init__(self, snapshots: Optional[Snapshotter]) -> None:
        self.snapshots = snapshots
        self.asked = False                     # a barrier is asked for and not yet taken
        # Replicas: the offsets of the newest snapshot durable on every replica (a restart goes back to that
        # epoch; the group's offsets must not be ahead of it). None: this service's own newest durable snapshot.
        self.agreed: Optional[Callable[[Snapshotter], dict[str, int]]] = None
        self._last_commit = time.monotonic()

    def begin(self) -> None:
        """The learning loop starts: the commit clock starts now."""
        self._last_commit = time.monotonic()

    def ask_if_due(self, channel: Controls, learned: Callable[[], int], drifts: Callable[[], int],
                   lowest_score: Callable[[], float]) -> bool:
        """Step 1: asks the intake for a barrier when the snapshot trigger fires; returns whether it asked."""
        # 1. The barrier is honoured after the batches already on their way: ask that many examples early, so
        #    that snapshots keep their interval while a backlog streams in.
        if not self.due(lambda: learned() + channel.examples_in_flight(), drifts, lowest_score):
            return False
        self.ask(channel)
        return True

    def due(self, ahead: Callable[[], int], drifts: Callable[[], int], lowest_score: Callable[[], float]) -> bool:
        """Whether the snapshot trigger fires now (`ahead`: the examples learned, or soon learned)."""
        if self.snapshots is None or self.asked or not self.snapshots.idle:
            return False
        # The score is read only if the trigger watches one (it asks every learner).
        return self.snapshots.trigger.check(ahead(), time.monotonic(), drifts(), lowest_score) is not None

    def ask(self, channel: Controls) -> None:
        """Step 1's request: the intake attaches its state to its next cut."""
        channel.request_barrier()
        self.asked = True

    def take(self, intake_state: bytes, final: bool, offsets: dict[str, int], meta: dict[str, float],
             capture: Capture) -> None:
        """Steps 3 and 4, at the barrier: captures the whole state as it is now and hands it to the writer."""
        started = time.perf_counter()
        # 3. The batch carrying the barrier is learned: the learner side matches the intake state only now.
        serialize = capture(intake_state, final)
        # 4. Fork and write; steps 5 (durable, then durable_offsets) follow in the writer, off the loop.
        self.snapshots.submit(serialize, dict(offsets), meta)
        self.asked = False
        self.snapshots.stall.observe(time.perf_counter() - started)

    def commit_if_due(self, channel: Controls, offsets: dict[str, int]) -> None:
        """Step 6, every `COMMIT_SECONDS`."""
        if time.monotonic() - self._last_commit >= COMMIT_SECONDS:
            self.commit(channel, offsets)
            self._last_commit = time.monotonic()

    def finish(self, channel: Controls, offsets: dict[str, int]) -> None:
        """Steps 5 and 6 at the end: waits until the write in flight is durable (or failed), then the final commit."""
        if self.snapshots is not None:
            self.snapshots.wait()
        self.commit(channel, offsets, final=True)

    def commit(self, channel: Controls, offsets: dict[str, int], final: bool = False) -> None:
        """Step 6: commits the newest durable snapshot's offsets (`offsets`, the last cut's, if snapshots are off)."""
        # 6. Never newer than what is durable: a crash restores the snapshot, and the group's lag must not lie.
        channel.commit(self.committable(offsets), final=final)

    def committable(self, offsets: dict[str, int]) -> dict[str, int]:
        """Offsets for the consumer group: those of the newest durable snapshot, when snapshots are on."""
        if self.snapshots is None:
            return offsets
        return self.agreed(self.snapshots) if self.agreed is not None else self.snapshots.durable_offsets
