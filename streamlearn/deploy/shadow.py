"""Shadow scoring: while a candidate waits for the gate, production and candidate score every new example.

Each newly joined example of the model is scored by both, before the learner
learns it (prequential: neither version has seen it). The running totals are
the gate's `shadow` comparison, and they are part of the snapshot, so a restart
goes on counting where the snapshot was taken.

>>> tally = ShadowTally(candidate=3, production=2)
>>> tally.add([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
>>> tally.comparison()
Comparison(candidate=0.666667, production=0.333333, examples=3)
"""

from __future__ import annotations

from typing import Optional

import msgspec

from streamlearn.deploy.gate import points
from streamlearn.deploy.model_files import Deployed
from streamlearn.deploy.records import Comparison
from streamlearn.records import Example


class ShadowTally(msgspec.Struct):
    """Side-by-side totals for one waiting candidate (against the production version named here)."""

    candidate: int                  # the waiting candidate's version
    production: Optional[int]       # the production version it is compared with (None: none yet)
    examples: int = 0
    candidate_points: float = 0.0
    production_points: float = 0.0

    def add(self, candidate: list[float], production: Optional[list[float]]) -> None:
        self.examples += len(candidate)
        self.candidate_points += sum(candidate)
        if production is not None:
            self.production_points += sum(production)

    def comparison(self) -> Optional[Comparison]:
        if not self.examples:
            return None
        theirs = round(self.production_points / self.examples, 6) if self.production is not None else None
        return Comparison(round(self.candidate_points / self.examples, 6), theirs, self.examples)


class Shadow:
    """A waiting candidate and the production version, scoring new examples side by side."""

    def __init__(self, candidate: Deployed, production: Optional[Deployed],
                 tally: Optional[ShadowTally] = None) -> None:
        self.candidate = candidate
        self.production = production
        self.tally = tally or ShadowTally(candidate.version, production.version if production is not None else None)

    def observe(self, examples: list[Example]) -> None:
        if examples:
            theirs = points(self.production, examples) if self.production is not None else None
            self.tally.add(points(self.candidate, examples), theirs)
