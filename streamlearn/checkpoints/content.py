"""What goes into a snapshot, file by file, and back out of it.

`learners.pkl` holds every model with its scores and counters (pickle: River
models are plain Python objects; loaded only after the store verified the
checksums and, when keyed, the HMAC). `tensors.safetensors` holds the arrays of
torch learners (weights, optimizer moments, EWC state, replay buffers) without
pickle, keyed `<model>/<name>`. `intake.msgpack` is the intake's own state
as its barrier carried it (pending joins, watermarks, positions, counters).
`service.json` holds the learner side's small figures.
"""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import safetensors.numpy

from streamlearn.checkpoints.store import Snapshot

LEARNERS = "learners.pkl"
INTAKE = "intake.msgpack"
SERVICE = "service.json"
TENSORS = "tensors.safetensors"


class ServiceFigures(msgspec.Struct):
    learned: int
    learning_seconds: float
    audit_length: int = 0   # bytes of the audit log that belong to this state
    snapshot_triggers: dict[str, int] = {}   # reason -> snapshots it fired, up to this one


class Content(msgspec.Struct):
    learners: dict[str, dict]
    tensors: dict[str, dict[str, np.ndarray]]
    intake_state: bytes
    figures: ServiceFigures


def pack(learners: dict[str, dict], tensors: dict[str, dict[str, np.ndarray]], intake_state: bytes,
         figures: ServiceFigures) -> dict[str, bytes]:
    files = {LEARNERS: pickle.dumps(learners, protocol=pickle.HIGHEST_PROTOCOL),
             INTAKE: intake_state, SERVICE: msgspec.json.encode(figures)}
    flat = {f"{model}/{key}": np.ascontiguousarray(array) for model, arrays in tensors.items()
            for key, array in arrays.items()}
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
    return Content(pickle.loads(files[LEARNERS]), tensors, files[INTAKE],
                   msgspec.json.decode(files[SERVICE], type=ServiceFigures))
