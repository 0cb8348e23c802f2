"""How one model is judged, composed beside its learner: scores, drift and its policy, probes, counters, latency.

A learner reports to its `ModelEvaluation` through a few narrow calls: what it
scored (`scored_classification`, `scored_regression`, which return the drift
detections among those examples, for the learner to act on), what it refused
(`count_error`, `refuse`), how long an update took (`observe_update`). The
evaluation keeps everything else: prequential scores, the drift monitor and the
drift policy's bookkeeping, held-out probes and their evaluations, score marks,
refusal rate and health, latency histograms, and the callback the service
records its history by. It never learns; the learner gives it two hooks at
build time: `predict` (labels for probe examples) and `settle` (score what is
queued but not scored yet).

>>> import numpy as np
>>> evaluation = ModelEvaluation("m", "classification", window=10)
>>> evaluation.scored_classification(np.array([True, False, True]), np.array([0.9, 0.2, 0.7]), np.zeros(3))
[]
>>> evaluation.scores.count, round(evaluation.scores.value("accuracy", rolling=False), 3)
(3, 0.667)
"""

from __future__ import annotations

import logging
from bisect import insort
from typing import Callable, Optional

import msgspec
import numpy as np

from streamlearn.config import DriftConfig, EvalConfig
from streamlearn.learners.drift import DriftMark, DriftMonitor, finite_or_none
from streamlearn.learners.drift_policy import DriftPolicy, Judged, Transition
from streamlearn.learners.probes import ProbeSets
from streamlearn.learners.scores import PrequentialScores
from streamlearn.records import Example, Features, Rejected
from streamlearn.telemetry.histogram import LATENCY_BUCKETS, WAIT_BUCKETS, Histogram

log = logging.getLogger(__name__)
ERROR_LABELS = 20        # distinct error classes counted per model; the rest count as "other" (a bounded label)
REFUSAL_BLOCK = 500      # the refusal rate covers the last one to two blocks of examples
REFUSAL_MIN = 100        # examples seen before a refusal rate is judged
UNHEALTHY_SHARE = 0.5    # refusing this share of recent examples makes a model unhealthy (/readyz fails)

Predict = Callable[[list[Features]], list]


