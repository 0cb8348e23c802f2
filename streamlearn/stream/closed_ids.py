"""The request ids a join has closed recently, kept compactly, so that a repeat is told apart from a new id.

A join remembers every id it closed for `ttl + early_ttl` of event time (a log
or feedback sent again is a `duplicate`, a feedback after its log expired is
`late`). At 100 requests a second that is ~400,000 ids; as a dict of strings
they took ~160 bytes each, and a backlog that fills the window grew the intake
by ~60 MB. Here the newest ids sit in a small dict and the rest as sorted 64-bit
hashes (BLAKE2b of the id) next to their close time and outcome: 17 bytes an id.
Two different ids share a hash with probability ~n / 2**64 per lookup (n ids
kept): such an id would be counted a `duplicate`, never lost silently.

An id is remembered while its close time is at or above the horizon that the
join moves with the watermark; what falls below it is invisible at once and
dropped at the next merge. At most `max_entries` ids are kept: past that the
oldest tenth (by close time) goes when the horizon next moves, so the trimming is paid once per many ids.

>>> closed = ClosedIds(max_entries=1000, merge_at=2)
>>> for n in range(5):
...     closed.add(f"r-{n}", float(n), matched=n % 2 == 0)
>>> closed.get("r-2"), closed.get("r-3"), closed.get("r-9")
(True, False, None)
>>> closed.expire(3.0)
>>> closed.get("r-2"), closed.get("r-3")
(None, False)
>>> closed.max_entries = 1
>>> closed.expire(3.0); len(closed), closed.get("r-4")
(1, True)
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator, Optional

import msgspec
import numpy as np

from streamlearn.stream import pieces

MERGE_AT = 32_768      # ids kept as strings before they are hashed into the sorted arrays
TRIM_SHARE = 0.1       # past `max_entries`, this share of the oldest goes at once


class ClosedIdsState(msgspec.Struct, array_like=True):
    """The snapshot form: the newest ids as strings, the rest as the sorted arrays' bytes."""

    recent: list[tuple[str, float, bool]]
    keys: bytes = b""      # uint64, sorted
    at: bytes = b""        # float64 close times, in the keys' order
    matched: bytes = b""   # bool


