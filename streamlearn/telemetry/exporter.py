"""Exposes the service's accumulators as Prometheus metrics, read at scrape time.

Nothing in the learning loop touches prometheus_client: the loop updates plain
counters and `Histogram`s, and this collector turns them into metric families
when Prometheus scrapes. Label values are bounded: topics, partitions, reasons,
outcomes and configured model names, never a request id.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Optional

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from streamlearn.checkpoints.snapshotter import Snapshotter
from streamlearn.learners.contract import Learner, LearnerMetrics
from streamlearn.learners.evaluation import ModelEvaluation
from streamlearn.learners.served import ServedScores
from streamlearn.records import IntakeStats
from streamlearn.telemetry.histogram import HistogramState
from streamlearn.triggers import Trigger

if TYPE_CHECKING:   # the deploy package is imported only when publishing is on
    from streamlearn.deploy.handoff import Handoff

PREFIX = "streamlearn_"


class ClusterFigures(msgspec.Struct):
    """A replica's figures among the others (`cluster.epochs.EpochSync.figures`)."""

    replicas: int
    syncs: int                    # syncs so far (the epoch)
    wait: HistogramState          # seconds from ready for a sync until every replica was
    average: HistogramState       # seconds the average itself took (the collectives)


class ClusterCollector(Collector):
    """`streamlearn_cluster_*`: the syncs of a replica (its `replica` label comes from `ReplicaLabelled`)."""

    def __init__(self, figures: Callable[[], ClusterFigures]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self._figures()
        yield GaugeMetricFamily(PREFIX + "cluster_replicas", "Replicas learning one model together.", value=f.replicas)
        yield CounterMetricFamily(PREFIX + "cluster_syncs", "Parameter averages with the other replicas (epochs).",
                                  value=f.syncs)
        yield _histogram("cluster_sync_wait_seconds", "Time a replica waited at a sync for the others (a slow or "
                         "lagging replica shows here on the others).", [((), f.wait)], [])
        yield _histogram("cluster_average_seconds", "Time one parameter average took (the collectives).",
                         [((), f.average)], [])


class ReplicaLabelled(Collector):
    """Another collector's metrics with a `replica` label added to every sample (bounded: the rank)."""

    def __init__(self, inner: Collector, rank: int) -> None:
        self._inner = inner
        self._rank = str(rank)

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, "replica": self._rank}) for s in family.samples]
            yield labelled


class ServiceCollector(Collector):
    """Builds every `streamlearn_*` metric from the intake's latest counters and the learners."""

    def __init__(self, intake_stats: Callable[[], Optional[IntakeStats]],
                 learners: Callable[[], Iterable[Learner]],
                 snapshots: Callable[[], Optional[Snapshotter]] = lambda: None,
                 served: Callable[[], Mapping[str, ServedScores]] = dict,
                 handoff: Callable[[], Optional["Handoff"]] = lambda: None, rejected_topic: str = "",
                 stages: Callable[[], Mapping[str, HistogramState]] = dict) -> None:
        self._intake_stats = intake_stats
        self._stages = stages   # stage name -> seconds of the feedback loop's examples in it
        self._rejected_topic = rejected_topic   # the dead-letter topic label of examples a model refused
        self._learners = learners
        self._snapshots = snapshots
        self._served = served
        self._handoff = handoff

    def collect(self) -> Iterator[Metric]:
        stats = self._intake_stats() or IntakeStats()
        learners = list(self._learners())
        evaluations = [l.evaluation for l in learners]
        own = [(l.name, l.metrics()) for l in learners]   # each learner's own figures, read once per scrape
        yield from _intake_metrics(stats, _learn_error_letters(evaluations, self._rejected_topic))
        yield from _learner_metrics(evaluations, own, self._served())
        yield _histogram("stage_seconds", "Where the feedback loop's time goes, per example, by stage: kafka (broker "
                         "timestamp of the message completing it -> read), join (read -> released by the watermark), "
                         "batch (released -> handed over), handoff (-> received by the learner process), queue "
                         "(-> its batch's learning starts), learn (-> the batch learned).",
                         [((name,), state) for name, state in self._stages().items()], ["stage"])
        yield from _probe_metrics(evaluations)
        snapshots = self._snapshots()
        if snapshots is not None:
            yield from _snapshot_metrics(snapshots)
        handoff = self._handoff()
        if handoff is not None:
            yield from _deploy_metrics(handoff)
        triggers = ([snapshots.trigger] if snapshots else []) + (handoff.triggers() if handoff is not None else [])
        yield _trigger_metric(triggers, [fired for _, m in own for fired in m.triggers])


