"""What goes into a snapshot, file by file, and back out of it.

`learners.pkl` holds every model with its scores and counters (pickle: River
models are plain Python objects; loaded only after the store verified the
checksums and, when keyed, the HMAC). `intake.msgpack` is the intake's own state
as its barrier carried it (pending joins, watermarks, positions, counters).
`service.json` holds the learner side's small figures.
"""

from __future__ import annotations

import pickle

import msgspec

from streamlearn.checkpoints.store import Snapshot

LEARNERS = "learners.pkl"
INTAKE = "intake.msgpack"
SERVICE = "service.json"


class ServiceFigures(msgspec.Struct):
    learned: int
    learning_seconds: float
    audit_length: int = 0   # bytes of the audit log that belong to this state


class Content(msgspec.Struct):
    learners: dict[str, dict]
    intake_state: bytes
    figures: ServiceFigures


def pack(learners: dict[str, dict], intake_state: bytes, figures: ServiceFigures) -> dict[str, bytes]:
    return {LEARNERS: pickle.dumps(learners, protocol=pickle.HIGHEST_PROTOCOL),
            INTAKE: intake_state, SERVICE: msgspec.json.encode(figures)}


def unpack(snapshot: Snapshot) -> Content:
    """Only for a snapshot the store has verified: this unpickles."""
    files = snapshot.files
    return Content(pickle.loads(files[LEARNERS]), files[INTAKE],
                   msgspec.json.decode(files[SERVICE], type=ServiceFigures))
