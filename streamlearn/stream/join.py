"""Joins inference logs with their feedback by `request_id`, in event time.

The join is symmetric: whichever side arrives first waits for the other. A pair
matches when the feedback is at most `ttl` seconds (event time) after the log, or
at most `early_ttl` before it; this rule, not the arrival order, decides, so the
same events give the same examples however Kafka interleaves the partitions.

Matched examples are held until the watermark (the event time below which no
more input can arrive) passes them and are then released in `(ts, id)` order:
the learner sees one deterministic sequence for a replayable source.

Examples joined upstream (the `examples` topic) go through the same accounting:
an id seen before as a pre-joined example or a matched request, or pending as a
log or feedback, is a `duplicate` (ids are remembered as long as closed requests
are); a regression label that is not a number or beyond the model's bound is an
`invalid_label`; every other one is counted `prejoined` and held for the
watermark like a matched pair. So each input ends in exactly one outcome.

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
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import msgspec
import numpy as np

from streamlearn.records import Example
from streamlearn.stream import pieces
from streamlearn.stream.closed_ids import ClosedIds, ClosedIdsState
from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.spill import LogSpill, SPILL_AFTER, SpilledIndex, spillable

logger = logging.getLogger(__name__)
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
                 spill_dir: Optional[str | Path] = None) -> None:
        self.ttl = ttl
        self.early_ttl = early_ttl
        self.max_pending = max_pending
        self.regression_models = regression_models
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
        if not self._label_ok(example.model, example.label):
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
        label = feedback.label
        if not self._label_ok(log.model, label):
            self._close(log.request_id, feedback.ts, "invalid_label", matched=True)
            return
        ts = max(log.ts, feedback.ts)
        example = Example(log.request_id, log.model, log.features, label, feedback.weight, ts, feedback.ts,
                          self.consumed, log.model_version, log.served)
        heapq.heappush(self._ready, (ts, log.request_id, self._pack(example)))
        self.delays.append(feedback.ts - log.ts)
        self._close(log.request_id, ts, "matched", matched=True)

    def _label_ok(self, model: str, label: object) -> bool:
        """Regression labels must be numbers within the model's bound; any label is a class otherwise."""
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
        self._early, self._early_peak = _shrunk(self._early, self._early_peak)
        self._logs.compact()

    def close(self) -> None:
        """Closes the spill files (the logs in them are gone: call after the final state was taken)."""
        self._logs.close()