def _trigger_metric(triggers: list[Trigger], learners: list[tuple[str, str, int]]) -> Metric:
    """Firings of the service's triggers and of the learners' own ((action, reason, firings) from their metrics)."""
    fired: Counter[tuple[str, str]] = Counter()
    for trigger in triggers:
        for reason, n in trigger.fired.items():
            fired[(trigger.action, reason)] += n
    for action, reason, n in learners:
        fired[(action, reason)] += n
    family = CounterMetricFamily(PREFIX + "triggers_fired", "Trigger firings, by action (snapshot, consolidate, "
                                 "publish) and reason (examples, seconds, drift, score, shutdown).",
                                 labels=["action", "reason"])
    for labels, n in sorted(fired.items()):
        family.add_metric(list(labels), n)
    return family


def _probe_metrics(learners: list[ModelEvaluation]) -> Iterator[Metric]:
    """Live forgetting: accuracy on the probe sets of recent segments (labelled by age: 0 is the newest)."""
    probe = GaugeMetricFamily(PREFIX + "probe_accuracy", "Accuracy now on the held-out probes of a recent segment "
                              "(segment=0 the newest complete one, 1 the one before, ...).", labels=["model", "segment"])
    forgetting = GaugeMetricFamily(PREFIX + "forgetting", "Mean over recent segments of best earlier probe "
                                   "accuracy minus accuracy now.", labels=["model"])
    transfer = GaugeMetricFamily(PREFIX + "backward_transfer", "Mean over recent segments of probe accuracy now "
                                 "minus just after the segment.", labels=["model"])
    for learner in learners:
        probes = learner.probes
        if probes is None:
            continue
        for age, segment in enumerate(reversed(probes.segments)):
            if segment.now is not None:
                probe.add_metric([learner.name, str(age)], segment.now)
        for family, value in ((forgetting, probes.forgetting), (transfer, probes.backward_transfer)):
            if not math.isnan(value):
                family.add_metric([learner.name], value)
    yield probe
    yield forgetting
    yield transfer


def _deploy_metrics(handoff: "Handoff") -> Iterator[Metric]:
    """Gate decisions by outcome (every outcome from zero), each model's production version, publishing failures."""
    decisions = CounterMetricFamily(PREFIX + "gate_decisions", "Gate decisions on candidate versions, by model and "
                                    "outcome (promoted, rejected).", labels=["model", "outcome"])
    for name, model in handoff.models.items():
        for outcome, n in sorted(model.decisions.items()):
            decisions.add_metric([name, outcome], n)
    yield decisions
    version = GaugeMetricFamily(PREFIX + "model_version", "The production version of each model (from the "
                                "registry).", labels=["model"])
    for name, number in sorted(dict(handoff.production_versions).items()):   # a copy: the loop may add one
        version.add_metric([name], number)
    yield version
    yield CounterMetricFamily(PREFIX + "publish_failures", "Candidates, decisions or publications that failed "
                              "(registry, artifact store or event sink); learning went on.", value=handoff.failures)


def _snapshot_metrics(snapshots: Snapshotter) -> Iterator[Metric]:
    yield _histogram("snapshot_seconds", "Duration of one snapshot write (off the learning loop).",
                     [((), snapshots.seconds.state())], [])
    yield _histogram("snapshot_stall_seconds", "Learning-loop time one snapshot took (the fork, or serializing).",
                     [((), snapshots.stall.state())], [])
    yield CounterMetricFamily(PREFIX + "snapshot_failures", "Snapshot writes that failed (the last good one stays).",
                              value=snapshots.failures)
    if snapshots.last_success is not None:
        yield GaugeMetricFamily(PREFIX + "snapshot_last_success_timestamp_seconds",
                                "Unix time of the newest durable snapshot.", value=snapshots.last_success)


