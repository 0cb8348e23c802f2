"""The logs waiting for their feedback in the join: packed, filed by expiry second, the older ones on disk.

`FeedbackJoiner` keeps its pending logs here. Logs are filed under the second of
event time they expire in; given a folder, those that have waited `SPILL_AFTER`
seconds move to a `LogSpill` (`spill.py`), so that a full `join.ttl` window of logs
whose feedback never comes costs ~24 bytes a log in memory.

>>> from streamlearn.stream.decode import LogEntry
>>> logs = WaitingLogs(ttl=60.0)
>>> logs.add(LogEntry("r-1", 100.0, "default", {"x": 1.0}))
>>> "r-1" in logs, [log.request_id for log in logs.expire(watermark=161.0)], len(logs)
(True, ['r-1'], 0)
"""

from __future__ import annotations

import heapq
import logging
import math
from pathlib import Path
from typing import Callable, Optional

import msgspec
import numpy as np

from streamlearn.stream.decode import LogEntry
from streamlearn.stream.spill import SPILL_AFTER, LogSpill, SpilledIndex, spillable

logger = logging.getLogger(__name__)


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
        self._logs, self._logs_peak = shrunk(self._logs, self._logs_peak)
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


def shrunk(table: dict, peak: int) -> tuple[dict, int]:
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
