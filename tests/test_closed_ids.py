"""The join's memory of closed ids: the compact store answers as a plain dict of every close would."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from streamlearn.stream.closed_ids import ClosedIds, ClosedIdsState


@pytest.mark.parametrize("seed", range(5))
def test_it_answers_as_a_dict_of_every_close_would(seed):
    """Random ids closed (some again), the horizon moving, snapshots in between: the same answers as a dict."""
    rng = random.Random(seed)
    closed = ClosedIds(max_entries=10**9, merge_at=rng.choice([7, 50, 300]))
    truth: dict[str, tuple[float, bool]] = {}
    horizon, now = -math.inf, 0.0
    for step in range(4000):
        now += rng.random()
        rid = f"r-{rng.randrange(1500)}"
        at, matched = now - rng.uniform(0, 30), rng.random() < 0.7   # closes arrive a little out of order
        closed.add(rid, at, matched)
        truth[rid] = (at, matched)
        if step % 97 == 0:
            horizon = max(horizon, now - rng.uniform(50, 400))
            closed.expire(horizon)
        if step % 1000 == 999:   # a snapshot and a restore in between
            state = msgspec.msgpack.decode(msgspec.msgpack.encode(closed.state()), type=ClosedIdsState)
            closed = ClosedIds(max_entries=10**9, merge_at=closed.merge_at)
            closed.restore(state)
            closed.expire(horizon)
        probe = f"r-{rng.randrange(1600)}"
        expected = truth.get(probe)
        assert closed.get(probe) == (expected[1] if expected and expected[0] >= horizon else None), (step, probe)


def test_past_the_bound_the_oldest_closes_go_first():
    closed = ClosedIds(max_entries=100, merge_at=30)
    for n in range(300):
        closed.add(f"r-{n}", float(n), True)
        closed.expire(-math.inf)
    assert len(closed) <= 100
    assert closed.get("r-299") and closed.get("r-250") and closed.get("r-0") is None


def test_a_merge_and_a_snapshot_copy_one_shard_at_a_time():
    """A merge, and the pieces of a snapshot with forgotten ids in it, hold about a shard more, not an array more."""
    import tracemalloc

    from streamlearn.stream.closed_ids import SHARDS

    closed = ClosedIds(max_entries=10**9, merge_at=10**9)
    for i in range(200_000):
        closed.add(f"r-{i}", float(i), True)
    closed.merge_at = len(closed) + 1     # the next close merges the 200,000 into the shards
    closed.add("r-first-merge", 0.5, True)
    for i in range(200_000, 208_192):
        closed.add(f"r-{i}", float(i), True)
    closed.merge_at = 8192 + 2
    tracemalloc.start()
    try:
        closed.add("r-last", 208_192.0, True)   # merges 8,194 new ids into every shard
        merged = tracemalloc.get_traced_memory()
        closed.expire(1000.0)                   # some forgotten but still in the shards: the pieces filter them
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        for _ in closed.hashed_pieces(msgspec.msgpack.encode):
            pass
        snapshot = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert closed.get("r-999") is None and closed.get("r-1000") and closed.get("r-last") and closed.stale() == 1001
    shard = 17 * closed.hashed / SHARDS
    assert merged[1] - merged[0] < 2 * shard, merged   # a whole array's copy beside them: ~8 shards
    assert snapshot < 2 * shard, snapshot