def _learn_error_letters(learners: list[ModelEvaluation], topic: str) -> dict[tuple[str, str], int]:
    """Dead letters of reason `learn_error`: counted by the learners (exact across restores), not by the intake."""
    refused = sum(sum(l.error_counts.values()) for l in learners)
    return {(topic, "learn_error"): refused} if refused else {}


def _intake_metrics(stats: IntakeStats, learn_errors: Mapping[tuple[str, str], int]) -> Iterator[Metric]:
    events = CounterMetricFamily(PREFIX + "events", "Messages consumed, by topic and outcome (ok, dead_letter).",
                                 labels=["topic", "outcome"])
    for (topic, outcome), n in sorted(stats.events.items()):
        events.add_metric([topic, outcome], n)
    yield events
    dead = CounterMetricFamily(PREFIX + "dead_letters", "Messages refused as bad input, by topic and reason "
                               "(learn_error: examples a model raised on).", labels=["topic", "reason"])
    for (topic, reason), n in sorted({**stats.dead_letters, **learn_errors}.items()):
        dead.add_metric([topic, reason], n)
    yield dead
    join = CounterMetricFamily(PREFIX + "join", "Join outcomes of inference logs and feedback.", labels=["outcome"])
    for outcome, n in sorted(stats.join.items()):
        join.add_metric([outcome], n)
    yield join
    yield GaugeMetricFamily(PREFIX + "join_pending", "Logs and feedback waiting for their other half.",
                            value=stats.join_pending)
    if stats.feedback_delay is not None:
        yield _histogram("feedback_delay_seconds", "Feedback event time minus inference event time.",
                         [((), stats.feedback_delay)], [])
    yield _histogram("queueing_seconds", "Broker timestamp of a message to the intake reading it.",
                     [((topic,), state) for topic, state in sorted(stats.queueing.items())], ["topic"])
    lag = GaugeMetricFamily(PREFIX + "consumer_lag", "Messages behind the partition's end (approximate on Tansu).",
                            labels=["topic", "partition"])
    for (topic, partition), n in sorted(stats.consumer_lag.items()):
        lag.add_metric([topic, str(partition)], n)
    yield lag


def _learner_metrics(learners: list[ModelEvaluation], own: list[tuple[str, LearnerMetrics]],
                     served: Mapping[str, ServedScores]) -> Iterator[Metric]:
    learned = CounterMetricFamily(PREFIX + "examples_learned", "Examples learned, by model.", labels=["model"])
    errors = CounterMetricFamily(PREFIX + "learn_errors", "Examples the model refused (not learned; dead letters "
                                 "learn_error), by model and error (exception class, NonFiniteUpdate, other).",
                                 labels=["model", "error"])
    score = GaugeMetricFamily(PREFIX + "prequential_score", "Test-then-train score: cumulative (window=all) "
                              "or over the last N examples; with model_version, the score of the predictions "
                              "serving made with that version (the last few versions).",
                              labels=["model", "metric", "window"])
    for learner in learners:
        learned.add_metric([learner.name], learner.learned)
        for error, n in sorted(learner.error_counts.items()):
            errors.add_metric([learner.name, error], n)
        for metric in learner.scores.names:
            for rolling, window in ((False, "all"), (True, str(learner.scores.window))):
                value = learner.scores.value(metric, rolling)
                if not math.isnan(value):
                    score.add_metric([learner.name, metric, window], value)
    for name, scores in served.items():
        for s in scores.series():   # another label set in the same family: bounded by eval.served_versions
            score.add_sample(PREFIX + "prequential_score", {"model": name, "metric": s.metric, "window": "all",
                                                            "model_version": s.version}, s.value)
    drifts = CounterMetricFamily(PREFIX + "drift_detected", "Drifts detected on the model's prequential error.",
                                 labels=["model", "detector"])
    for learner in learners:
        for detector, n in learner.drift.detected.items():
            drifts.add_metric([learner.name, detector], n)
    yield learned
    yield errors
    yield score
    yield drifts
    yield _drift_actions(learners)
    yield from _neural_metrics(own)
    yield from _lm_metrics(own)
    yield _histogram("update_seconds", "Duration of one learner update (one micro-batch of examples).",
                     [((l.name,), l.update_seconds.state()) for l in learners], ["model"])
    yield _histogram("loop_latency_seconds", "Feedback event time to model updated.",
                     [((l.name,), l.loop_latency.state()) for l in learners], ["model"])
    yield _histogram("processing_seconds", "Intake read the message completing an example to model updated "
                     "(join wait, hand-off, micro-batch wait, update).",
                     [((l.name,), l.processing.state()) for l in learners], ["model"])


