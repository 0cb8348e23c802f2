"""History lines grouped per model into the lines the figures draw.

Each line keeps only the points whose record has a finite value, so a metric
that appears late (probe segments, forgetting) starts where it starts instead
of being drawn as a drop to zero. The rolling score is drawn from the frequent
score samples where the history has them, else from the evaluation records.

>>> from streamlearn.telemetry.history import HistoryRecord, ScoreSample
>>> records = [HistoryRecord(model="m", time=t, position=100 * t, learned=99 * t, scores={"accuracy": 0.5 + t / 10},
...                          probe_accuracy={0: 0.9 - t / 10} if t > 1 else {}) for t in (1, 2, 3)]
>>> [m] = by_model(records)
>>> m.rolling["accuracy"].x.tolist(), m.probes[0].y.round(2).tolist()
([100, 200, 300], [0.7, 0.6])
>>> [m] = by_model(records, [ScoreSample("m", 50 * t, t / 2, {"accuracy": 0.6}) for t in range(1, 7)])
>>> m.rolling["accuracy"].x.tolist(), m.sampled
([50, 100, 150, 200, 250, 300], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterable, Optional

import numpy as np

from streamlearn.learners.drift import DriftMark
from streamlearn.learners.plasticity import PolicyAction
from streamlearn.telemetry.history import HistoryRecord, ScoreSample


@dataclass(frozen=True)
class Curve:
    """One line: stream positions and the value at each."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class ModelSeries:
    """Everything one model's records say, as lines over its stream position."""

    model: str
    rolling: dict[str, Curve]        # metric -> rolling prequential score (from the score samples, if any)
    cumulative: dict[str, Curve]     # metric -> cumulative prequential score
    probes: dict[int, Curve]         # segment number -> probe accuracy
    forgetting: Curve
    backward_transfer: Curve
    latency: dict[str, Curve]        # "loop_p99" etc. -> seconds
    drifts: list[DriftMark]
    actions: list[PolicyAction]      # the drift policy's actions
    last: Optional[HistoryRecord]    # the newest record (final figures when there is no summary); None: samples only
    last_sample: Optional[ScoreSample]
    superseded: int                  # lines dropped as left over from before a rollback
    sampled: bool = False            # the rolling curves come from score samples

    @property
    def has_probes(self) -> bool:
        return bool(self.probes) or len(self.forgetting) > 0 or len(self.backward_transfer) > 0


def by_model(records: Iterable[HistoryRecord], samples: Iterable[ScoreSample] = ()) -> list[ModelSeries]:
    """One `ModelSeries` per model (with records, samples or both), in model-name order."""
    grouped = _grouped(records)
    sampled = _grouped(samples)
    return [_series(model, grouped.get(model, []), sampled.get(model, []))
            for model in sorted(set(grouped) | set(sampled))]


def _grouped(lines: Iterable) -> dict[str, list]:
    """Lines per model, each model's in position order."""
    ordered = sorted(lines, key=lambda r: (r.model, r.position))
    return {model: list(group) for model, group in groupby(ordered, key=lambda r: r.model)}


def current_run(records: list) -> list:
    """The records of one model's current line of runs, dropping those written before a rollback.

    After a resume from an older snapshot (`run --from-snapshot`) the new run
    rewrites positions from there on, but the old run's records beyond the
    point where the new run stopped stay in the file. They are recognisable by
    time: a record older than a record at a lower position was superseded.

    The same holds for score samples.

    >>> from streamlearn.telemetry.history import HistoryRecord
    >>> old = [HistoryRecord(model="m", time=t, position=t, learned=t) for t in (1, 2, 3, 4)]
    >>> new = [HistoryRecord(model="m", time=t + 10, position=t, learned=t) for t in (3,)]
    >>> [(r.position, r.time) for r in current_run(old[:2] + new + old[3:])]
    [(1, 1), (2, 2), (3, 13)]
    """
    kept, newest = [], float("-inf")
    for record in records:   # by position
        if record.time >= newest:
            kept.append(record)
            newest = record.time
    return kept


def _series(model: str, records: list[HistoryRecord], samples: list[ScoreSample]) -> ModelSeries:
    run, sampled = current_run(records), current_run(samples)
    rolling = sampled if len(sampled) >= len(run) and sampled else run   # the denser of the two
    return ModelSeries(
        model=model,
        rolling={m: _curve(rolling, lambda r, m=m: r.scores.get(m)) for m in _keys(r.scores for r in rolling)},
        cumulative={m: _curve(run, lambda r, m=m: r.scores_all.get(m)) for m in _keys(r.scores_all for r in run)},
        probes={s: _curve(run, lambda r, s=s: r.probe_accuracy.get(s))
                for s in sorted(_keys(r.probe_accuracy for r in run))},
        forgetting=_curve(run, lambda r: r.forgetting),
        backward_transfer=_curve(run, lambda r: r.backward_transfer),
        latency={k: _curve(run, lambda r, k=k: r.latency.get(k)) for k in _keys(r.latency for r in run)},
        drifts=[mark for r in run for mark in r.drifts],
        actions=[action for r in run for action in r.actions],
        last=run[-1] if run else None,
        last_sample=sampled[-1] if sampled else None,
        superseded=len(records) - len(run) + len(samples) - len(sampled),
        sampled=rolling is sampled,
    )


def _keys(mappings: Iterable[dict]) -> list:
    """The keys of all mappings, in order of first appearance (so colours stay put as keys come and go)."""
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


def _curve(records: list, value: Callable[[HistoryRecord], Optional[float]]) -> Curve:
    points = [(r.position, v) for r in records if (v := value(r)) is not None and np.isfinite(v)]
    x, y = zip(*points) if points else ((), ())
    return Curve(np.asarray(x, dtype=np.int64), np.asarray(y, dtype=float))