class ClosedIds:
    """Closed request ids with their close time and whether they matched (a dict of the newest, hashes of the rest)."""

    def __init__(self, max_entries: int, merge_at: int = MERGE_AT) -> None:
        self.max_entries = max_entries
        self.merge_at = merge_at
        self.horizon = -math.inf                       # ids closed before this are forgotten
        self._recent: dict[str, tuple[float, bool]] = {}
        self._keys = np.empty(0, np.uint64)
        self._at = np.empty(0, np.float64)
        self._matched = np.empty(0, np.bool_)

    def __len__(self) -> int:
        return len(self._recent) + len(self._keys)

    def get(self, rid: str) -> Optional[bool]:
        """Whether `rid` matched when it was closed; None when it is not remembered."""
        found = self._recent.get(rid)
        if found is not None:
            return found[1] if found[0] >= self.horizon else None
        if not len(self._keys):
            return None
        key = np.uint64(_hash(rid))   # a numpy scalar: searchsorted converts a Python int slowly
        i = self._keys.searchsorted(key)
        if i < len(self._keys) and self._keys[i] == key and self._at[i] >= self.horizon:
            return bool(self._matched[i])
        return None

    def add(self, rid: str, ts: float, matched: bool) -> None:
        """Remembers `rid` as closed at event time `ts` (a later close of the same id replaces the earlier)."""
        self._recent.pop(rid, None)   # re-inserted: the dict's order stays the order of closing
        self._recent[rid] = (ts, matched)
        if len(self._recent) >= self.merge_at:
            self._merge()

    def expire(self, horizon: float) -> None:
        """Forgets the ids closed before `horizon` (never moves back), and keeps to `max_entries`."""
        self.horizon = max(self.horizon, horizon)
        if len(self) > self.max_entries:
            self._merge()

    def state(self) -> ClosedIdsState:
        keep = self._at >= self.horizon
        return ClosedIdsState(self.recent(), self._keys[keep].tobytes(), self._at[keep].tobytes(),
                              self._matched[keep].tobytes())

    def recent(self) -> list[tuple[str, float, bool]]:
        """The newest ids still remembered, as strings: `state().recent`."""
        return [(rid, at, m) for rid, (at, m) in self._recent.items() if at >= self.horizon]

    def hashed_pieces(self, encode: Callable[[object], bytes]) -> Iterator[pieces.Piece]:
        """`state()` without its recent ids (`recent=[]`), encoded as msgpack in pieces: the arrays as views.

        Forgotten entries are dropped one array at a time, so the copy held is at most one array's.
        """
        keep = self._at >= self.horizon
        every = bool(keep.all())
        yield pieces.array_header(len(msgspec.structs.fields(ClosedIdsState)))
        yield encode([])
        for values in (self._keys, self._at, self._matched):
            yield from pieces.binary(memoryview(values if every else values[keep]))

    def restore(self, state: ClosedIdsState) -> None:
        self.horizon = -math.inf
        self._keys = np.frombuffer(state.keys, np.uint64).copy()
        self._at = np.frombuffer(state.at, np.float64).copy()
        self._matched = np.frombuffer(state.matched, np.bool_).copy()
        self._recent = {}
        for rid, at, matched in state.recent:
            self.add(rid, at, matched)

    def _merge(self) -> None:
        """Hashes the dict's ids into the sorted arrays, dropping what is forgotten, then trims to the bound.

        Only the dict's ids are sorted; they are then placed among the old entries kept, one array at a time,
        each old array let go before the next is copied: a merge holds one array's size more for a moment
        (the old arrays are ~7 MB for an hour at 100 requests a second).
        """
        keys, at, matched = self._recent_sorted()
        self._recent = {}
        keep = self._at >= self.horizon
        where = np.searchsorted(self._keys, keys)
        again = where < len(self._keys)
        again[again] = self._keys[where[again]] == keys[again]
        keep[where[again]] = False            # closed again since: the newer close replaces the older
        del where, again
        fresh = at >= self.horizon
        keys, at, matched = keys[fresh], at[fresh], matched[fresh]
        self._keys = self._keys[keep]
        slots = np.searchsorted(self._keys, keys) + np.arange(len(keys))   # where each new id lands
        others = np.ones(len(self._keys) + len(keys), np.bool_)
        others[slots] = False
        self._keys = _placed(self._keys, keys, slots, others)
        # Each filtered copy replaces its old array before the merged one is built: the old one is freed now.
        self._at = self._at[keep]
        self._at = _placed(self._at, at, slots, others)
        self._matched = self._matched[keep]
        self._matched = _placed(self._matched, matched, slots, others)
        if len(self._keys) > self.max_entries:
            newest = np.sort(_newest(self._at, self.max_entries - int(self.max_entries * TRIM_SHARE)))
            self._keys, self._at, self._matched = self._keys[newest], self._at[newest], self._matched[newest]

    def _recent_sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The dict's ids as (hash, close time, matched) arrays sorted by hash, one entry per hash."""
        recent = self._recent
        n = len(recent)
        keys = np.fromiter(map(_hash, recent), np.uint64, n)
        at = np.fromiter((v[0] for v in recent.values()), np.float64, n)
        matched = np.fromiter((v[1] for v in recent.values()), np.bool_, n)
        order = np.argsort(keys, kind="stable")
        keys, at, matched = keys[order], at[order], matched[order]
        last = np.append(keys[1:] != keys[:-1], True)   # two ids with one hash: the later close stands
        return keys[last], at[last], matched[last]


def _placed(old: np.ndarray, new: np.ndarray, slots: np.ndarray, others: np.ndarray) -> np.ndarray:
    """`new` at `slots` and `old`, in order, everywhere else (`others`)."""
    out = np.empty(len(others), old.dtype)
    out[slots] = new
    out[others] = old
    return out


def _newest(at: np.ndarray, room: int) -> np.ndarray:
    """The indices of the `room` latest close times."""
    if room <= 0:
        return np.zeros(0, np.int64)
    return np.argpartition(at, len(at) - room)[len(at) - room:]


def id_hash(rid: str) -> int:
    """The 64-bit hash an id is kept by (BLAKE2b of its UTF-8)."""
    return _hash(rid)


def _hash(rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