def _neural_metrics(learners: list[tuple[str, LearnerMetrics]]) -> Iterator[Metric]:
    replayed = [(name, m.replay_size) for name, m in learners if m.replay_size is not None]
    if replayed:
        replay = GaugeMetricFamily(PREFIX + "replay_buffer_size", "Examples held in the replay buffer.",
                                   labels=["model"])
        for name, size in replayed:
            replay.add_metric([name], size)
        yield replay
    rollbacks = CounterMetricFamily(PREFIX + "update_rollbacks", "Updates undone: loss, gradient or weights "
                                    "not finite (torch), or a River update after which the model's output or state "
                                    "was non-finite or exploded (the last good state was kept).", labels=["model"])
    for name, m in learners:
        rollbacks.add_metric([name], m.rolled_back)
    yield rollbacks


def _lm_metrics(learners: list[tuple[str, LearnerMetrics]]) -> Iterator[Metric]:
    """A language model's own figures (`LmLearner.metrics`): tokens, loss, lag, capabilities and their forgetting."""
    lms = [(name, m.extra) for name, m in learners if "tokens_learned" in m.extra]
    if not lms:
        return
    tokens = CounterMetricFamily(PREFIX + "lm_tokens_learned", "Answer tokens a language model learned, by kind: new "
                                 "(from feedback) or replayed.", labels=["model", "kind"])
    for family, help_text, key in (("lm_loss", "The last step's mean loss per answer token (new and replayed).", "loss"),
                                   ("lm_pending_examples", "Conversations waiting for a step.", "pending"),
                                   ("lm_pending_tokens", "Tokens of the conversations waiting for a step.",
                                    "pending_tokens"),
                                   ("lm_lag_seconds", "Wall seconds from reading the oldest conversation of the last "
                                    "step to its update: grows while the learner cannot keep up.", "lag_seconds")):
        gauge = GaugeMetricFamily(PREFIX + family, help_text, labels=["model"])
        for name, extra in lms:
            if extra[key] is not None:   # no loss before the first step
                gauge.add_metric([name], float(extra[key]))
        yield gauge
    capability = GaugeMetricFamily(PREFIX + "lm_capability_score", "A capability set's score at the learner's latest "
                                   "evaluation (exact match share, or minus the loss per token).",
                                   labels=["model", "capability"])
    forgetting = GaugeMetricFamily(PREFIX + "lm_capability_forgetting", "How far a capability's latest score lies "
                                   "below its best so far.", labels=["model", "capability"])
    for name, extra in lms:
        tokens.add_metric([name, "new"], extra["tokens_learned"])
        tokens.add_metric([name, "replayed"], extra["tokens_replayed"])
        for label, scores in extra["capabilities"].items():   # configured names: a bounded label
            capability.add_metric([name, label], scores["last"])
            forgetting.add_metric([name, label], scores["forgetting"])
    yield from (tokens, capability, forgetting)


def _drift_actions(learners: list[ModelEvaluation]) -> CounterMetricFamily:
    """drift_actions_total{model,kind,action}: what each model's drift policy did (kinds and actions: fixed names)."""
    actions = CounterMetricFamily(PREFIX + "drift_actions", "Drift policy actions by how the case ended and what "
                                  "was done.", labels=["model", "kind", "action"])
    for learner in learners:
        for (kind, action), n in sorted(learner.policy.counts.items()):
            actions.add_metric([learner.name, kind, action], n)
    return actions


def _histogram(name: str, documentation: str, series: list[tuple[tuple[str, ...], HistogramState]],
               labels: list[str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, documentation, labels=labels)
    for label_values, state in series:
        cumulative, buckets = 0, []
        for bound, count in zip(list(state.bounds) + [math.inf], state.counts):
            cumulative += count
            buckets.append((_bound_text(bound), cumulative))
        family.add_metric(list(label_values), buckets, state.total)
    return family


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))

