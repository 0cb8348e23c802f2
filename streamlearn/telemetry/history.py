"""The service's own time series: one line per model and evaluation, for `streamlearn report`.

Prometheus keeps the live view; this file keeps the story of one state folder
(prequential scores over the stream, probe accuracy per segment, drifts,
latency) so a report can be drawn without a Prometheus server. Lines are JSON,
appended; after a restore from a snapshot, positions may repeat, and readers
keep the newest line per model and position.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "history.jsonl"
>>> with HistoryWriter(path) as writer:
...     writer.append(HistoryRecord(model="m", time=1.0, position=10, learned=9, scores={"accuracy": 0.5}))
...     writer.append(HistoryRecord(model="m", time=2.0, position=10, learned=9, scores={"accuracy": 0.7}))
>>> [r.scores["accuracy"] for r in read_history(path)]
[0.7]
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import msgspec

from streamlearn.records import IntakeStats
from streamlearn.telemetry.histogram import Histogram, HistogramState

if TYPE_CHECKING:   # the learners use DriftMark from here
    from streamlearn.learners.base import Learner

log = logging.getLogger(__name__)


class DriftMark(msgspec.Struct):
    """A drift detection: which detector, at which of the model's positions."""

    detector: str
    position: int


class HistoryRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One model's figures at one evaluation point."""

    model: str
    time: float                      # unix seconds when recorded
    position: int                    # examples the model has taken (learned + held out as probes)
    learned: int                     # examples the model has learned
    scores: dict[str, float] = {}    # rolling prequential score per metric (window = the model's window)
    scores_all: dict[str, float] = {}  # cumulative prequential score per metric
    probe_accuracy: dict[int, float] = {}  # segment number (0 = the stream's first) -> accuracy now
    forgetting: Optional[float] = None
    backward_transfer: Optional[float] = None
    drifts: list[DriftMark] = []     # detections since the previous record
    latency: dict[str, float] = {}   # seconds: "loop_p50", "loop_p99", "processing_p50", "processing_p99", ...


class HistoryWriter:
    """Appends records as JSON lines; a write error is logged once, never fatal."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._encoder = msgspec.json.Encoder()
        self._failed = False

    def append(self, record: HistoryRecord) -> None:
        try:
            self._file.write(self._encoder.encode(record) + b"\n")
            self._file.flush()
        except OSError as err:
            if not self._failed:
                log.warning("history %s: cannot append (%s); the report will have gaps", self.path, err)
            self._failed = True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "HistoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HistoryRecorder:
    """Turns each evaluation of a learner into a history line, latency quantiles taken since the line before."""

    def __init__(self, writer: HistoryWriter) -> None:
        self.writer = writer
        self._seen: dict[tuple[str, str], HistogramState] = {}   # (model or topic, series) -> state at last line

    def record(self, learner: "Learner", stats: Optional[IntakeStats], now: float) -> None:
        scores = learner.scores
        probes = learner.probes
        latency = self._quantiles(learner.name, {"loop": learner.loop_latency, "processing": learner.processing})
        if stats is not None:
            waits = {f"queueing_{topic}": Histogram.from_state(h) for topic, h in stats.queueing.items()}
            if stats.feedback_delay is not None:
                waits["label_delay"] = Histogram.from_state(stats.feedback_delay)
            latency.update(self._quantiles(learner.name, waits))
        self.writer.append(HistoryRecord(
            model=learner.name, time=now, position=probes.position, learned=learner.learned,
            scores=_finite_values({m: scores.value(m, rolling=True) for m in scores.names}),
            scores_all=_finite_values({m: scores.value(m, rolling=False) for m in scores.names}),
            probe_accuracy=probes.accuracies(), forgetting=finite_or_none(probes.forgetting),
            backward_transfer=finite_or_none(probes.backward_transfer), drifts=learner.drifts, latency=latency))
        learner.drifts = []

    def _quantiles(self, model: str, series: dict[str, Histogram]) -> dict[str, float]:
        """p50 and p99 of each histogram over the observations since the previous line."""
        out = {}
        for name, histogram in series.items():
            key = (model, name)
            recent = histogram.since(self._seen[key]) if key in self._seen else histogram
            self._seen[key] = histogram.state()
            for q in (0.5, 0.99):
                value = recent.quantile(q)
                if not math.isnan(value):
                    out[f"{name}_p{round(q * 100)}"] = value
        return out

    def close(self) -> None:
        self.writer.close()


def finite_or_none(value: float) -> Optional[float]:
    """None for NaN (JSON has no NaN): a figure not measured yet."""
    return None if math.isnan(value) else value


def _finite_values(values: dict[str, float]) -> dict[str, float]:
    """Scores that exist: a model that has scored nothing yet has none (JSON has no NaN)."""
    return {name: value for name, value in values.items() if not math.isnan(value)}


def read_history(path: Path) -> list[HistoryRecord]:
    """All records, the newest per (model, position), in position order; broken lines are skipped."""
    newest: dict[tuple[str, int], HistoryRecord] = {}
    for record in _records(Path(path)):
        newest[(record.model, record.position)] = record
    return sorted(newest.values(), key=lambda r: (r.model, r.position))


def _records(path: Path) -> Iterator[HistoryRecord]:
    decoder = msgspec.json.Decoder(HistoryRecord)
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield decoder.decode(line)
            except msgspec.DecodeError as err:  # a line cut by a crash: the rest is still worth drawing
                log.warning("history %s line %d skipped: %s", path, number, err)
