"""The request ids a join has closed recently, kept compactly, so that a repeat is told apart from a new id.

A join remembers every id it closed for `ttl + early_ttl` of event time (a log
or feedback sent again is a `duplicate`, a feedback after its log expired is
`late`). At 100 requests a second that is ~400,000 ids; as a dict of strings
they took ~160 bytes each, and a backlog that fills the window grew the intake
by ~60 MB. Here the newest ids sit in a small dict and the rest as sorted 64-bit
hashes (BLAKE2b of the id) next to their close time and outcome: 17 bytes an id.
The sorted arrays are cut into `SHARDS` by the hash's top bits, so that a merge or
a snapshot copies one shard at a time: a transient of ~1/16 of the arrays, where a
whole copy (~3 MB an array for an hour at 100 requests a second) was held beside them.
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
import itertools
import math
from typing import Callable, Iterator, NamedTuple, Optional

import msgspec
import numpy as np

from streamlearn.stream import pieces

MERGE_AT = 32_768      # ids kept as strings before they are hashed into the sorted arrays
TRIM_SHARE = 0.1       # past `max_entries`, this share of the oldest goes at once
SHARD_BITS = 4         # the arrays are cut into 2**SHARD_BITS shards by the hash's top bits
SHARDS = 1 << SHARD_BITS
_SHIFT = 64 - SHARD_BITS
_SHARD_STARTS = np.arange(1, SHARDS, dtype=np.uint64) << np.uint64(_SHIFT)   # the first key of shards 1..


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
        self._shards = [_Shard.empty() for _ in range(SHARDS)]
        self._hashed = 0                               # entries in the shards

    def __len__(self) -> int:
        return len(self._recent) + self._hashed

    @property
    def hashed(self) -> int:
        """Ids kept as hashes (forgotten ones included until the next merge)."""
        return self._hashed

    def stale(self) -> int:
        """Hashed ids already forgotten (closed before the horizon) that the next merge drops."""
        return sum(int((shard.at < self.horizon).sum()) for shard in self._shards)

    def get(self, rid: str) -> Optional[bool]:
        """Whether `rid` matched when it was closed; None when it is not remembered."""
        found = self._recent.get(rid)
        if found is not None:
            return found[1] if found[0] >= self.horizon else None
        if not self._hashed:
            return None
        h = _hash(rid)
        shard = self._shards[h >> _SHIFT]
        key = np.uint64(h)   # a numpy scalar: searchsorted converts a Python int slowly
        i = shard.keys.searchsorted(key)
        if i < len(shard.keys) and shard.keys[i] == key and shard.at[i] >= self.horizon:
            return bool(shard.matched[i])
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
        kept = [shard.kept(self.horizon) for shard in self._shards]
        return ClosedIdsState(self.recent(), b"".join(k.keys.tobytes() for k in kept),
                              b"".join(k.at.tobytes() for k in kept), b"".join(k.matched.tobytes() for k in kept))

    def recent(self) -> list[tuple[str, float, bool]]:
        """The newest ids still remembered, as strings: `state().recent`."""
        return [(rid, at, m) for rid, (at, m) in self._recent.items() if at >= self.horizon]

    def recent_pieces(self, encode: Callable[[object], bytes], chunk: int = pieces.CHUNK_ITEMS) -> Iterator[bytes]:
        """`recent()` encoded as one msgpack array, `chunk` ids at a time (a snapshot never holds all the tuples)."""
        horizon = self.horizon
        yield pieces.array_header(sum(1 for at, _ in self._recent.values() if at >= horizon))
        items = iter(self._recent.items())
        while True:
            taken = list(itertools.islice(items, chunk))
            if not taken:
                return
            part = [(rid, at, m) for rid, (at, m) in taken if at >= horizon]
            if part:
                yield encode(part)[len(pieces.array_header(len(part))):]

    def hashed_pieces(self, encode: Callable[[object], bytes]) -> Iterator[pieces.Piece]:
        """`state()` without its recent ids (`recent=[]`), encoded as msgpack in pieces: the arrays as views.

        Forgotten entries are dropped one shard at a time, so the copy held is at most one shard's.
        """
        horizon = self.horizon
        yield pieces.array_header(len(msgspec.structs.fields(ClosedIdsState)))
        yield encode([])
        counts = [int((shard.at >= horizon).sum()) for shard in self._shards]
        for field in ("keys", "at", "matched"):
            yield pieces.binary_header(sum(counts) * np.dtype(_DTYPES[field]).itemsize)
            for shard, count in zip(self._shards, counts):
                values = getattr(shard, field)
                part = values if count == len(values) else values[shard.at >= horizon]
                yield from _views(memoryview(part).cast("B"))

    def restore(self, state: ClosedIdsState) -> None:
        self.horizon = -math.inf
        keys = np.frombuffer(state.keys, np.uint64)
        at = np.frombuffer(state.at, np.float64)
        matched = np.frombuffer(state.matched, np.bool_)
        bounds = [0, *np.searchsorted(keys, _SHARD_STARTS).tolist(), len(keys)]
        self._shards = [_Shard(keys[a:b].copy(), at[a:b].copy(), matched[a:b].copy())
                        for a, b in zip(bounds[:-1], bounds[1:])]
        self._hashed = len(keys)
        self._recent = {}
        for rid, at_, matched_ in state.recent:
            self.add(rid, at_, matched_)

    def _merge(self) -> None:
        """Hashes the dict's ids into the sorted shards, dropping what is forgotten, then trims to the bound.

        Only the dict's ids are sorted; each shard then places its share of them among its old entries kept,
        one array at a time: a merge holds one shard's array more for a moment, not a whole array's.
        """
        keys, at, matched = self._recent_sorted()
        self._recent = {}
        bounds = [0, *np.searchsorted(keys, _SHARD_STARTS).tolist(), len(keys)]
        for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            self._shards[n] = self._shards[n].merged(keys[a:b], at[a:b], matched[a:b], self.horizon)
        self._hashed = sum(len(shard.keys) for shard in self._shards)
        if self._hashed > self.max_entries:
            self._trim(self.max_entries - int(self.max_entries * TRIM_SHARE))

    def _trim(self, room: int) -> None:
        """Keeps the `room` latest closes of the shards (a rare path: past `max_entries`)."""
        newest = np.sort(_newest(np.concatenate([shard.at for shard in self._shards]), room))
        start = 0
        for n, shard in enumerate(self._shards):
            end = start + len(shard.keys)
            mine = newest[np.searchsorted(newest, start):np.searchsorted(newest, end)] - start
            self._shards[n] = _Shard(shard.keys[mine], shard.at[mine], shard.matched[mine])
            start = end
        self._hashed = sum(len(shard.keys) for shard in self._shards)

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


_DTYPES = {"keys": np.uint64, "at": np.float64, "matched": np.bool_}


class _Shard(NamedTuple):
    """One shard of the hashed ids: sorted keys, their close times and outcomes."""

    keys: np.ndarray
    at: np.ndarray
    matched: np.ndarray

    @staticmethod
    def empty() -> _Shard:
        return _Shard(np.empty(0, np.uint64), np.empty(0, np.float64), np.empty(0, np.bool_))

    def kept(self, horizon: float) -> _Shard:
        keep = self.at >= horizon
        return _Shard(self.keys[keep], self.at[keep], self.matched[keep])

    def merged(self, keys: np.ndarray, at: np.ndarray, matched: np.ndarray, horizon: float) -> _Shard:
        """This shard with the new sorted entries placed in it; forgotten ones and older closes of an id dropped."""
        old_keys = self.keys
        keep = self.at >= horizon
        if not len(keys) and keep.all():
            return self   # nothing new, nothing forgotten
        where = np.searchsorted(old_keys, keys)
        again = where < len(old_keys)
        again[again] = old_keys[where[again]] == keys[again]
        keep[where[again]] = False            # closed again since: the newer close replaces the older
        del where, again
        fresh = at >= horizon
        keys, at, matched = keys[fresh], at[fresh], matched[fresh]
        kept_keys = old_keys[keep]
        slots = np.searchsorted(kept_keys, keys) + np.arange(len(keys))   # where each new id lands
        others = np.ones(len(kept_keys) + len(keys), np.bool_)
        others[slots] = False
        return _Shard(_placed(kept_keys, keys, slots, others), _placed(self.at[keep], at, slots, others),
                      _placed(self.matched[keep], matched, slots, others))


def _views(data: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(data), pieces.CHUNK_BYTES):
        yield data[start:start + pieces.CHUNK_BYTES]


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
