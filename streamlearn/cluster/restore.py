"""At start, the newest epoch every replica has a snapshot of: restored as it was, or divided anew for another count.

Replica r writes its snapshots to `cluster.snapshot_dir/replica-<r>` (or its own
`state_dir/snapshots` without one), each tagged with its epoch (the syncs before it),
the number of replicas and its rank. A restart, every replica at once:

1. **Lists** the snapshots it can see that verify and fit this config: its own folder,
   and (with a shared `snapshot_dir`) the folders of old ranks that map to it
   (folder f is looked at by replica f mod N, so each is read once).
2. **Agrees** with the others on one list (one gather): the epochs that every rank of
   the count that wrote them has a snapshot of are complete; the newest one is taken.
3. **Restores** it. With the same number of replicas, each takes its own snapshot: it
   goes on exactly as before the crash. With another number (rescaling), each reads
   every old replica's snapshot of that epoch (so `snapshot_dir` must be shared) and
   takes the partitions p with p mod N = r: their offsets, the join state that came from
   them (logs, feedback, examples waiting for the watermark, the held examples), their
   watermarks. The models are the ones of that sync (equal on every old replica); the
   rest of a learner's state (optimizer moments, scores) is old replica r's (old
   replica 0's for a new rank). Counters go to the new replica 0, so they still add up.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import msgspec
import numpy as np

from streamlearn.checkpoints.catalog import open_store, problem_with
from streamlearn.checkpoints.content import Content, unpack
from streamlearn.checkpoints.store import SnapshotStore
from streamlearn.cluster.epochs import EpochState
from streamlearn.config import Config, ConfigError
from streamlearn.records import IntakeStats
from streamlearn.stream.closed_ids import ClosedIdsState
from streamlearn.stream.intake import IntakeState
from streamlearn.stream.join import JoinerState
from streamlearn.stream.merge import merged_stats
from streamlearn.stream.source import partition_number

log = logging.getLogger(__name__)


class Candidate(msgspec.Struct, array_like=True):
    """One snapshot a replica could restore: which count of replicas wrote it, at which epoch, which rank."""

    replicas: int
    epoch: int
    rank: int
    folder: int
    seq: int


class RestorePoint(msgspec.Struct):
    """What a replica restores: the content of a snapshot (its own, or one made of the old replicas'), its offsets."""

    content: Content
    offsets: dict[str, int]
    seq: Optional[int]         # its own snapshot's number (None: made by rescaling)
    epoch: EpochState


def restore_point(config: Config, group, rank: int, fingerprint: str) -> Optional[RestorePoint]:
    """The state this replica starts from (None: from scratch), agreed with every other replica."""
    stores = _visible_stores(config, rank)
    mine = [c for folder, store in stores.items() if folder % group.size == rank
            for c in _candidates(store, folder, fingerprint)]   # 1.
    everyone = [c for payload in group.gather(msgspec.msgpack.encode(mine))
                for c in msgspec.msgpack.decode(payload, type=list[Candidate])]   # 2.
    chosen = newest_complete(everyone, group.size)
    if chosen is None:
        if everyone:
            log.warning("no epoch that every replica has a snapshot of: starting from scratch")
        return None
    replicas, epoch = chosen
    picks = {}
    for c in sorted(everyone, key=lambda c: c.seq):   # the newest of a rank's snapshots of that epoch
        if (c.replicas, c.epoch) == chosen:
            picks[c.rank] = c
    if replicas == group.size:   # 3. as it was
        own = picks[rank]
        snapshot = stores[own.folder].load(own.seq)
        content = unpack(snapshot)
        state = msgspec.msgpack.decode(content.epoch, type=EpochState)
        log.info("epoch %d: snapshot %d of replica %d", epoch, own.seq, rank)
        return RestorePoint(content, dict(snapshot.manifest.offsets), own.seq, state)
    missing = [r for r in range(replicas) if picks[r].folder not in stores]
    if missing:
        raise ConfigError(f"config error: cluster.snapshot_dir: rescaling from {replicas} replicas to {group.size} "
                          f"reads every old replica's snapshots; replica {rank} cannot see those of replica(s) "
                          f"{missing} (set cluster.snapshot_dir to a folder every replica shares)")
    olds = [stores[picks[r].folder].load(picks[r].seq) for r in range(replicas)]
    log.info("epoch %d: %d replicas' snapshots divided for %d replicas", epoch, replicas, group.size)
    audit = Path(config.snapshot.audit_log) if config.snapshot.audit_log else None
    return rescaled([unpack(s) for s in olds], [s.manifest.offsets for s in olds], group.size, rank,
                    audit.stat().st_size if audit is not None and audit.exists() else 0)


def newest_complete(candidates: list[Candidate], replicas: int) -> Optional[tuple[int, int]]:
    """(replicas, epoch) of the newest epoch that every rank of its count has a snapshot of (ties: this count's).

    >>> newest_complete([Candidate(2, 5, 0, 0, 9), Candidate(2, 5, 1, 1, 8), Candidate(2, 6, 0, 0, 10)], 2)
    (2, 5)
    """
    ranks: dict[tuple[int, int], set[int]] = {}
    for c in candidates:
        ranks.setdefault((c.replicas, c.epoch), set()).add(c.rank)
    complete = [key for key, found in ranks.items() if found >= set(range(key[0]))]
    return max(complete, key=lambda key: (key[1], key[0] == replicas), default=None)


def _visible_stores(config: Config, rank: int) -> dict[int, SnapshotStore]:
    """Folder rank -> store: every `replica-<r>` of a shared `snapshot_dir`, or this replica's own store."""
    if not config.cluster.snapshot_dir:
        return {rank: open_store(config)}
    folders = {rank}
    for path in Path(config.cluster.snapshot_dir).glob("replica-*"):
        if re.fullmatch(r"replica-\d+", path.name):
            folders.add(int(path.name.split("-")[1]))
    return {f: open_store(config, f) for f in sorted(folders)}


def _candidates(store: SnapshotStore, folder: int, fingerprint: str) -> list[Candidate]:
    """The epoch snapshots of one folder that verify (every file's checksum) and fit this config."""
    found = []
    for seq, snapshot in store.newest_valid():
        problem = problem_with(snapshot, fingerprint)
        meta = getattr(getattr(snapshot, "manifest", None), "meta", {})
        if problem is None and "epoch" in meta:
            found.append(Candidate(int(meta["replicas"]), int(meta["epoch"]), int(meta["rank"]), folder, seq))
        elif problem is not None:
            log.warning("replica folder %d, snapshot %d skipped: %s", folder, seq, problem)
    return found


def rescaled(olds: list[Content], offsets: list[dict[str, int]], replicas: int, rank: int,
             audit_size: int = 0) -> RestorePoint:
    """Replica `rank` of `replicas`' share of the old replicas' snapshots of one epoch (see the module's 3.).

    A new rank keeps its audit log as it is (`audit_size`: what an earlier life of this rank learned, when the
    cluster stopped cleanly; an old rank's is cut back to its snapshot)."""
    def owned(partition: int) -> bool:   # a partition number of -1 (before tags were kept) goes to replica 0
        return (partition % replicas if partition >= 0 else 0) == rank

    epochs = [msgspec.msgpack.decode(c.epoch, type=EpochState) for c in olds]
    try:
        intakes = [msgspec.msgpack.decode(c.intake_state, type=IntakeState) for c in olds]
    except msgspec.ValidationError:
        raise ConfigError("config error: intake.processes: snapshots taken with several intake processes per "
                          "replica cannot be divided for another number of replicas") from None
    base = olds[rank] if rank < len(olds) else olds[0]
    fresh = rank >= len(olds)
    figures = msgspec.structs.replace(base.figures, audit_length=audit_size if fresh else base.figures.audit_length)
    held = sorted((e for s in epochs for e in s.held if owned(e.partition)), key=lambda e: (e.ts, e.id))
    boundaries = [s.boundary for s in epochs if s.boundary is not None]
    state = EpochState(max(s.epoch for s in epochs) + 1, replicas, rank, max(boundaries, default=None), held)
    intake = _divided_intake(intakes, owned, counters=rank == 0)
    deploy = olds[0].deploy if rank == 0 else None   # rank 0 publishes: its candidates and gate go on
    content = Content(base.learners, msgspec.msgpack.encode(intake), figures, deploy, msgspec.msgpack.encode(state))
    mine = {key: n for o in offsets for key, n in o.items() if owned(partition_number(key))}
    return RestorePoint(content, mine, None, state)


def _divided_intake(states: list[IntakeState], owned, counters: bool) -> IntakeState:
    """One intake state of the old ones' entries from owned partitions (closed ids: all of them; counters: summed
    into replica 0's, so that the replicas' counters still add up)."""
    joiners = [s.joiner for s in states]
    joiner = JoinerState(
        logs=[e for j in joiners for e in j.logs if owned(e.partition)],
        early=[e for j in joiners for e in j.early if owned(e.partition)],
        closed=[c for j in joiners for c in j.closed],   # an id is only looked up where its partition is read
        ready=[e for j in joiners for e in j.ready if owned(e.partition)],
        outcomes=_summed([j.outcomes for j in joiners]) if counters else {},
        overflow=[e for j in joiners for e in j.overflow if owned(e.partition)],
        closed_hashed=_merged_closed([j.closed_hashed for j in joiners if j.closed_hashed is not None]))
    stats = merged_stats([s.stats for s in states], 0) if counters else IntakeStats()
    ends: dict[str, int] = {}
    for s in states:
        for key, end in s.dead_letter_ends.items():
            ends[key] = max(end, ends.get(key, end))
    return IntakeState(joiner, {key: ts for s in states for key, ts in s.newest.items()
                                if owned(partition_number(key))},
                       min(s.floor for s in states), stats, ends)


def _summed(parts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def _merged_closed(parts: list[ClosedIdsState]) -> Optional[ClosedIdsState]:
    """The hashed closed ids of several joiners as one sorted set of arrays."""
    if not parts:
        return None
    keys = np.concatenate([np.frombuffer(p.keys, np.uint64) for p in parts])
    at = np.concatenate([np.frombuffer(p.at, np.float64) for p in parts])
    matched = np.concatenate([np.frombuffer(p.matched, np.bool_) for p in parts])
    order = np.argsort(keys, kind="stable")
    return ClosedIdsState([], keys[order].tobytes(), at[order].tobytes(), matched[order].tobytes())
