"""Live forgetting: probe sets held out from each segment of a model's stream, scored as it learns.

A model's stream is cut into segments of `eval.segment_size` examples. From each
segment `eval.probe_size` examples are held out (never learned): one at a random
place in each stretch of `segment_size // probe_size` examples, so the probes
cover the whole segment. The place is a hash of the seed, model, segment and
stretch, so the same stream holds out the same examples after a restore or a
replay. Every `eval.every` examples the model is scored on the probe sets of the
last `eval.segments` complete segments; for each segment the best accuracy seen
before and the first one after it was complete are kept, which gives

    forgetting        = mean over segments of (best earlier accuracy - accuracy now)
    backward transfer = mean over segments of (accuracy now - accuracy just after the segment)

over the segments evaluated at least once before (Chaudhry et al. 2018; Lopez-Paz & Ranzato 2017).

After a real concept change the drift policy confirmed (`follow`), the probes of
the old concept are wrong, not forgotten: every complete segment holding a probe
older than the change (its event time `ConceptChange.ts`) is retired, and the
probes of the segment under way that are older than it are dropped. Retired
segments are kept apart (`retired`, the last `eval.segments`, with their last
accuracy) and never scored again: forgetting, backward transfer, `probe_accuracy`
and the gate's historical check cover the segments since the change only. What
was retired (`since`, `retired`) is pickled with the learner, like the rest.

>>> from streamlearn.config import EvalConfig
>>> from streamlearn.records import Example
>>> probes = ProbeSets("m", EvalConfig(segment_size=100, probe_size=10, every=50), seed=1)
>>> stream = [Example(f"r-{i}", "m", {"x": 1.0}, 1, 1.0, i, i) for i in range(250)]
>>> pieces = list(probes.split(stream))
>>> sum(len(learn) for learn, _ in pieces), [evaluate for _, evaluate in pieces].count(True)
(225, 5)
>>> [len(segment.probes) for segment in probes.segments], len(probes.filling)
([10, 10], 5)
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from typing import Iterator, Optional

from streamlearn.config import EvalConfig
from streamlearn.learners.plasticity import ConceptChange
from streamlearn.records import Example


class Segment:
    """One complete segment's probe set and its accuracy history."""

    def __init__(self, number: int, probes: list[Example]) -> None:
        self.number = number
        self.probes = probes
        self.first: Optional[float] = None   # accuracy at the first evaluation after the segment was complete
        self.best: Optional[float] = None    # best accuracy before the latest evaluation
        self.now: Optional[float] = None     # accuracy at the latest evaluation
        self.evaluations = 0

    def record(self, accuracy: float) -> None:
        if self.now is not None:
            self.best = self.now if self.best is None else max(self.best, self.now)
        else:
            self.first = accuracy
        self.now = accuracy
        self.evaluations += 1


