"""Waiting logs moved out of memory: an append-only file in the state dir, read back by handle.

At `join.ttl` of event time, the logs whose feedback never comes are most of a
backlog's join state (an hour at 100 requests/s: ~36,000 logs). After
`SPILL_AFTER` seconds of event time almost every log that will match has matched
(feedback delays are seconds to minutes), so the joiner moves the older ones here
and keeps a 64-bit hash of the id and a handle per log (`SpilledIndex`); the rare
feedback that still comes, and the expiry, read the log back with one `pread`
(Kafka Streams keeps its join windows in RocksDB for the same reason).

The files are a cache, not state: they are created unlinked (`O_TMPFILE`), so
nothing is left behind after a crash, and a snapshot writes the logs themselves
(the joiner reads them back). Space is reclaimed a segment at a time: logs
expire in about the order they were spilled, so a segment empties and is closed.

>>> import tempfile
>>> spill = LogSpill(tempfile.mkdtemp())
>>> a, b = spill.put([b"first", b"second"])
>>> spill.get(b), spill.get(a)
(b'second', b'first')
>>> spill.drop(a); spill.drop(b); spill.close()
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from streamlearn.stream.closed_ids import id_hash

SPILL_AFTER = 120.0          # event-time seconds a log waits in memory before it may be spilled
SEGMENT_BYTES = 64 << 20     # a new file after this many bytes
MAX_SPILLED_BYTES = 1 << 20  # a packed log larger than this stays in memory (the handle holds its length)
_LENGTH_BITS = 21
_OFFSET_BITS = 32
INDEX_MERGE_AT = 4096        # spilled ids kept as strings before they are hashed into the sorted arrays


class LogSpill:
    """Packed logs in append-only segment files (unlinked), addressed by an int handle: segment, offset, length."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files: dict[int, int] = {}     # segment -> file descriptor
        self._live: dict[int, int] = {}      # segment -> logs in it not yet dropped
        self._segment = -1
        self._end = SEGMENT_BYTES            # bytes written to the current segment (full: start one)

    def put(self, packed: Sequence[bytes]) -> list[int]:
        """Appends the logs (one write) and returns a handle for each."""
        if not packed:
            return []
        if self._end + sum(map(len, packed)) > SEGMENT_BYTES:
            self._start_segment()
        handles, offset = [], self._end
        for data in packed:
            handles.append((self._segment << (_OFFSET_BITS + _LENGTH_BITS)) | (offset << _LENGTH_BITS) | len(data))
            offset += len(data)
        os.pwrite(self._files[self._segment], b"".join(packed), self._end)
        self._end = offset
        self._live[self._segment] += len(packed)
        return handles

    def get(self, handle: int) -> bytes:
        segment, offset, length = _split(handle)
        data = os.pread(self._files[segment], length, offset)
        if len(data) != length:
            raise OSError(f"spill file segment {segment} is short: {len(data)} of {length} bytes at {offset}")
        return data

    def holds(self, handle: int) -> bool:
        """Whether the handle's segment is still open (a dropped log's may be closed; an open one reads back)."""
        return _split(handle)[0] in self._files

    def drop(self, handle: int) -> None:
        """The log left the join: a segment no log needs any more (and not the one being written) is closed."""
        segment = _split(handle)[0]
        self._live[segment] -= 1
        if not self._live[segment] and segment != self._segment:
            os.close(self._files.pop(segment))
            del self._live[segment]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._live.clear()
        self._segment, self._end = -1, SEGMENT_BYTES

    def files(self) -> int:
        """Segment files open now."""
        return len(self._files)

    def _start_segment(self) -> None:
        if self._segment >= 0 and not self._live[self._segment]:
            os.close(self._files.pop(self._segment))
            del self._live[self._segment]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._segment += 1
        self._files[self._segment] = _unlinked_file(self.folder)
        self._live[self._segment] = 0
        self._end = 0


