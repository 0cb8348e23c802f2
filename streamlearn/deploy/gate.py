"""The evaluation gate: a candidate replaces production only if it is not worse.

The candidate and the production version are scored on the same data: (a) the
most recent held-out examples, (b) the probe sets of older segments (the live
forgetting probes: mean accuracy over segments), and (c) what shadow scoring saw
while the candidate waited. Scores are accuracies, or minus the MAE for
regression, so higher is better everywhere. The candidate is promoted when, on
every set it has examples for, it meets the configured minimum and scores at
least production's score minus `gate.regression_tolerance`; otherwise it is
rejected, and the reasons say which set failed and by how much.

>>> from streamlearn.config import GateConfig
>>> gate = Gate(GateConfig(regression_tolerance=0.02, min_recent_score=0.7))
>>> gate.decide(GateScores(recent=Comparison(0.90, 0.91, 100), historical=Comparison(0.80, 0.95, 300))).reasons
['historical: 0.8000 is more than 0.02 below production (0.9500)']
>>> gate.decide(GateScores(recent=Comparison(0.92, None, 100))).promote
True
"""

from __future__ import annotations

from typing import Optional

import msgspec

from streamlearn.config import GateConfig
from streamlearn.deploy.model_files import Deployed
from streamlearn.deploy.records import SETS, Comparison, GateScores
from streamlearn.records import Example



class Decision(msgspec.Struct):
    promote: bool
    scores: GateScores
    reasons: list[str]     # rejected: what failed; promoted: what it passed


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

    def decide(self, scores: GateScores) -> Decision:
        reasons, passed = [], []
        tolerance = self.config.regression_tolerance
        for name in SETS:
            found: Optional[Comparison] = getattr(scores, name)
            minimum = getattr(self.config, f"min_{name}_score")
            if found is None:
                if minimum is not None:
                    reasons.append(f"{name}: no examples to check the minimum {minimum} on")
                continue
            if minimum is not None and found.candidate < minimum:
                reasons.append(f"{name}: {found.candidate:.4f} is below the minimum {minimum}")
            if found.production is not None and found.candidate < found.production - tolerance:
                reasons.append(f"{name}: {found.candidate:.4f} is more than {tolerance} below production "
                               f"({found.production:.4f})")
            passed.append(f"{name} {found.candidate:.4f}" + (f" vs {found.production:.4f}"
                                                              if found.production is not None else ""))
        if reasons:
            return Decision(False, scores, reasons)
        return Decision(True, scores, ["passed: " + (", ".join(passed) or "nothing to compare")])
