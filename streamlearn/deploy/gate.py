"""The evaluation gate: a candidate replaces production only if it is not worse, or, after a change, clearly better.

The candidate and the production version are scored on the same data: (a) the
most recent held-out examples, (b) the probe sets of older segments (the live
forgetting probes: mean accuracy over segments), and (c) what shadow scoring saw
while the candidate waited. Scores are accuracies, or minus the MAE for
regression, so higher is better everywhere. Two rules; the first reason names
the one that decided:

- `rule=standard`: on every set it has examples for, the candidate meets the
  configured minimum and scores at least production's score minus
  `gate.regression_tolerance`. History guards against forgetting and against a
  burst of wrong labels: a candidate that learned them scores below production
  on the probes of older segments.
- `rule=concept_change`: the drift policy confirmed a real concept change and
  the production version was made before it (`AfterChange`). Probes and held-out
  examples from before the change were set aside by the caller (they carry the
  old concept's labels); the candidate must have been made after the change and
  beat production on the recent and the shadow examples by `gate.change_margin`
  each (and meet the minimums); probes of segments since the change, if any,
  are checked as by the standard rule.

- `rule=capabilities` (a language model): on each of its capability sets
  (`models.NAME.lm.capabilities`), the candidate meets the set's `min_score` and
  scores at least production's score minus the set's `tolerance`; production is
  the base alone before any version was promoted.

Otherwise the candidate is rejected, and the reasons say which set failed and by how much.

>>> from streamlearn.config import CapabilityConfig, GateConfig
>>> gate = Gate(GateConfig(regression_tolerance=0.02, min_recent_score=0.7))
>>> gate.decide(GateScores(recent=Comparison(0.90, 0.91, 100), historical=Comparison(0.80, 0.95, 300))).reasons
['rule=standard', 'historical: 0.8000 is more than 0.02 below production (0.9500)']
>>> gate.decide(GateScores(recent=Comparison(0.92, None, 100))).promote
True
>>> change = ConceptChange(6000, 600.0, 7000, 700.0, "adwin")
>>> after = gate.decide(GateScores(recent=Comparison(0.95, 0.05, 60), shadow=Comparison(0.97, 0.02, 1000)),
...                     AfterChange(change, candidate_ts=710.0))
>>> after.promote, after.reasons[0]
(True, 'rule=concept_change (change detected at example 6000, confirmed at 7000)')
"""

from __future__ import annotations

from typing import Optional

import msgspec

from streamlearn.config import CapabilityConfig, GateConfig
from streamlearn.deploy.model_files import Deployed
from streamlearn.deploy.records import SETS, Comparison, GateScores
from streamlearn.learners.plasticity import ConceptChange
from streamlearn.learners.probes import change_start
from streamlearn.records import Example


class AfterChange(msgspec.Struct, frozen=True):
    """A confirmed concept change that the production version predates: the concept_change rule decides."""

    change: ConceptChange
    candidate_ts: Optional[float]   # event time of the newest example behind the candidate (None: unknown)


class Decision(msgspec.Struct):
    promote: bool
    scores: GateScores
    reasons: list[str]     # first "rule=<name> ...", then what failed (rejected) or what it passed (promoted)
    rule: str = "standard"


def points(model: Deployed, examples: list[Example]) -> list[float]:
    """Each example's score under `model`: 1.0 / 0.0 for a right / wrong class, minus the absolute error otherwise."""
    predicted = model.predict_many([ex.features for ex in examples])
    if model.task == "classification":
        return [1.0 if p == ex.label else 0.0 for p, ex in zip(predicted, examples)]
    return [-abs((p if p is not None else 0.0) - float(ex.label)) for p, ex in zip(predicted, examples)]


def compare(candidate: Deployed, production: Optional[Deployed], examples: list[Example]) -> Optional[Comparison]:
    """Both models' mean score on `examples` (None when there are none)."""
    if not examples:
        return None
    theirs = _mean(points(production, examples)) if production is not None else None
    return Comparison(_mean(points(candidate, examples)), theirs, len(examples))


def compare_segments(candidate: Deployed, production: Optional[Deployed],
                     segments: list[list[Example]]) -> Optional[Comparison]:
    """Mean over segments of each model's score on the segment's probes (each segment counts the same)."""
    scored = [c for c in (compare(candidate, production, probes) for probes in segments) if c is not None]
    if not scored:
        return None
    theirs = _mean([c.production for c in scored]) if production is not None else None
    return Comparison(_mean([c.candidate for c in scored]), theirs, sum(c.examples for c in scored))


