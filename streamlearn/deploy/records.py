"""The typed records of the handoff to serving: versions, gate scores, the `model-updates` event.

A version of a model moves through `candidate → production | rejected` and
`production → retired` (and back to production on a rollback). Every record here
is a msgspec Struct: the registry stores the nested ones as JSON, the publisher
sends `ModelUpdate` as JSON.

>>> scores = GateScores(recent=Comparison(0.9, 0.8, 200))
>>> msgspec.json.decode(msgspec.json.encode(scores), type=GateScores).recent.delta
0.1
"""

from __future__ import annotations

from typing import Literal, Optional

import msgspec

Status = Literal["candidate", "production", "rejected", "retired"]
OUTCOMES = ("promoted", "rejected")   # gate decisions, the `outcome` label of gate_decisions_total
RULES = ("standard", "concept_change", "capabilities")   # which gate rule decided: the first reason reads "rule=<name>"


class Comparison(msgspec.Struct, omit_defaults=True):
    """One data set's score for the candidate and for production (None: no production to compare with)."""

    candidate: float
    production: Optional[float] = None
    examples: int = 0

    @property
    def delta(self) -> Optional[float]:
        """Candidate minus production, rounded for display; None without a production score."""
        return None if self.production is None else round(self.candidate - self.production, 6)


class GateScores(msgspec.Struct, omit_defaults=True):
    """What the gate measured; a set it had no examples for is None."""

    recent: Optional[Comparison] = None       # the most recent held-out examples
    historical: Optional[Comparison] = None   # mean over the probe sets of older segments
    shadow: Optional[Comparison] = None       # examples scored side by side while the candidate waited
    capabilities: dict[str, Comparison] = {}  # a language model: each capability set by name


SETS: tuple[str, ...] = ("recent", "historical", "shadow")   # the gate's data sets of examples


class StreamPosition(msgspec.Struct, omit_defaults=True):
    """Where in the stream a candidate was made: the model's examples so far and the last cut's offsets."""

    examples: int = 0
    offsets: dict[str, int] = {}
    ts: Optional[float] = None   # event time of the newest example of the model then (None: made before it was kept)


class VersionRecord(msgspec.Struct):
    """One version of one model, as the registry holds it."""

    model: str
    version: int
    status: Status
    created: float                      # unix seconds
    artifact: str                       # URL of the artifact folder
    manifest_sha256: str                # SHA-256 of the artifact's manifest (which lists every file's)
    checksums: dict[str, str] = {}      # file name -> SHA-256, as in the manifest
    parent: Optional[int] = None        # the production version when it was made
    snapshot_seq: Optional[int] = None  # the newest durable snapshot then (its state grew from it)
    position: StreamPosition = msgspec.field(default_factory=StreamPosition)
    scores: GateScores = msgspec.field(default_factory=GateScores)
    reasons: list[str] = []             # why the gate (or an operator) decided as it did; the gate's start "rule=..."
    decided: Optional[float] = None     # unix seconds of the last status change

    @property
    def rule(self) -> Optional[str]:
        """The gate rule that decided (one of RULES), or None (not decided by the gate, or before rules were named)."""
        first = self.reasons[0] if self.reasons else ""
        return first[5:].split(" ", 1)[0] if first.startswith("rule=") else None


class Change(msgspec.Struct):
    """One line of the registry's audit trail."""

    model: str
    version: int
    status: Status        # the status it took
    at: float
    actor: str            # "gate", "operator", "service"
    note: str = ""


class ModelUpdate(msgspec.Struct, omit_defaults=True):
    """The `model-updates` event: a model's production version changed; serving may load it."""

    model: str
    version: int
    action: Literal["promote", "rollback"]
    artifact: str                       # URL of the artifact folder
    manifest_sha256: str
    checksums: dict[str, str]           # file name -> SHA-256, as in the manifest
    scores: GateScores
    ts: float
    previous: Optional[int] = None      # the production version it replaced