def _unlinked_file(folder: Path) -> int:
    """A file with no name (gone with the process, even after SIGKILL); a named one unlinked at once elsewhere."""
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        fd, name = tempfile.mkstemp(prefix="join-spill-", dir=folder)
        os.unlink(name)
        return fd


def _split(handle: int) -> tuple[int, int, int]:
    return (handle >> (_OFFSET_BITS + _LENGTH_BITS), (handle >> _LENGTH_BITS) & ((1 << _OFFSET_BITS) - 1),
            handle & ((1 << _LENGTH_BITS) - 1))


def spillable(data: bytes) -> bool:
    return len(data) <= MAX_SPILLED_BYTES



class SpilledIndex:
    """Spilled logs by id, 16 bytes each: a small dict of the newest, then sorted 64-bit hashes next to handles.

    A log's id as a dict key took ~150 bytes with its handle; here the older ones are a hash and a handle in two
    arrays (as `ClosedIds` keeps closed ids). A hash names a candidate: the caller reads the log and checks its
    id, so two ids sharing a hash (probability ~n / 2**64 a lookup) make one of them not found, never another
    log returned for it. Removed entries are marked (-1) and dropped at the next merge.

    >>> index = SpilledIndex(merge_at=2)
    >>> index.add("r-1", 10); index.add("r-2", 20); index.add("r-3", 30)
    >>> index.get("r-1"), index.remove("r-2"), index.get("r-2"), len(index), sorted(index.handles())
    (10, 20, None, 2, [10, 30])
    """

    def __init__(self, merge_at: int = INDEX_MERGE_AT) -> None:
        self.merge_at = merge_at
        self._recent: dict[str, int] = {}
        self._keys = np.empty(0, np.uint64)
        self._handles = np.empty(0, np.int64)
        self._live = 0   # in the arrays

    def __len__(self) -> int:
        return len(self._recent) + self._live

    def add(self, rid: str, handle: int) -> None:
        self._recent[rid] = handle
        if len(self._recent) >= self.merge_at:
            self._merge()

    def get(self, rid: str) -> Optional[int]:
        """The handle of a spilled log that may be `rid`'s (the caller checks the id it reads); None if none."""
        handle = self._recent.get(rid)
        if handle is not None or not self._live:
            return handle
        i = self._find(rid)
        return None if i is None else int(self._handles[i])

    def remove(self, rid: str) -> Optional[int]:
        """Forgets `rid`'s entry and returns its handle (None if it has none)."""
        handle = self._recent.pop(rid, None)
        if handle is not None or not self._live:
            return handle
        i = self._find(rid)
        if i is None:
            return None
        handle = int(self._handles[i])
        self._handles[i] = -1
        self._live -= 1
        return handle

    def handles(self) -> list[int]:
        """Every live handle: the arrays' in hash order, then the newest in the order they came."""
        return self._handles[self._handles >= 0].tolist() + list(self._recent.values())

    def live_handles(self) -> np.ndarray:
        """`handles()` as an int64 array (no int object per handle)."""
        recent = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        return np.concatenate([self._handles[self._handles >= 0], recent])

    def clear(self) -> None:
        self._recent = {}
        self._keys, self._handles, self._live = np.empty(0, np.uint64), np.empty(0, np.int64), 0

    def _find(self, rid: str) -> Optional[int]:
        key = np.uint64(id_hash(rid))
        i = int(self._keys.searchsorted(key))
        if i < len(self._keys) and self._keys[i] == key and self._handles[i] >= 0:
            return i
        return None

    def _merge(self) -> None:
        live = self._handles >= 0
        keys = np.concatenate([self._keys[live], np.fromiter(map(id_hash, self._recent), np.uint64, len(self._recent))])
        handles = np.concatenate([self._handles[live], np.fromiter(self._recent.values(), np.int64, len(self._recent))])
        order = np.argsort(keys, kind="stable")
        self._keys, self._handles = keys[order], handles[order]
        self._live = len(self._keys)
        self._recent = {}