class ModelEvaluation:
    """One named model's scores, drift monitor and policy, probes, counters and latency; it learns nothing."""

    # What a snapshot keeps, under the names snapshots have always used (`learners.pkl` of older versions too).
    STATE: tuple[str, ...] = ("scores", "drift", "probes", "learned", "errors", "update_seconds", "loop_latency",
                              "processing", "_marks", "_marked", "error_counts", "policy")

    def __init__(self, name: str, task: str, window: int = 1000, drift: Optional[DriftConfig] = None,
                 evaluation: Optional[EvalConfig] = None, seed: int = 42, model_label: str = "",
                 predict: Optional[Predict] = None, settle: Optional[Callable[[], None]] = None) -> None:
        self.name = name
        self.task = task
        self.model_label = model_label   # what the model is ("scaled_logreg", a factory path), for messages
        self.scores = PrequentialScores(task, window)
        self.drift = DriftMonitor(drift or DriftConfig())
        policy = (drift or DriftConfig()).policy
        if task != "classification":   # the policy judges labels against a reference's predictions
            policy = msgspec.structs.replace(policy, enabled=False)
        self.policy = DriftPolicy(policy)                  # which drift a detection was, and what was done
        self._scoring: tuple[int, np.ndarray] = (0, np.zeros(0))   # drift position and event times being scored
        self.probes = _probe_sets(name, task, evaluation, seed)
        self.learned = 0
        self.errors = 0
        self.error_counts: dict[str, int] = {}   # refused examples by exception class (at most ERROR_LABELS + other)
        self.rejected: list[Rejected] = []       # refused since the service last took them (for dead letters)
        self._refusals = _RefusalWindow()
        self.update_seconds = Histogram(LATENCY_BUCKETS)   # one model update (one micro-batch)
        self.loop_latency = Histogram(LATENCY_BUCKETS)     # label event time -> model updated
        self.processing = Histogram(WAIT_BUCKETS)          # example read from the source -> model updated
        self.drifts: list[DriftMark] = []                  # detections not yet written to the history
        self.on_evaluation: Callable[["ModelEvaluation"], None] = lambda evaluation: None   # the service's history
        self._marks: list[float] = []          # event times whose rolling score to keep, ascending
        self._marked: dict[float, float] = {}
        self._predict: Predict = predict or (lambda rows: [None] * len(rows))
        self.settle: Callable[[], None] = settle or (lambda: None)   # scores what the learner queued, unscored

    # --- what the learner reports ---------------------------------------------------------------------------

    def scored_classification(self, correct, p_true, ts: Optional[np.ndarray] = None) -> list[DriftMark]:
        """Adds scored examples (event times `ts`, which date a drift among them); returns the drifts detected."""
        self._note_scoring(ts)
        self.scores.update_classification(correct, p_true)
        return self._watch(1.0 - np.asarray(correct, dtype=float))

    def scored_regression(self, y_true, y_pred, ts: Optional[np.ndarray] = None) -> list[DriftMark]:
        """Adds scored regression examples; returns the drifts detected among them."""
        self._note_scoring(ts)
        self.scores.update_regression(y_true, y_pred)
        return self._watch(np.abs(np.asarray(y_true, dtype=float) - np.asarray(y_pred, dtype=float)))

    def _note_scoring(self, ts: Optional[np.ndarray]) -> None:
        if ts is not None:   # None: the same examples as the last call (or none that a drift needs dating by)
            self._scoring = (self.drift.position, ts)

    def _watch(self, errors: np.ndarray) -> list[DriftMark]:
        events = self.drift.update(errors)
        for event in events:
            log.info("model %s: drift detected by %s at example %d", self.name, event.detector, event.position)
            self.drifts.append(event)
            del self.drifts[:-100]   # drained by the history; bounded when nobody records it
        return events

    def event_time(self, event: DriftMark) -> float:
        """The event time of the example `event` was detected at (NaN if it was not among the last scored)."""
        start, ts = self._scoring
        index = event.position - start - 1
        return float(ts[index]) if 0 <= index < len(ts) else float("nan")

    def observe_update(self, seconds: float, label_ts: np.ndarray, consumed: np.ndarray, now: float) -> None:
        """One model update took `seconds`; its examples' labels came at `label_ts` and were read at `consumed`."""
        self.update_seconds.observe(seconds)
        self.loop_latency.observe_many(now - label_ts)
        self.processing.observe_many(now - consumed[consumed > 0])   # 0: read before the time was kept

    def count_error(self, ex: Example, err: BaseException, what: str = "") -> None:
        """Counts an example the model refused and keeps it for the dead letters (`learn_error`)."""
        self.refuse(ex, type(err).__name__, str(err), what)

    def refuse(self, ex: Example, error: str, detail: str, what: str = "") -> None:
        """Counts a refused example under `error` (a bounded label) and keeps it as a `Rejected` record."""
        self.errors += 1
        label = error if error in self.error_counts or len(self.error_counts) < ERROR_LABELS else "other"
        self.error_counts[label] = self.error_counts.get(label, 0) + 1
        self.rejected.append(Rejected(self.name, ex, label, detail[:500]))
        if self.errors <= 10 or self.errors % 1000 == 0:  # rate-limited: a poisoned stream must not flood logs
            log.warning("model %s: %sexample %s not learned (%d so far): %s: %s",
                        self.name, what, ex.id[:64], self.errors, error, detail[:500])

    # --- the drift policy's bookkeeping ---------------------------------------------------------------------

    def open_case(self, event: DriftMark) -> bool:
        """Opens a drift case dated by the event time of the example it was detected at; False if none opened."""
        if not self.policy.enabled:   # off, and off for regression: no accuracy to judge by
            return False
        return self.policy.open(event.position, self.event_time(event), event.detector,
                                1.0 - self.scores.value("accuracy", True))

    def judge_scored(self, labels: list, ts: np.ndarray, judge: Callable[[int], Judged]) -> list[Transition]:
        """After `len(labels)` classified examples were scored: notes their labels, then judges those after an
        open case's detection (`judge(i)`: the reference's verdicts on examples i..); returns the decisions, in
        order, for the learner to act on (each first counted by `count_decision`)."""
        policy = self.policy
        if not policy.enabled:
            return []
        n = len(labels)
        first = self.drift.position - n + 1
        policy.saw(labels, first)
        start = policy.judging_from(first, n)
        if start is None:
            return []
        decisions = policy.judge(judge(start), np.arange(first + start, first + n), np.asarray(ts)[start:])
        for decision in decisions:
            log.info("model %s: drift case decided at example %d: %s", self.name, decision.position, decision.kind)
        return decisions

    def count_decision(self, decision: Transition) -> None:
        """Counts what every learner does on a policy decision (the learner then adds its model's actions)."""
        act = self.policy.act
        if decision.kind == "suspect":
            act("change", "suspect", decision.position, decision.ts)
        elif decision.kind == "change":
            act("change", "confirm", decision.position, decision.ts)
        elif decision.kind == "burst":
            act("burst", "dismiss", decision.position, decision.ts)
        else:
            act(decision.kind, "keep", decision.position, decision.ts)

    # --- probes, marks ----------------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Scores the model on every kept probe set (forgetting, backward transfer), then tells the service."""
        self.probes.follow(self.policy.last_change)   # probes of a concept that is no longer true are retired
        self.probes.record([self.probe_accuracy(segment.probes) for segment in self.probes.segments])
        self.on_evaluation(self)

    def probe_accuracy(self, probes: list[Example]) -> float:
        """Share of `probes` whose label the model predicts now (it learns nothing from them)."""
        predicted = self._predict([ex.features for ex in probes]) if probes else []
        return sum(p == ex.label for p, ex in zip(predicted, probes)) / len(probes) if probes else float("nan")

    def mark_score_at(self, ts: float) -> None:
        """Keeps the rolling score of the first metric as it is once every example up to event time `ts` is learned."""
        insort(self._marks, ts)

    def score_at(self, ts: float) -> float:
        """The score kept by `mark_score_at(ts)` (NaN if not marked, or not reached yet)."""
        return self._marked.get(ts, float("nan"))

    def next_mark(self, last_ts: float) -> Optional[float]:
        """Takes the earliest mark before event time `last_ts` (the learner learns up to it, then `keep_mark`)."""
        return self._marks.pop(0) if self._marks and last_ts > self._marks[0] else None

    def keep_mark(self, mark: float) -> None:
        self._marked[mark] = self.scores.value(self.scores.names[0], rolling=True)

    # --- health -----------------------------------------------------------------------------------------------

    @property
    def watched_score(self) -> float:
        """The rolling accuracy once its window is full, for score triggers; NaN before, and for regression."""
        if self.task != "classification" or self.scores.count < self.scores.window:
            return float("nan")
        return self.scores.value("accuracy", rolling=True)

    def take_rejected(self) -> list[Rejected]:
        """The examples refused since the last call (the service quarantines them)."""
        rejected, self.rejected = self.rejected, []
        return rejected

    @property
    def refusal_rate(self) -> float:
        """Share of the recent examples (the last 500 to 1,000) the model refused; 0 before 100 are seen."""
        return self._refusals.rate(self.learned + self.errors, self.errors)

    def health_problem(self) -> Optional[str]:
        """Why the model is not healthy (it refuses most of its recent examples), or None."""
        rate = self.refusal_rate
        if rate < UNHEALTHY_SHARE:
            return None
        return refusal_message(self.name, self.model_label, self.task, rate, self.rejected_sample)

    @property
    def rejected_sample(self) -> Optional[Rejected]:
        return self._refusals.last

    def check_refusals(self) -> None:
        """Logs once when the model turns unhealthy (naming the feature and the fix), and once when it recovers."""
        if self.rejected:
            self._refusals.last = self.rejected[-1]
        self._refusals.advance(self.learned + self.errors, self.errors)
        problem = self.health_problem()
        if (problem is not None) != self._refusals.sick:
            self._refusals.sick = problem is not None
            if problem is not None:
                log.error("%s", problem)
            else:
                log.info("model %s refuses fewer than %.0f%% of its examples again", self.name,
                         100 * UNHEALTHY_SHARE)

    @property
    def position(self) -> int:
        """Examples the model has taken from its stream (learned, refused or held out as probes)."""
        return self.probes.position if self.probes is not None else self.learned + self.errors

    # --- snapshot ---------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """What a snapshot keeps of it: live objects, for the learner to pickle at once."""
        return {name: getattr(self, name) for name in self.STATE}

    def restore(self, state: dict) -> None:
        """Takes back `state` (its keys may sit among the learner's own; older snapshots' shapes too)."""
        if "error_counts" not in state:   # a snapshot from before errors were counted by class
            state = {**state, "error_counts": {"other": state["errors"]} if state["errors"] else {}}
        if "policy" not in state:         # a snapshot from before the drift policy: no case open
            state = {**state, "policy": self.policy}
        for name in self.STATE:
            setattr(self, name, state[name])
        self._refusals = _RefusalWindow(self.learned + self.errors, self.errors)

    def summary(self) -> dict:
        """The model's figures for the service's summary."""
        out = {"model": self.name, "task": self.task, "learned": self.learned, "errors": self.errors,
               "learn_errors": dict(sorted(self.error_counts.items())),
               "scores": self.scores.values(), "drift_detected": dict(sorted(self.drift.detected.items()))}
        if self.probes is not None:
            out.update(held_out=self.probes.held_out, forgetting=finite_or_none(self.probes.forgetting),
                       backward_transfer=finite_or_none(self.probes.backward_transfer),
                       probe_accuracy={str(k): v for k, v in self.probes.accuracies().items()})
        return out


