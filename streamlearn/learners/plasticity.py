"""What a model's drift policy decides, as records: a confirmed concept change and each action taken.

A drift detection opens a case; the policy (`DriftPolicy`, next to these records)
classifies it from the stream as a real concept change (familiar inputs now carry
other labels, persistently), new classes or a shifted input distribution (old
labels still true), or a burst of wrong labels that ended, and acts on each. The
probes, the gate, the history and the report read these records; they never
look inside the policy.

>>> change = ConceptChange(position=6000, ts=1_700_006_000.0, confirmed_position=6400,
...                        confirmed_ts=1_700_006_400.0, detector="adwin")
>>> PolicyAction(6400, 1_700_006_400.0, "change", "release_ewc").kind
'change'
"""

from __future__ import annotations

import msgspec

KINDS = ("change", "new_classes", "burst")   # how a drift case ended (a bounded label)


class ConceptChange(msgspec.Struct, frozen=True):
    """A confirmed real concept change of one model: what came before it belongs to the old concept."""

    position: int              # examples scored by the model at the detection that opened the case
    ts: float                  # event time of that detection: rows and probes older than this are the old concept
    confirmed_position: int    # examples scored when the policy confirmed it
    confirmed_ts: float        # event time of the confirmation
    detector: str              # the detector that opened the case


class PolicyAction(msgspec.Struct, frozen=True):
    """One thing a model's drift policy did (history, report, drift_actions_total{model,kind,action})."""

    position: int    # examples scored by the model when it acted
    ts: float        # event time when it acted
    kind: str        # one of KINDS
    action: str      # a bounded name: "release_ewc", "expire_replay", "reset_optimizer", "raise_lr", "consolidate", ...


def __getattr__(name: str):
    """`DriftPolicy` lives in drift_policy.py (which imports these records); it is re-exported here lazily."""
    if name == "DriftPolicy":
        from streamlearn.learners.drift_policy import DriftPolicy

        return DriftPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
