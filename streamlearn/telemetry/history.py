"""The service's own time series, for `streamlearn report`: a line per model and evaluation, and frequent score samples.

Prometheus keeps the live view; this file keeps the story of one state folder
(prequential scores over the stream, probe accuracy per segment, drifts, the
drift policy's actions, latency) so a report can be drawn without a Prometheus
server. Two kinds of JSON lines are appended:

- a `HistoryRecord` (a JSON object) per model at each evaluation (`eval.every`);
- a `ScoreSample` (a compact JSON array, `["s", model, position, time, {rolling scores}]`, about 60
  bytes) every `eval.sample_every` examples of a model's stream, cut by example
  count, so that a run draws as hundreds of points.

Drift detections and the drift policy's actions go into the evaluation lines
(each carries its own position). The file is bounded: past `eval.history_max_mb`
it is renamed `history.jsonl.1` (replacing the one before) and a new file begins;
readers take both. After a restore from a snapshot, positions may repeat, and
readers keep the newest line per model, kind and position.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "history.jsonl"
>>> with HistoryWriter(path) as writer:
...     writer.append(HistoryRecord(model="m", time=1.0, position=10, learned=9, scores={"accuracy": 0.5}))
...     writer.append(HistoryRecord(model="m", time=2.0, position=10, learned=9, scores={"accuracy": 0.7}))
...     writer.append(ScoreSample("m", 20, 3.0, {"accuracy": 0.75}))
>>> [r.scores["accuracy"] for r in read_history(path)], path.read_bytes().splitlines()[-1]
([0.7], b'["s","m",20,3.0,{"accuracy":0.75}]')
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

import msgspec

from streamlearn.learners.drift import DriftMark, finite_or_none
from streamlearn.learners.plasticity import PolicyAction
from streamlearn.records import IntakeStats
from streamlearn.telemetry.histogram import Histogram, HistogramState

if TYPE_CHECKING:   # telemetry reads the learners; the learners never import this module
    from streamlearn.learners.contract import Learner
    from streamlearn.learners.evaluation import ModelEvaluation
    from streamlearn.records import Example

log = logging.getLogger(__name__)
ROTATED_SUFFIX = ".1"   # history.jsonl -> history.jsonl.1 when the file outgrows its bound
SCORE_DIGITS = 4        # score samples are rounded: a curve needs no more, and the lines stay short


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
    drifts: list[DriftMark] = []     # detections since the previous record of the model
    actions: list[PolicyAction] = []  # the drift policy's actions since the previous record of the model
    latency: dict[str, float] = {}   # seconds: "loop_p50", "loop_p99", "processing_p50", "processing_p99", ...


class ScoreSample(msgspec.Struct, array_like=True, tag="s"):
    """A model's rolling scores at one position of its stream (every `eval.sample_every` examples): the curves."""

    model: str
    position: int                    # examples the model has taken, a multiple of eval.sample_every
    time: float                      # unix seconds when recorded (tells a rolled-back run's leftovers; never a cut)
    scores: dict[str, float]         # rolling prequential score per metric, rounded to SCORE_DIGITS


@dataclass(frozen=True)
class History:
    """What a history file holds: the newest line per model and position of each kind, in (model, position) order."""

    records: list[HistoryRecord]
    samples: list[ScoreSample]


