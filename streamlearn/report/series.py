"""History records grouped per model into the lines the figures draw.

Each line keeps only the points whose record has a finite value, so a metric
that appears late (probe segments, forgetting) starts where it starts instead
of being drawn as a drop to zero.

>>> from streamlearn.telemetry.history import DriftMark, HistoryRecord
>>> records = [HistoryRecord(model="m", time=t, position=100 * t, learned=99 * t, scores={"accuracy": 0.5 + t / 10},
...                          probe_accuracy={0: 0.9 - t / 10} if t > 1 else {}) for t in (1, 2, 3)]
>>> [m] = by_model(records)
>>> m.rolling["accuracy"].x.tolist(), m.probes[0].y.round(2).tolist()
([100, 200, 300], [0.7, 0.6])
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterable, Optional

import numpy as np

from streamlearn.telemetry.history import DriftMark, HistoryRecord


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
    rolling: dict[str, Curve]        # metric -> rolling prequential score
    cumulative: dict[str, Curve]     # metric -> cumulative prequential score
    probes: dict[int, Curve]         # segment number -> probe accuracy
    forgetting: Curve
    backward_transfer: Curve
    latency: dict[str, Curve]        # "loop_p99" etc. -> seconds
    drifts: list[DriftMark]
    last: HistoryRecord              # the newest record (final figures when there is no summary)
    superseded: int                  # records dropped as left over from before a rollback

    @property
    def has_probes(self) -> bool:
        return bool(self.probes) or len(self.forgetting) > 0 or len(self.backward_transfer) > 0


def by_model(records: Iterable[HistoryRecord]) -> list[ModelSeries]:
    """One `ModelSeries` per model, in model-name order, from records sorted by (model, position)."""
    ordered = sorted(records, key=lambda r: (r.model, r.position))
    return [_series(model, list(group)) for model, group in groupby(ordered, key=lambda r: r.model)]


def current_run(records: list[HistoryRecord]) -> list[HistoryRecord]:
    """The records of one model's current line of runs, dropping those written before a rollback.

    After a resume from an older snapshot (`run --from-snapshot`) the new run
    rewrites positions from there on, but the old run's records beyond the
    point where the new run stopped stay in the file. They are recognisable by
    time: a record older than a record at a lower position was superseded.

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


def _series(model: str, records: list[HistoryRecord]) -> ModelSeries:
    run = current_run(records)
    metrics = _keys(r.scores for r in run)
    return ModelSeries(
        model=model,
        rolling={m: _curve(run, lambda r, m=m: r.scores.get(m)) for m in metrics},
        cumulative={m: _curve(run, lambda r, m=m: r.scores_all.get(m)) for m in _keys(r.scores_all for r in run)},
        probes={s: _curve(run, lambda r, s=s: r.probe_accuracy.get(s))
                for s in sorted(_keys(r.probe_accuracy for r in run))},
        forgetting=_curve(run, lambda r: r.forgetting),
        backward_transfer=_curve(run, lambda r: r.backward_transfer),
        latency={k: _curve(run, lambda r, k=k: r.latency.get(k)) for k in _keys(r.latency for r in run)},
        drifts=[mark for r in run for mark in r.drifts],
        last=run[-1],
        superseded=len(records) - len(run),
    )


def _keys(mappings: Iterable[dict]) -> list:
    """The keys of all mappings, in order of first appearance (so colours stay put as keys come and go)."""
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


def _curve(records: list[HistoryRecord], value: Callable[[HistoryRecord], Optional[float]]) -> Curve:
    points = [(r.position, v) for r in records if (v := value(r)) is not None and np.isfinite(v)]
    x, y = zip(*points) if points else ((), ())
    return Curve(np.asarray(x, dtype=np.int64), np.asarray(y, dtype=float))