class _RefusalWindow:
    """Counters at the start of the last two blocks of examples: a recent refusal rate at no per-example cost."""

    def __init__(self, seen: int = 0, refused: int = 0) -> None:
        self.marks = [(seen, refused), (seen, refused)]   # (seen, refused) when the previous and current block began
        self.last: Optional[Rejected] = None              # the newest refused example, for the diagnosis
        self.sick = False

    def advance(self, seen: int, refused: int) -> None:
        """Starts a new block once the current one is full (in the learning loop only)."""
        if seen - self.marks[1][0] >= REFUSAL_BLOCK:
            self.marks = [self.marks[1], (seen, refused)]

    def rate(self, seen: int, refused: int) -> float:
        base_seen, base_refused = self.marks[0]
        n = seen - base_seen
        return (refused - base_refused) / n if n >= REFUSAL_MIN else 0.0


def refusal_message(name: str, model: str, task: str, rate: float, sample: Optional[Rejected]) -> str:
    """One line: which model refuses how much, why (the string features, for a TypeError) and the fix."""
    head = f"model \"{name}\"{f' ({model})' if model else ''} refuses {rate:.0%} of its examples"
    if sample is None:
        return head
    strings = sorted(k for k, v in sample.example.features.items() if isinstance(v, str))
    if sample.error == "TypeError" and strings:
        listed = ", ".join(f'"{k}"' for k in strings[:5]) + (", ..." if len(strings) > 5 else "")
        builtin = "logreg" if task == "classification" else "linreg"
        return (f"{head}: string feature{'s' if len(strings) > 1 else ''} {listed}; use model = \"{builtin}\" "
                f"(one-hot encodes strings) or send numbers")
    return (f"{head}: {sample.error}: {sample.detail[:200]} (e.g. example {sample.example.id[:64]}); "
            f"they go to the dead letters as learn_error")


def _probe_sets(name: str, task: str, evaluation: Optional[EvalConfig], seed: int) -> Optional[ProbeSets]:
    """Evaluation points for every model; held-out probes for classifiers (probe scores are accuracies)."""
    if evaluation is None:
        return None
    if task != "classification":
        evaluation = msgspec.structs.replace(evaluation, probe_size=0)
    return ProbeSets(name, evaluation, seed)
