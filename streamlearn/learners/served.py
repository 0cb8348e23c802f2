"""Scores by serving version: how the predictions each `model_version` made fared once their labels came.

The inference log says which version predicted and what (`prediction`, or the
class of highest `proba`); the joined example carries both to the learner side,
where each labeled example is attributed to its version: counted, and scored
(accuracy; MAE for regression) when the prediction was logged. Only the most
recently seen `eval.served_versions` versions are kept, so the `model_version`
label of `prequential_score` stays bounded. The tallies are in the snapshot.

>>> from streamlearn.records import Example
>>> served = ServedScores("classification", keep=2)
>>> served.observe([Example(f"r-{i}", "m", {}, i % 2, 1.0, i, i, 0.0, "7", 1) for i in range(4)])
>>> [(s.version, s.metric, s.value) for s in served.series()]
[('7', 'accuracy', 0.5)]
"""

from __future__ import annotations

from typing import Iterator, Optional

import msgspec

from streamlearn.records import Example


class VersionTally(msgspec.Struct, array_like=True):
    """One serving version's examples and the sum of its prediction scores."""

    version: str
    examples: int = 0      # labeled examples whose prediction this version made
    scored: int = 0        # those whose prediction was logged
    points: float = 0.0    # right predictions (classification) or summed absolute errors (regression)
    seen: int = 0          # when it was last seen (a count of observed batches), to keep the most recent


class VersionScore(msgspec.Struct):
    version: str
    metric: str
    value: float


class ServedScores:
    """One model's tallies of the most recently seen serving versions."""

    def __init__(self, task: str, keep: int, tallies: Optional[list[VersionTally]] = None) -> None:
        self.regression = task == "regression"
        self.keep = keep
        self.tallies: dict[str, VersionTally] = {t.version: t for t in tallies or ()}
        self._clock = max((t.seen for t in self.tallies.values()), default=0)

    def observe(self, examples: list[Example]) -> None:
        """Attributes each example that has a `model_version` to that version."""
        self._clock += 1
        regression, version, tally = self.regression, None, None
        for ex in examples:
            if ex.model_version != version:   # versions come in runs: look the tally up once per run
                version = ex.model_version
                tally = self._tally(version) if version else None
            if tally is None:
                continue
            tally.examples += 1
            served = ex.served
            if served is None or (regression and not _is_number(served)):
                continue
            tally.scored += 1
            if regression:
                tally.points += abs(float(served) - float(ex.label))
            elif served == ex.label or _same(served, ex.label):
                tally.points += 1.0

    def _tally(self, version: str) -> VersionTally:
        """The version's tally, marked as seen now; a new one evicts the least recently seen beyond `keep`."""
        tally = self.tallies.get(version)
        if tally is None:
            tally = self.tallies[version] = VersionTally(version, seen=self._clock)   # not the one evicted
            if len(self.tallies) > self.keep:
                del self.tallies[min(self.tallies.values(), key=lambda t: t.seen).version]
        tally.seen = self._clock
        return tally

    def series(self) -> Iterator[VersionScore]:
        """Each kept version's score (accuracy, or MAE for regression), for versions with scored examples."""
        metric = "mae" if self.regression else "accuracy"
        for tally in sorted(self.tallies.values(), key=lambda t: t.version):
            if tally.scored:
                yield VersionScore(tally.version, metric, tally.points / tally.scored)

    def summary(self) -> dict[str, dict]:
        """version -> examples attributed and the score, for the run summary."""
        scores = {s.version: s.value for s in self.series()}
        return {v: {"examples": t.examples, "score": scores.get(v)} for v, t in sorted(self.tallies.items())}

    def state(self) -> list[VersionTally]:
        return list(self.tallies.values())


def _same(served, label) -> bool:
    """Logged predictions and labels may differ in type: "1" from a proba key, 1.0 as the label; "true", True.

    >>> _same("1", 1.0), _same("true", True), _same("fraud", "Fraud"), _same("0", 1.0)
    (True, True, True, False)
    """
    if served == label:
        return True
    try:
        return float(served) == float(label)
    except (TypeError, ValueError):
        return str(served).lower() == str(label).lower()


def _is_number(value) -> bool:
    return type(value) in (int, float)