def _mean(values: list[float]) -> float:
    """Rounded to 6 places: the registry and the events show scores, not float noise."""
    return round(sum(values) / len(values), 6)


class Gate:
    """Decides promote or reject from the scores, by the `[gate]` settings."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config

    def decide(self, scores: GateScores, after: Optional[AfterChange] = None) -> Decision:
        """Promote or reject: by the standard rule, or by the concept_change rule when `after` is given."""
        if after is None:
            reasons, passed = self._standard(scores, SETS)
            return _decision(scores, "standard", ["rule=standard"], reasons, passed)
        change = after.change
        head = (f"rule=concept_change (change detected at example {change.position}, confirmed at "
                f"{change.confirmed_position})")
        reasons, passed = self._beats(scores, after)
        more, also = self._standard(scores, ("historical",), required=False)
        return _decision(scores, "concept_change", [head], reasons + more, passed + also)

    def decide_capabilities(self, scores: GateScores, capabilities: list[CapabilityConfig]) -> Decision:
        """Promote or reject a language model's candidate by its capability sets (each with its own bounds)."""
        reasons, passed = [], []
        for capability in capabilities:
            found = scores.capabilities.get(capability.name)
            if found is None:
                reasons.append(f"{capability.name}: not scored")
                continue
            if capability.min_score is not None and found.candidate < capability.min_score:
                reasons.append(f"{capability.name}: {found.candidate:.4f} is below the minimum {capability.min_score}")
            elif found.production is not None and found.candidate < found.production - capability.tolerance:
                reasons.append(f"{capability.name}: {found.candidate:.4f} is more than {capability.tolerance} below "
                               f"production ({found.production:.4f})")
            else:
                passed.append(_passed(capability.name, found))
        return _decision(scores, "capabilities", ["rule=capabilities"], reasons, passed)

    def _standard(self, scores: GateScores, names: tuple[str, ...],
                  required: bool = True) -> tuple[list[str], list[str]]:
        """Minimum and tolerance checks on these sets: (what failed, what passed); `required`: a missing set fails
        its minimum."""
        reasons, passed = [], []
        tolerance = self.config.regression_tolerance
        for name in names:
            found: Optional[Comparison] = getattr(scores, name)
            minimum = getattr(self.config, f"min_{name}_score")
            if found is None:
                if minimum is not None and required:
                    reasons.append(f"{name}: no examples to check the minimum {minimum} on")
                continue
            if minimum is not None and found.candidate < minimum:
                reasons.append(f"{name}: {found.candidate:.4f} is below the minimum {minimum}")
            if found.production is not None and found.candidate < found.production - tolerance:
                reasons.append(f"{name}: {found.candidate:.4f} is more than {tolerance} below production "
                               f"({found.production:.4f})")
            passed.append(_passed(name, found))
        return reasons, passed

    def _beats(self, scores: GateScores, after: AfterChange) -> tuple[list[str], list[str]]:
        """The concept_change rule's own checks: made after the change, clearly better on recent and shadow."""
        reasons, passed = [], []
        start, margin = change_start(after.change), self.config.change_margin
        if after.candidate_ts is None or start is None or after.candidate_ts < start:
            made = ("at an unknown event time" if after.candidate_ts is None
                    else f"up to event time {after.candidate_ts}")
            reasons.append(f"candidate: made from examples {made}, not after the change (event time {start})")
        for name in ("recent", "shadow"):
            found: Optional[Comparison] = getattr(scores, name)
            minimum = getattr(self.config, f"min_{name}_score")
            if found is None:
                if name == "shadow" or self.config.holdout_every:   # no holdout configured: shadow alone decides
                    reasons.append(f"{name}: no examples since the change")
                continue
            if minimum is not None and found.candidate < minimum:
                reasons.append(f"{name}: {found.candidate:.4f} is below the minimum {minimum}")
            if found.production is not None and found.candidate < found.production + margin:
                reasons.append(f"{name}: {found.candidate:.4f} does not beat production ({found.production:.4f}) "
                               f"by the margin {margin}")
            passed.append(_passed(name, found))
        return reasons, passed


def _passed(name: str, found: Comparison) -> str:
    return f"{name} {found.candidate:.4f}" + (f" vs {found.production:.4f}" if found.production is not None else "")


def _decision(scores: GateScores, rule: str, head: list[str], reasons: list[str], passed: list[str]) -> Decision:
    if reasons:
        return Decision(False, scores, head + reasons, rule)
    return Decision(True, scores, head + ["passed: " + (", ".join(passed) or "nothing to compare")], rule)
