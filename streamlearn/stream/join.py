"""Joins inference logs with their feedback by `request_id`, in event time.

The join is symmetric: whichever side arrives first waits for the other. A pair
matches when the feedback is at most `ttl` seconds (event time) after the log, or
at most `early_ttl` before it; this rule, not the arrival order, decides, so the
same events give the same examples however Kafka interleaves the partitions.
Feedback has no model field, so only the pair tells what it must carry: a label
(for regression a number within the model's bound), or for a language model
(`lm_models`) a rating or a correction, which with the logged conversation become
the example's `text` (its label the answer to learn, "" for none). A pair without
it closes as `invalid_label`.

Matched examples are held until the watermark (the event time below which no
more input can arrive) passes them and are then released in `(ts, id)` order:
the learner sees one deterministic sequence for a replayable source.

Examples joined upstream (the `examples` topic) go through the same accounting:
an id seen before as a pre-joined example or a matched request, or pending as a
log or feedback, is a `duplicate` (ids are remembered as long as closed requests
are); one without what a pair must carry is an `invalid_label`; every other one
is counted `prejoined` and held for the watermark like a matched pair. So each
input ends in exactly one outcome.

State is bounded by `max_pending`, counting logs and feedback waiting for their
other half and examples waiting for the watermark together. Past it the joiner
first releases the oldest held examples early (before the watermark passes them:
nothing is lost, only their place in event-time order), and only then evicts the
pending entries closest to expiry (`evicted`). Whatever leaves the joiner is
counted under an outcome, never dropped silently. Given a folder, the logs that
have waited `SPILL_AFTER` seconds of event time are moved to a file there
(`WaitingLogs`, `streamlearn.stream.spill`): a cache of what the snapshot holds.

>>> from streamlearn.stream.decode import LogEntry, LabelEntry
>>> j = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=100)
>>> j.add_log(LogEntry("r-1", 100.0, "default", {"x": 1.0}))
>>> j.add_feedback(LabelEntry("r-1", 130.0, 1, 1.0))
>>> [e.id for e in j.advance(200.0)], j.outcomes["matched"]
(['r-1'], 1)
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import msgspec

from streamlearn.records import Example, Exchange
from streamlearn.stream import pieces
from streamlearn.stream.closed_ids import ClosedIds, ClosedIdsState
from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.waiting_logs import WaitingLogs, shrunk

OUTCOMES = ("matched", "expired", "expired_feedback", "late", "duplicate", "evicted", "invalid_label", "prejoined")


class JoinerState(msgspec.Struct, array_like=True):
    """Everything the joiner holds, for a snapshot; the expiry heaps are rebuilt from it."""

    logs: list[LogEntry]                    # written as the packed bytes the joiner keeps (`msgspec.Raw`)
    early: list[LabelEntry]
    closed: list[tuple[str, float, bool]]   # the newest closed ids: (request id, close time, matched?)
    ready: list[Example]                    # written as the packed bytes the joiner keeps (`msgspec.Raw`)
    outcomes: dict[str, int]
    overflow: list[Example] = []            # released early over the bound, not yet handed out by `advance`
    closed_hashed: Optional[ClosedIdsState] = None   # the older closed ids, hashed (`ClosedIds`)


class FeedbackJoiner:
    """Symmetric, event-time, bounded join of inference logs and feedback."""

    def __init__(self, ttl: float, early_ttl: float, max_pending: int,
                 regression_models: frozenset[str] = frozenset(),
                 max_abs_label: Optional[Mapping[str, float]] = None,
                 spill_dir: Optional[str | Path] = None, lm_models: frozenset[str] = frozenset()) -> None:
        self.ttl = ttl
        self.early_ttl = early_ttl
        self.max_pending = max_pending
        self.regression_models = regression_models
        self.lm_models = lm_models   # language models: they learn a conversation's rating or correction
        self.max_abs_label = dict(max_abs_label or {})   # per regression model (absent: unbounded)
        self.outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.delays: list[float] = []  # feedback ts - log ts of new matches; the caller drains it
        self.consumed = 0.0             # wall time the messages being added were read (set by the caller)
        self._logs = WaitingLogs(ttl, spill_dir)
        self._early: dict[str, LabelEntry] = {}
        self._closed = ClosedIds(max_pending)              # id -> matched?, for duplicates and late feedback
        self._early_expiry: list[tuple[float, str]] = []   # a heap with lazy deletion
        self._early_peak = 0                               # the most feedback waited since `_early` was rebuilt
        # Examples waiting for the watermark, packed (msgpack, ~4x smaller than the objects with their feature
        # dicts): partitions up to `intake.max_ahead` apart in a catch-up hold tens of thousands of them.
        self._ready: list[tuple[float, str, bytes]] = []
        self._pack = msgspec.msgpack.Encoder().encode
        self._unpack = msgspec.msgpack.Decoder(Example).decode
        self._overflow: list[Example] = []                # released early by the bound, until `advance`

    @property
    def pending(self) -> int:
        return len(self._logs) + len(self._early)

    @property
    def held(self) -> int:
        """Matched and pre-joined examples waiting for the watermark (or for `advance`)."""
        return len(self._ready) + len(self._overflow)

    def held_from(self) -> float:
        """The event time of the oldest example held for release (inf: none): all before it went out."""
        oldest = self._ready[0][0] if self._ready else math.inf
        return min(oldest, min((e.ts for e in self._overflow), default=math.inf))

    def state(self) -> JoinerState:
        closed = self._closed.state()
        return JoinerState(list(map(msgspec.Raw, self._logs.packed())), list(self._early.values()), closed.recent,
                           [msgspec.Raw(item[2]) for item in self._ready], dict(self.outcomes), list(self._overflow),
                           msgspec.structs.replace(closed, recent=[]))

    def state_pieces(self, encode: Callable[[object], bytes]) -> Iterator[pieces.Piece]:
        """`state()` encoded as msgpack, in pieces of about a MB whose concatenation equals `encode(self.state())`.

        The packed logs go out as they are kept and the closed ids as views of their arrays, so that a snapshot
        of a full ttl window costs a piece at a time, not a second copy of the window (see `pieces`).
        """
        yield pieces.array_header(len(msgspec.structs.fields(JoinerState)))
        yield from pieces.packed_array(self._logs.packed_lazily())
        yield from pieces.array(list(self._early.values()), encode)
        yield from self._closed.recent_pieces(encode)
        yield from pieces.packed_array([item[2] for item in self._ready])
        yield encode(dict(self.outcomes))
        yield encode(self._overflow)
        yield from self._closed.hashed_pieces(encode)

    def restore(self, state: JoinerState) -> None:
        """Takes over a snapshot's state (in place of whatever this joiner held)."""
        self._logs.restore(state.logs)
        self._early = {fb.request_id: fb for fb in state.early}
        hashed = state.closed_hashed or ClosedIdsState([])
        self._closed = ClosedIds(self.max_pending)
        self._closed.restore(msgspec.structs.replace(hashed, recent=state.closed))
        self._early_expiry = [(fb.ts + self.early_ttl, rid) for rid, fb in self._early.items()]
        self._ready = [(ex.ts, ex.id, self._pack(ex)) for ex in state.ready]
        self._overflow = list(state.overflow)
        for heap in (self._early_expiry, self._ready):
            heapq.heapify(heap)
        self.outcomes = Counter({o: 0 for o in OUTCOMES})
        self.outcomes.update(state.outcomes)

    def add_log(self, log: LogEntry) -> None:
        rid = log.request_id
        if rid in self._logs or self._closed.get(rid) is not None:
            self.outcomes["duplicate"] += 1
            return
        feedback = self._early.pop(rid, None)
        if feedback is not None:
            if log.ts - feedback.ts <= self.early_ttl:
                self._match(log, feedback)
                return
            self._close(rid, feedback.ts, "expired_feedback", matched=False)
        self._logs.add(log)
        self._bound()

    def add_feedback(self, feedback: LabelEntry) -> None:
        rid = feedback.request_id
        log = self._logs.get(rid)
        if log is not None:
            if feedback.ts - log.ts <= self.ttl:
                self._logs.drop(rid)
                self._match(log, feedback)
            else:
                self.outcomes["late"] += 1
            return
        matched = self._closed.get(rid)
        if matched is not None:
            self.outcomes["duplicate" if matched else "late"] += 1
            return
        if rid in self._early:
            self.outcomes["duplicate"] += 1
            return
        self._early[rid] = feedback
        heapq.heappush(self._early_expiry, (feedback.ts + self.early_ttl, rid))
        self._bound()

    def add_example(self, example: Example) -> None:
        """Queues an example joined upstream, to be released in event-time order with the rest."""
        rid = example.id
        if self._closed.get(rid) or rid in self._logs or rid in self._early:
            self.outcomes["duplicate"] += 1   # learned already, or could be as a pair: not twice
            return
        if not self._label_ok(example.model, example.label, example.text):
            self._close(rid, example.ts, "invalid_label", matched=True)
            return
        example.consumed = self.consumed
        heapq.heappush(self._ready, (example.ts, rid, self._pack(example)))
        self._close(rid, example.ts, "prejoined", matched=True)
        self._bound()

    def advance(self, watermark: float, limit: Optional[int] = None) -> list[Example]:
        """Expires what can no longer match and releases the examples below the watermark (at most `limit`).

        An example at the watermark itself waits: its partition may still deliver another event of the
        same time, which must come out in the same `(ts, id)` order however the polls fall. What is over
        `limit` stays held, in the joiner's state: so a large release goes out in pieces that are each a
        consistent cut (a snapshot can fall between any two).
        """
        for log in self._logs.expire(watermark):
            self._close(log.request_id, log.ts, "expired", matched=False)
        self._expire_early(watermark)
        self._closed.expire(watermark - self.ttl - self.early_ttl)
        self._logs.spill(watermark)
        room = len(self._overflow) + len(self._ready) if limit is None else limit
        released, self._overflow = self._overflow[:room], self._overflow[room:]
        while self._ready and self._ready[0][0] < watermark and len(released) < room:
            released.append(self._unpack(heapq.heappop(self._ready)[2]))
        self._compact()
        return released

    def releasable(self, watermark: float) -> bool:
        """Whether `advance(watermark)` would release anything."""
        return bool(self._overflow) or bool(self._ready and self._ready[0][0] < watermark)

    def flush(self) -> list[Example]:
        """Releases every matched example still held (end of input); pending ones stay pending."""
        released = self._overflow + [self._unpack(item[2]) for item in sorted(self._ready, key=lambda item: item[:2])]
        self._ready.clear()
        self._overflow = []
        return released

    def _match(self, log: LogEntry, feedback: LabelEntry) -> None:
        label, text = feedback.label, None
        if log.model in self.lm_models:
            text = msgspec.structs.replace(log.text, rating=feedback.rating, correction=feedback.correction)
            label = text.target or ""   # "": nothing to learn (a rating <= 0 alone), still scored
        if not self._label_ok(log.model, feedback.label, text):
            self._close(log.request_id, feedback.ts, "invalid_label", matched=True)
            return
        ts = max(log.ts, feedback.ts)
        example = Example(log.request_id, log.model, log.features, label, feedback.weight, ts, feedback.ts,
                          self.consumed, log.model_version, log.served, log.partition, text)
        heapq.heappush(self._ready, (ts, log.request_id, self._pack(example)))
        self.delays.append(feedback.ts - log.ts)
        self._close(log.request_id, ts, "matched", matched=True)

    def _label_ok(self, model: str, label: object, text: Optional[Exchange]) -> bool:
        """Whether the feedback gives something to learn from.

        A language model needs a rating or a correction of its answer (`text`); another model a label, which for
        regression must be a number within the model's bound, and is a class otherwise.
        """
        if model in self.lm_models:
            return text is not None and (text.rating is not None or text.correction is not None)
        if label is None:
            return False
        if model not in self.regression_models:
            return True
        return _is_number(label) and abs(label) <= self.max_abs_label.get(model, math.inf)

    def _close(self, rid: str, ts: float, outcome: str, matched: bool) -> None:
        self.outcomes[outcome] += 1
        self._closed.add(rid, ts, matched)

    def _expire_early(self, watermark: float) -> None:
        heap = self._early_expiry
        while heap and heap[0][0] < watermark:
            expires_at, rid = heapq.heappop(heap)
            entry = self._early.get(rid)
            if entry is not None and entry.ts + self.early_ttl == expires_at:
                del self._early[rid]
                self._close(rid, entry.ts, "expired_feedback", matched=False)

    def _bound(self) -> None:
        """Keeps pending entries plus held examples within the bound: releases held ones first, then evicts."""
        if self.pending + len(self._ready) <= self.max_pending:   # the usual case, checked at every message: once
            return
        while self._ready and self.pending + len(self._ready) > self.max_pending:
            # the oldest: the next the watermark would free
            self._overflow.append(self._unpack(heapq.heappop(self._ready)[2]))
        while self.pending > self.max_pending:   # the entry closest to expiry goes, a log or a feedback
            oldest_log, early = self._logs.oldest(), self._early_expiry
            if oldest_log is not None and (not early or oldest_log <= early[0]):
                log = self._logs.get(oldest_log[1])
                self._logs.drop(log.request_id)
                self._close(log.request_id, log.ts, "evicted", matched=False)
                continue
            expires_at, rid = heapq.heappop(early)
            entry = self._early.get(rid)
            if entry is not None and entry.ts + self.early_ttl == expires_at:
                del self._early[rid]
                self._close(rid, entry.ts, "evicted", matched=False)

    def _compact(self) -> None:
        # Matched entries stay in the expiry heap until popped (holding their ids): rebuild when they are a fifth.
        # An id pending again after it expired may keep its old entry too; `_expire_early` checks each on popping.
        heap = self._early_expiry
        if len(heap) > 1.25 * len(self._early) + 1024:
            heap[:] = [item for item in heap if item[1] in self._early]
            heapq.heapify(heap)
        self._early, self._early_peak = shrunk(self._early, self._early_peak)
        self._logs.compact()

    def close(self) -> None:
        """Closes the spill files (the logs in them are gone: call after the final state was taken)."""
        self._logs.close()


def _is_number(label: object) -> bool:
    return type(label) in (int, float)