class HistoryWriter:
    """Appends lines as JSON, rotating past `max_bytes`; a write error is logged once, never fatal."""

    def __init__(self, path: Path, max_bytes: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._file = open(self.path, "ab")
        self._encoder = msgspec.json.Encoder()
        self._failed = False

    def append(self, line: Union[HistoryRecord, ScoreSample]) -> None:
        try:
            self._file.write(self._encoder.encode(line) + b"\n")
            self._file.flush()
            if self.max_bytes is not None and self._file.tell() >= self.max_bytes:
                self._rotate()
        except OSError as err:
            if not self._failed:
                log.warning("history %s: cannot append (%s); the report will have gaps", self.path, err)
            self._failed = True

    def _rotate(self) -> None:
        """Keeps the full file as `history.jsonl.1` (the one before is dropped) and starts an empty one."""
        self._file.close()
        os.replace(self.path, rotated_path(self.path))
        self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "HistoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HistoryRecorder:
    """Writes each evaluation of a learner as a history line, and its rolling scores every `sample_every` examples.

    Latency quantiles are taken since the model's previous evaluation line; drift
    detections (`evaluation.drifts`) and the drift policy's actions
    (`evaluation.policy.actions`) are drained into the evaluation lines.
    """

    def __init__(self, writer: HistoryWriter, sample_every: int = 0) -> None:
        self.writer = writer
        self.sample_every = sample_every   # 0: no score samples
        self._seen: dict[tuple[str, str], HistogramState] = {}   # (model or topic, series) -> state at last line

    def record(self, evaluation: "ModelEvaluation", stats: Optional[IntakeStats], now: float) -> None:
        """Writes an evaluation line for a learner's `evaluation` (its `on_evaluation` callback calls this)."""
        scores = evaluation.scores
        probes = evaluation.probes
        latency = self._quantiles(evaluation.name, {"loop": evaluation.loop_latency,
                                                    "processing": evaluation.processing})
        if stats is not None:
            waits = {f"queueing_{topic}": Histogram.from_state(h) for topic, h in stats.queueing.items()}
            if stats.feedback_delay is not None:
                waits["label_delay"] = Histogram.from_state(stats.feedback_delay)
            latency.update(self._quantiles(evaluation.name, waits))
        drifts, actions = _drain_marks(evaluation)
        self.writer.append(HistoryRecord(
            model=evaluation.name, time=now, position=evaluation.position, learned=evaluation.learned,
            scores=_finite_values({m: scores.value(m, rolling=True) for m in scores.names}),
            scores_all=_finite_values({m: scores.value(m, rolling=False) for m in scores.names}),
            probe_accuracy=probes.accuracies() if probes is not None else {},
            forgetting=finite_or_none(probes.forgetting) if probes is not None else None,
            backward_transfer=finite_or_none(probes.backward_transfer) if probes is not None else None,
            drifts=drifts, actions=actions, latency=latency))

    def sample(self, learner: "Learner", now: float) -> None:
        """Writes the learner's rolling scores as they are now (whatever it has queued scored first)."""
        evaluation = learner.evaluation
        evaluation.settle()
        scores = evaluation.scores
        values = _finite_values({m: round(scores.value(m, rolling=True), SCORE_DIGITS) for m in scores.names})
        self.writer.append(ScoreSample(learner.name, evaluation.position, round(now, 3), values))

    def learn(self, learner: "Learner", examples: list["Example"], now: Optional[float]) -> None:
        """`learner.learn_batch(examples, now)`, cut at every `sample_every`-th position of its stream to sample there.

        The cuts are by example count only: where a batch ends (wall clock) moves no
        sample, and learning in pieces learns exactly what one call would.
        """
        every = self.sample_every
        while examples:
            taken = learner.evaluation.position
            if not every:
                learner.learn_batch(examples, now)
                return
            step = every - taken % every
            learner.learn_batch(examples[:step], now)
            if len(examples) >= step:
                self.sample(learner, now if now is not None else 0.0)
            examples = examples[step:]

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


def _drain_marks(learner: "ModelEvaluation") -> tuple[list[DriftMark], list[PolicyAction]]:
    """The learner's drift detections and its policy's actions since they were last taken, taken now."""
    drifts, learner.drifts = learner.drifts, []
    policy = learner.policy
    actions, policy.actions = list(policy.actions), []
    return drifts, actions


def _finite_values(values: dict[str, float]) -> dict[str, float]:
    """Scores that exist: a model that has scored nothing yet has none (JSON has no NaN)."""
    return {name: value for name, value in values.items() if not math.isnan(value)}


def rotated_path(path: Path) -> Path:
    """Where the history's previous part is kept once the file outgrew its bound."""
    return path.with_name(path.name + ROTATED_SUFFIX)


def read_history(path: Path) -> list[HistoryRecord]:
    """The evaluation records, the newest per (model, position), in position order; broken lines are skipped."""
    return read_history_file(path).records


def read_history_file(path: Path) -> History:
    """Both kinds of lines of `path` and of its rotated part (read first), the newest per model and position."""
    path = Path(path)
    records: dict[tuple[str, int], HistoryRecord] = {}
    samples: dict[tuple[str, int], ScoreSample] = {}
    for part in (rotated_path(path), path):
        if part == path or part.exists():
            for line in _lines(part):
                if isinstance(line, ScoreSample):
                    samples[(line.model, line.position)] = line
                else:
                    records[(line.model, line.position)] = line
    order = lambda r: (r.model, r.position)  # noqa: E731
    return History(sorted(records.values(), key=order), sorted(samples.values(), key=order))


def _lines(path: Path) -> Iterator[Union[HistoryRecord, ScoreSample]]:
    records, samples = msgspec.json.Decoder(HistoryRecord), msgspec.json.Decoder(ScoreSample)
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield samples.decode(line) if line[:1] == b"[" else records.decode(line)
            except msgspec.DecodeError as err:  # a line cut by a crash: the rest is still worth drawing
                log.warning("history %s line %d skipped: %s", path, number, err)
