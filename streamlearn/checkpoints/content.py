"""What goes into a snapshot, file by file, and back out of it.

`learners.pkl` holds every model with its scores and counters (pickle: River
models are plain Python objects; loaded only after the store verified the
checksums and, when keyed, the HMAC). `tensors.safetensors` holds the arrays of
torch learners (weights, optimizer moments, EWC state, replay buffers) without
pickle, keyed `<model>/<name>`. `intake.msgpack` is the intake's own state
as its barrier carried it (pending joins, watermarks, positions, counters).
`service.json` holds the learner side's small figures (and the scores by serving
version). `deploy.msgpack`, only with publishing on, is the handoff's own state as it
gave it (held-out examples, the publish trigger, a waiting candidate's shadow totals).
"""

from __future__ import annotations

import pickle
from typing import Optional

import msgspec
import numpy as np
import safetensors.numpy

from streamlearn.checkpoints.store import Snapshot
from streamlearn.learners.served import VersionTally
from streamlearn.triggers import TriggerState

LEARNERS = "learners.pkl"
INTAKE = "intake.msgpack"
SERVICE = "service.json"
TENSORS = "tensors.safetensors"
DEPLOY = "deploy.msgpack"


class ServiceFigures(msgspec.Struct):
    learned: int
    learning_seconds: float
    audit_length: int = 0   # bytes of the audit log that belong to this state
    snapshot_trigger: TriggerState = msgspec.field(default_factory=TriggerState)   # its firings up to this one
    served: dict[str, list[VersionTally]] = {}   # model -> scores of its serving versions


class Content(msgspec.Struct):
    learners: dict[str, dict]
    tensors: dict[str, dict[str, np.ndarray]]
    intake_state: bytes
    figures: ServiceFigures
    deploy: Optional[bytes] = None


def pack(learners: dict[str, dict], tensors: dict[str, dict[str, np.ndarray]], intake_state: bytes,
         figures: ServiceFigures, deploy: Optional[bytes] = None) -> dict[str, bytes]:
    files = {LEARNERS: pickle.dumps(learners, protocol=pickle.HIGHEST_PROTOCOL),
             INTAKE: intake_state, SERVICE: msgspec.json.encode(figures)}
    if deploy is not None:
        files[DEPLOY] = deploy
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
                   msgspec.json.decode(files[SERVICE], type=ServiceFigures), files.get(DEPLOY))
