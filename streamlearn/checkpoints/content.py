"""What goes into a snapshot, file by file, and back out of it.

`learners.pkl` holds every model's `LearnerSnapshot` state: its kind and the
bytes the learner pickled (River models are plain Python objects; loaded only
after the store verified the checksums and, when keyed, the HMAC); a snapshot
written before `LearnerSnapshot` holds each learner's state dict there, and still
restores. `tensors.safetensors` holds the snapshots' arrays (torch weights,
optimizer moments, EWC state, replay buffers) without pickle, keyed `<model>/<name>`.
`intake.msgpack` is the intake's own state as its barrier carried it (pending joins, watermarks, offsets, counters).
`service.json` holds the learner side's small figures (and the scores by serving
version). `deploy.msgpack`, only with publishing on, is the handoff's own state as it
gave it (held-out examples, the publish trigger, a waiting candidate's shadow totals).
`epoch.msgpack`, only for a replica of a cluster, is its place among the epochs (`cluster.epochs.EpochState`).
"""

from __future__ import annotations

import pickle
from typing import Optional

import msgspec
import numpy as np
import safetensors.numpy

from streamlearn.checkpoints.store import Snapshot
from streamlearn.learners.contract import LearnerSnapshot, frozen_arrays, snapshot_of
from streamlearn.learners.served import VersionTally
from streamlearn.triggers import TriggerState

LEARNERS = "learners.pkl"
INTAKE = "intake.msgpack"
SERVICE = "service.json"
TENSORS = "tensors.safetensors"
DEPLOY = "deploy.msgpack"
EPOCH = "epoch.msgpack"


class ServiceFigures(msgspec.Struct):
    learned: int
    learning_seconds: float
    audit_length: int = 0   # bytes of the audit log that belong to this state
    snapshot_trigger: TriggerState = msgspec.field(default_factory=TriggerState)   # its firings up to this one
    served: dict[str, list[VersionTally]] = {}   # model -> scores of its serving versions


class Content(msgspec.Struct):
    learners: dict[str, LearnerSnapshot]
    intake_state: bytes
    figures: ServiceFigures
    deploy: Optional[bytes] = None
    epoch: Optional[bytes] = None


def pack(learners: dict[str, LearnerSnapshot], intake_state: bytes, figures: ServiceFigures,
         deploy: Optional[bytes] = None, epoch: Optional[bytes] = None) -> dict[str, bytes]:
    """The snapshot's files from the learners' snapshots and the other stages' states."""
    states = {name: {"kind": s.kind, "state": s.state} for name, s in learners.items()}   # bytes: no second walk
    files = {LEARNERS: pickle.dumps(states, protocol=pickle.HIGHEST_PROTOCOL),
             INTAKE: intake_state, SERVICE: msgspec.json.encode(figures)}
    if deploy is not None:
        files[DEPLOY] = deploy
    if epoch is not None:
        files[EPOCH] = epoch
    flat = {f"{model}/{key}": np.ascontiguousarray(array) for model, s in learners.items()
            for key, array in s.tensors.items()}
    if flat:
        files[TENSORS] = safetensors.numpy.save(flat)
    return files


def unpack(snapshot: Snapshot) -> Content:
    """Only for a snapshot the store has verified: this unpickles."""
    files = snapshot.files
    tensors: dict[str, dict[str, np.ndarray]] = {}
    if TENSORS in files:
        for name, array in safetensors.numpy.load(files[TENSORS]).items():
            model, _, key = name.partition("/")
            tensors.setdefault(model, {})[key] = array
    learners = {name: _learner_snapshot(entry, tensors.get(name, {}))
                for name, entry in pickle.loads(files[LEARNERS]).items()}
    return Content(learners, files[INTAKE], msgspec.json.decode(files[SERVICE], type=ServiceFigures),
                   files.get(DEPLOY), files.get(EPOCH))


def _learner_snapshot(entry: dict, tensors: dict[str, np.ndarray]) -> LearnerSnapshot:
    """One `learners.pkl` entry as a `LearnerSnapshot`: this version's (kind and pickled state) or an older
    version's (the state dict itself, pickled again here: restores are rare, and it keeps them working)."""
    if isinstance(entry.get("state"), bytes):
        return LearnerSnapshot(entry["kind"], entry["state"], frozen_arrays(tensors))
    return snapshot_of("", entry, tensors)