class WaitingLogs:
    """The logs waiting for their feedback: packed, filed by expiry second, the older ones spilled to disk.

    Each log is kept as packed msgpack (~180 bytes, not ~640 as objects; packing and unpacking cost ~0.5 µs a
    pair) under its id, and its id is filed under the second of event time it expires in: a list slot, where a
    heap of (expiry, id) tuples took ~100 bytes a log. Given a folder, the logs older than `SPILL_AFTER` (event
    time, by the watermark) go to a `LogSpill` there, a second at a time: what stays in memory is their handles
    filed under that second and a `SpilledIndex` entry (24 bytes a log, where id, dict entry and handle took ~160):
    at `ttl` of event time the logs whose feedback never comes are most of a backlog's join state.
    """

    def __init__(self, ttl: float, spill_dir: Optional[str | Path] = None) -> None:
        self.ttl = ttl
        self._pack = msgspec.msgpack.Encoder().encode
        self._unpack = msgspec.msgpack.Decoder(LogEntry).decode
        self._logs: dict[str, bytes] = {}             # id -> packed log, in memory
        self._logs_peak = 0                           # the most logs in memory since `_logs` was rebuilt
        self._filed: dict[int, list[str]] = {}        # expiry second -> ids (lazily deleted: checked when due)
        self._spilled = SpilledIndex()                # id -> handle of a spilled log
        self._spilled_filed: dict[int, np.ndarray] = {}   # expiry second -> handles spilled (checked when due)
        self._seconds: list[int] = []                 # heap of the seconds filed
        self._unspilled: list[int] = []               # heap of the seconds not yet looked at for spilling
        self._entries = 0                             # ids filed, matched ones included until compacted
        self._spill = LogSpill(spill_dir) if spill_dir is not None else None
        self._spilling = True                         # until a write fails

    def __len__(self) -> int:
        return len(self._logs) + len(self._spilled)

    def __contains__(self, rid: str) -> bool:
        return rid in self._logs or self._read_spilled(rid) is not None

    def add(self, log: LogEntry) -> None:
        self._logs[log.request_id] = self._pack(log)
        self._file(log.request_id, _second(log.ts + self.ttl))

    def get(self, rid: str) -> Optional[LogEntry]:
        kept = self._logs.get(rid)
        return self._unpack(kept) if kept is not None else self._read_spilled(rid)

    def drop(self, rid: str) -> None:
        if self._logs.pop(rid, None) is None:
            self._spill.drop(self._spilled.remove(rid))

    def expire(self, watermark: float) -> list[LogEntry]:
        """Removes and returns the logs whose expiry (ts + ttl) is before the watermark, by expiry second."""
        expired = []
        while self._seconds and self._seconds[0] < watermark:
            second = self._seconds[0]
            due = self._filed[second]
            expired += self._expire_spilled(second, watermark)
            waiting = []
            for rid in due:
                log = self.get(rid)
                if log is None or _second(log.ts + self.ttl) != second:
                    continue   # matched, or gone and filed again under another second
                if log.ts + self.ttl < watermark:
                    self.drop(rid)
                    expired.append(log)
                else:
                    waiting.append(rid)
            self._entries -= len(due) - len(waiting)
            if waiting or second in self._spilled_filed:   # the watermark is inside this second: the rest
                self._filed[second] = waiting                 # expire once it passes them
                break
            heapq.heappop(self._seconds)
            del self._filed[second]
        return expired

    def _expire_spilled(self, second: int, watermark: float) -> list[LogEntry]:
        """The spilled logs filed under `second` that expire before the watermark, removed (the rest stay filed)."""
        handles = self._spilled_filed.get(second)
        if handles is None:
            return []
        expired, waiting = [], []
        for handle in handles.tolist():
            log = self._spilled_log(handle)
            if log is None:
                continue   # matched or evicted since it was spilled
            if log.ts + self.ttl < watermark:
                self.drop(log.request_id)
                expired.append(log)
            else:
                waiting.append(handle)
        if waiting:
            self._spilled_filed[second] = np.array(waiting, np.int64)
        else:
            del self._spilled_filed[second]
        return expired

    def oldest(self) -> Optional[tuple[float, str]]:
        """(expiry, id) of the log that expires first (ties: the lowest id); None when no log waits."""
        while self._seconds:
            second = self._seconds[0]
            due = [(log.ts + self.ttl, rid) for rid in self._filed[second]
                   if (log := self.get(rid)) is not None and _second(log.ts + self.ttl) == second]
            for handle in self._spilled_filed.get(second, np.empty(0, np.int64)).tolist():
                if (log := self._spilled_log(handle)) is not None:
                    due.append((log.ts + self.ttl, log.request_id))
            if due:
                return min(due)
            self._spilled_filed.pop(second, None)
            self._entries -= len(self._filed.pop(second))
            heapq.heappop(self._seconds)
        return None

    def spill(self, watermark: float) -> None:
        """Moves the logs older than `SPILL_AFTER` (by the watermark) to the spill file, a second at a time."""
        if self._spill is None or not self._spilling:
            return
        line = watermark - SPILL_AFTER + self.ttl   # the expiry seconds wholly before this are old enough
        while self._unspilled and self._unspilled[0] + 1 <= line:
            second = heapq.heappop(self._unspilled)
            filed = self._filed.get(second, [])
            rids = [rid for rid in dict.fromkeys(filed)
                    if (kept := self._logs.get(rid)) is not None and spillable(kept)
                    and _second(self._unpack(kept).ts + self.ttl) == second]
            try:
                handles = self._spill.put([self._logs[rid] for rid in rids])
            except OSError as err:   # a full or read-only disk: the logs stay in memory, as without a folder
                logger.warning("waiting logs are no longer moved to %s (%s): they stay in memory",
                               self._spill.folder, err)
                self._spilling = False
                return
            for rid, handle in zip(rids, handles):
                del self._logs[rid]
                self._spilled.add(rid, handle)
            if handles:
                self._spilled_filed[second] = np.concatenate(
                    [self._spilled_filed.get(second, np.empty(0, np.int64)), np.array(handles, np.int64)])
            self._filed[second] = [rid for rid in filed if rid in self._logs]
            self._entries -= len(filed) - len(self._filed[second])

    def compact(self) -> None:
        """Drops matched ids from the seconds they were filed under once they are a fifth of the entries."""
        self._logs, self._logs_peak = _shrunk(self._logs, self._logs_peak)
        if self._entries <= 1.25 * len(self._logs) + 1024:
            return
        logs, spilled = self._logs, self._spilled_filed
        self._filed = {second: kept for second, rids in self._filed.items()
                       if (kept := [r for r in rids if r in logs]) or second in spilled}
        self._seconds = list(self._filed)
        heapq.heapify(self._seconds)
        self._unspilled = [second for second in self._unspilled if second in self._filed]
        heapq.heapify(self._unspilled)
        self._entries = sum(map(len, self._filed.values()))

    def packed(self) -> list[bytes]:
        """Every waiting log, packed: the spilled ones (read back), then those in memory in the order they came."""
        return self.packed_lazily()[:]

    def packed_lazily(self) -> _Packed:
        """`packed()` as a sequence that reads each spilled log back only when asked for."""
        load = self._spill.get if self._spill is not None else None
        return _Packed(self._spilled.live_handles(), list(self._logs.values()), load)

    def restore(self, logs: list[LogEntry]) -> None:
        self.close()
        self._logs, self._filed, self._seconds, self._unspilled, self._entries = {}, {}, [], [], 0
        self._spilled.clear()
        self._spilled_filed = {}
        for log in logs:
            self.add(log)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()

    def _file(self, rid: str, second: int) -> None:
        filed = self._filed.get(second)
        if filed is None:
            filed = self._filed[second] = []
            heapq.heappush(self._seconds, second)
            heapq.heappush(self._unspilled, second)
        filed.append(rid)
        self._entries += 1

    def _spilled_log(self, handle: int) -> Optional[LogEntry]:
        """The log a filed handle points to, if it still waits (else it matched or was evicted since)."""
        if not self._spill.holds(handle):
            return None   # every log of its segment left: the segment is closed
        log = self._unpack(self._spill.get(handle))
        return log if self._spilled.get(log.request_id) == handle else None

    def _read_spilled(self, rid: str) -> Optional[LogEntry]:
        """`rid`'s log if it is spilled (read back, and checked to be its: a hash names only a candidate)."""
        handle = self._spilled.get(rid) if len(self._spilled) else None
        if handle is None:
            return None
        log = self._unpack(self._spill.get(handle))
        return log if log.request_id == rid else None