class ProbeSets:
    """Which examples a model holds out, the probe sets it keeps, and the forgetting they show."""

    def __init__(self, model: str, config: EvalConfig, seed: int) -> None:
        self.model = model
        self.config = config
        self.seed = seed
        self.position = 0                        # examples taken so far (learned or held out)
        self.filling: list[Example] = []         # probes of the segment under way
        self.segments: deque[Segment] = deque(maxlen=config.segments)   # complete ones, oldest first
        self.held_out = 0
        self._stride = max(1, config.segment_size // config.probe_size) if config.probe_size else 0
        self.since: Optional[float] = None       # event time of the change followed last: older probes are retired
        self.retired: deque[Segment] = deque(maxlen=config.segments)   # segments of an old concept, oldest first

    def __setstate__(self, state: dict) -> None:
        """Unpickles, also probe sets pickled before retirement existed (nothing retired)."""
        self.__dict__.update(state)
        self.__dict__.setdefault("since", None)
        self.__dict__.setdefault("retired", deque(maxlen=self.config.segments))

    def split(self, examples: list[Example]) -> Iterator[tuple[list[Example], bool]]:
        """Yields `(examples to learn, evaluate after them?)` pieces; holds the probes out on the way."""
        start, piece = self.position, []
        for begin, end in self._cuts(start, len(examples)):
            taken = begin
            for position in self._held_out(begin, end):
                piece.extend(examples[taken - start:position - start])
                self.filling.append(examples[position - start])
                self.held_out += 1
                taken = position + 1
            piece.extend(examples[taken - start:end - start])
            self.position = end
            if end % self.config.segment_size == 0:
                self._complete_segment()
            if end % self.config.every == 0:
                yield piece, True
                piece = []
        if piece:
            yield piece, False

    def _cuts(self, start: int, n: int) -> Iterator[tuple[int, int]]:
        """Position ranges of `n` examples from `start`, cut at every segment end and evaluation point."""
        begin, stop = start, start + n
        while begin < stop:
            end = min(stop, _next_multiple(begin, self.config.segment_size), _next_multiple(begin, self.config.every))
            yield begin, end
            begin = end

    def _held_out(self, begin: int, end: int) -> list[int]:
        """The held-out positions in [begin, end), a range inside one segment, in order."""
        if not self._stride:
            return []
        size, stride = self.config.segment_size, self._stride
        segment = begin // size
        base = segment * size
        last = min(self.config.probe_size - 1, (end - 1 - base) // stride)
        places = (base + j * stride + zlib.crc32(f"{self.seed}:{self.model}:{segment}:{j}".encode()) % stride
                  for j in range((begin - base) // stride, last + 1))
        return [p for p in places if begin <= p < end]

    def _complete_segment(self) -> None:
        number = self.position // self.config.segment_size - 1
        if self.filling:
            self.segments.append(Segment(number, self.filling))
        self.filling = []

    def follow(self, change: Optional[ConceptChange]) -> bool:
        """Retires the probes older than a confirmed concept change not followed yet; True if it was new.

        Idempotent (a change already followed does nothing), so the learner may call it at every evaluation.
        A segment that straddles the change is retired whole: its accuracy history mixes both concepts.
        """
        start = change_start(change)
        if start is None or (self.since is not None and start <= self.since):
            return False
        self.since = start
        kept = [s for s in self.segments if min(ex.ts for ex in s.probes) >= start]
        gone = [s for s in self.segments if min(ex.ts for ex in s.probes) < start]
        # New deques, assigned whole: a metrics scrape iterating the old ones meanwhile is not disturbed.
        self.segments = deque(kept, maxlen=self.config.segments)
        self.retired = deque([*self.retired, *gone], maxlen=self.config.segments)
        self.filling = [ex for ex in self.filling if ex.ts >= start]
        return True

    def record(self, accuracies: list[float]) -> None:
        """Takes the accuracy now on each kept segment (in the order of `segments`)."""
        for segment, accuracy in zip(self.segments, accuracies):
            segment.record(accuracy)

    @property
    def forgetting(self) -> float:
        """Mean over segments evaluated before of (best earlier accuracy - accuracy now); NaN if none."""
        drops = [s.best - s.now for s in self.segments if s.best is not None]
        return sum(drops) / len(drops) if drops else math.nan

    @property
    def backward_transfer(self) -> float:
        """Mean over segments evaluated before of (accuracy now - accuracy just after the segment); NaN if none."""
        gains = [s.now - s.first for s in self.segments if s.evaluations > 1]
        return sum(gains) / len(gains) if gains else math.nan

    def accuracies(self) -> dict[int, float]:
        """Segment number -> the latest accuracy on its probes."""
        return {s.number: s.now for s in self.segments if s.now is not None}


def change_start(change: Optional[ConceptChange]) -> Optional[float]:
    """Event time from which examples belong to the new concept: the detection's, else the confirmation's."""
    if change is None:
        return None
    for ts in (change.ts, change.confirmed_ts):
        if math.isfinite(ts):
            return ts
    return None


def _next_multiple(position: int, size: int) -> int:
    return (position // size + 1) * size
