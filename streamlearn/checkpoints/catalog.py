"""Which snapshots a service has, and whether each one can be resumed from.

Operators see the same verdicts the service acts on at start: a snapshot is
usable when it verifies (manifest, every file's size and SHA-256, the HMAC when
`STREAMLEARN_SNAPSHOT_KEY` is set) and was written under this config's
fingerprint.

>>> import tempfile
>>> from streamlearn.checkpoints.store import SnapshotStore
>>> store = SnapshotStore(tempfile.mkdtemp())
>>> _ = store.write({"a": b"1"}, offsets={"feedback:0": 3}, fingerprint="f1", meta={"learned": 3.0})
>>> _ = store.write({"a": b"2"}, offsets={"feedback:0": 5}, fingerprint="f2")
>>> [(row.seq, row.problem) for row in catalog(store, fingerprint="f1")]
[(2, 'written under another config (models, join or source changed)'), (1, None)]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import msgspec

from streamlearn.checkpoints.store import Manifest, Snapshot, SnapshotError, SnapshotStore
from streamlearn.config import Config, replica_rank

KEY_ENV = "STREAMLEARN_SNAPSHOT_KEY"
REPLICA_FOLDER = "replica-{rank}"   # replica r's snapshots in a shared `cluster.snapshot_dir`


class SnapshotInfo(msgspec.Struct):
    seq: int
    manifest: Optional[Manifest]   # None when the manifest itself is missing or unreadable
    problem: Optional[str]         # why it cannot be resumed from; None when usable

    @property
    def size(self) -> int:
        return sum(f.size for f in self.manifest.files) if self.manifest is not None else 0


def signing_key() -> Optional[bytes]:
    """The HMAC key of snapshots and version artifacts, from `STREAMLEARN_SNAPSHOT_KEY` (None when unset)."""
    return os.environ.get(KEY_ENV, "").encode() or None


def open_store(config: Config, folder: Optional[int] = None) -> SnapshotStore:
    """This service's store, keyed from the environment when a key is set: `state_dir/snapshots`, or for replicas
    sharing `cluster.snapshot_dir`, its `replica-<rank>` folder (`folder`: another replica's)."""
    if config.cluster.snapshot_dir:
        rank = replica_rank(config) if folder is None else folder
        root = Path(config.cluster.snapshot_dir) / REPLICA_FOLDER.format(rank=rank)
    else:
        root = Path(config.state_dir) / "snapshots"
    return SnapshotStore(root, config.snapshot.keep, signing_key())


def problem_with(found: Snapshot | SnapshotError, fingerprint: str) -> Optional[str]:
    """Why a snapshot cannot be resumed from under this config, or None."""
    if isinstance(found, SnapshotError):
        return str(found)
    if found.manifest.fingerprint != fingerprint:
        return "written under another config (models, join or source changed)"
    return None


def catalog(store: SnapshotStore, fingerprint: str, only: Optional[int] = None) -> list[SnapshotInfo]:
    """Every snapshot (or just `only`), newest first, each fully verified."""
    rows = []
    for seq, found in store.newest_valid(at_most=only):
        if only is not None and seq != only:
            break
        manifest = found.manifest if isinstance(found, Snapshot) else store.manifest(seq)
        rows.append(SnapshotInfo(seq, manifest, problem_with(found, fingerprint)))
    return rows
