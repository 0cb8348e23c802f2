"""Merges the examples of several intakes into the one sequence a single intake would release.

Each intake releases its examples in `(ts, id)` order below its own watermark, and says
with every cut how far it has released (`IntakeStats.released_to`: every example before
that event time has been handed over). The merge holds what it was given and lets out,
in `(ts, id)` order, what lies before the lowest of those marks: no intake can still
send anything older. An intake that is caught up (its partitions at their end, nothing
held) holds nothing back, as a partition at its end does not hold a watermark back.
A snapshot of K intakes is a `FanInState`: each intake's own state and what the
merge held; it restores with K intakes only (`check_intakes`).

>>> from streamlearn.records import Example
>>> def example(rid, ts): return Example(rid, "default", {}, 1, 1.0, ts, ts)
>>> merge = EventTimeMerge(2)
>>> merge.add([example("a", 1.0), example("c", 3.0)]); merge.mark(0, released_to=4.0, caught_up=False)
>>> [e.id for e in merge.release()]          # intake 1 has said nothing yet: it may still send anything
[]
>>> merge.add([example("b", 2.0)]); merge.mark(1, released_to=2.5, caught_up=False)
>>> [e.id for e in merge.release()], len(merge)
(['a', 'b'], 1)
>>> merge.mark(1, released_to=2.5, caught_up=True); [e.id for e in merge.release()]
['c']
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from typing import Iterable, Optional

import msgspec

from streamlearn.config import ConfigError
from streamlearn.records import Example, IntakeStats
from streamlearn.telemetry.histogram import summed

NEVER = float("-inf")


class EventTimeMerge:
    """Examples from `count` intakes, each in `(ts, id)` order below its own mark, let out in one such order."""

    def __init__(self, count: int, held: Iterable[Example] = ()) -> None:
        self._heap: list[tuple[float, str, int, Example]] = []
        self._arrival = itertools.count()   # ties (one id in two intakes: topics not keyed by request id) never
                                            # compare the examples themselves
        self.marks = [NEVER] * count        # per intake: everything before this event time has been given
        self.caught_up = [False] * count
        self.add(held)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, examples: Iterable[Example]) -> None:
        for e in examples:
            heapq.heappush(self._heap, (e.ts, e.id, next(self._arrival), e))

    def mark(self, intake: int, released_to: float, caught_up: bool) -> None:
        """What intake `intake` said at its latest cut: how far it has released, and whether it is caught up."""
        self.marks[intake] = released_to
        self.caught_up[intake] = caught_up

    def bound(self) -> float:
        """The event time before which every example of every intake is here (inf: every intake caught up)."""
        return min((m for m, idle in zip(self.marks, self.caught_up) if not idle), default=math.inf)

    def slowest(self, among: Iterable[int]) -> Optional[int]:
        """Of the intakes `among`, the one that holds the merge back (None: none does)."""
        waiting = [(self.marks[i], i) for i in among if not self.caught_up[i]]
        return min(waiting)[1] if waiting else None

    def release(self) -> list[Example]:
        """The examples before `bound()`, in `(ts, id)` order."""
        bound, heap, out = self.bound(), self._heap, []
        while heap and heap[0][0] < bound:
            out.append(heapq.heappop(heap)[3])
        return out

    def flush(self) -> list[Example]:
        """Everything held, in order (the end of input with snapshots off)."""
        out = [item[3] for item in sorted(self._heap)]
        self._heap.clear()
        return out

    def held(self) -> list[Example]:
        """What is held, in order, without letting it out (for a snapshot)."""
        return [item[3] for item in sorted(self._heap)]


class FanInState(msgspec.Struct):
    """The state of K intakes at one cut: each intake's own (opaque), and the examples the merge held."""

    intakes: list[bytes]
    held: list[Example] = []


class _Shape(msgspec.Struct):
    intakes: Optional[list[msgspec.Raw]] = None   # absent: the state of one intake


def check_intakes(state: Optional[bytes], count: int) -> None:
    """Raises a one-line `ConfigError` when a snapshot's intake state was taken by another number of intakes."""
    if state is None:
        return
    shape = msgspec.msgpack.decode(state, type=_Shape)
    taken = 1 if shape.intakes is None else len(shape.intakes)
    if taken != count:
        raise ConfigError(f"config error: intake.processes: the snapshot was taken with {taken} intake "
                          f"process{'es' if taken > 1 else ''}; restore it with intake.processes = {taken} (the join "
                          "state is not divided by partition)")


def fan_in_state(state: Optional[bytes], count: int) -> FanInState:
    """A snapshot's state of `count` (> 1) intakes (none: each starts empty)."""
    check_intakes(state, count)
    return FanInState([b""] * count) if state is None else msgspec.msgpack.decode(state, type=FanInState)


def merged_stats(parts: list[IntakeStats], held: int) -> IntakeStats:
    """The counters of several intakes as one intake's; `held`: the examples the merge holds.

    The watermark is the lowest of those intakes that are not caught up (all caught up: the highest).
    """
    events: Counter[tuple[str, str]] = Counter()
    dead: Counter[tuple[str, str]] = Counter()
    join: Counter[str] = Counter()
    lag: dict[tuple[str, int], int] = {}
    busy = [p.watermark for p in parts if not p.caught_up]
    watermark = min(busy) if busy else max((p.watermark for p in parts), default=NEVER)
    for p in parts:
        events.update(p.events)
        dead.update(p.dead_letters)
        join.update(p.join)
        lag.update(p.consumer_lag)
    return IntakeStats(
        events=dict(events), dead_letters=dict(dead), join=dict(join),
        join_pending=sum(p.join_pending for p in parts) + held,
        feedback_delay=summed(p.feedback_delay for p in parts if p.feedback_delay is not None),
        consumer_lag=lag, queueing=_summed_by_name([p.queueing for p in parts]),
        stages=_summed_by_name([p.stages for p in parts]),
        watermark=watermark, released_to=watermark, assigned=sorted(k for p in parts for k in p.assigned),
        caught_up=all(p.caught_up for p in parts) and not held,
        broker="; ".join(sorted({p.broker for p in parts if p.broker})),
    )


def _summed_by_name(parts: list[dict]) -> dict:
    names = sorted({name for part in parts for name in part})
    return {name: summed(part[name] for part in parts if name in part) for name in names}