class _Packed:
    """A read-only sequence of packed logs: the spilled ones (handles, read back as they are sliced), then the rest.

    The handles stay a numpy array until a slice is read, so a snapshot holds no int object per spilled log.
    """

    def __init__(self, spilled: np.ndarray, kept: list[bytes], load: Optional[Callable[[int], bytes]]) -> None:
        self._spilled = spilled
        self._kept = kept
        self._load = load

    def __len__(self) -> int:
        return len(self._spilled) + len(self._kept)

    def __getitem__(self, index: slice) -> list[bytes]:
        """The logs of a contiguous slice (the only kind `pieces` takes)."""
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("only contiguous slices of the packed logs are read")
        n = len(self._spilled)
        read = [self._load(handle) for handle in self._spilled[start:min(stop, n)].tolist()] if start < n else []
        return read + self._kept[max(start - n, 0):max(stop - n, 0)]


def _shrunk(table: dict, peak: int) -> tuple[dict, int]:
    """`table` rebuilt once it holds under a quarter of its peak since the last rebuild (amortised O(1) an entry),
    with its new peak: a dict keeps the capacity of its largest size after deletions, and its freed entries
    hold the heap (a skewed catch-up fills these to tens of thousands, then drains them)."""
    size = len(table)
    if size >= peak:
        return table, size
    if size < peak // 4 and peak > 1024:
        return dict(table), size
    return table, peak


def _second(expiry: float) -> int:
    return math.floor(expiry)


def _is_number(label: object) -> bool:
    return type(label) in (int, float)
