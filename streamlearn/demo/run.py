"""`streamlearn demo`: the embedded default, from an empty machine to a summary.

It starts the embedded broker, creates the topics and, once the service reads
them, plays a production fraud model's traffic (concept drift halfway, feedback
delayed and ~10% missing, ~1% malformed messages) into it from a producer
thread, with a live progress line, and summarizes what happened. Two models
learn the same requests side by side: `fraud` (River logistic regression) and
`fraud_mlp` (a torch `mlp`, logged as a shadow model on every request).

The traffic's event time is the wall clock: its first request is stamped when
the demo starts playing and the requests follow at `rate` a second, so what
`/metrics` says (`loop_latency_seconds`: feedback's event time to model updated)
is true. The wall clock only stamps the traffic; what is learned follows the
stamps, so `--start-ts` (fixed event times) or a `--record`ed file replayed with
the file source learns the same models on every run.
"""

from __future__ import annotations

import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from streamlearn.config import Config, parse_config
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec, write_jsonl
from streamlearn.learners.evaluation import ModelEvaluation
from streamlearn.records import Batch
from streamlearn.service import Service
from streamlearn.stream.broker import EmbeddedBroker

MODEL = "fraud"
TORCH_MODEL = "fraud_mlp"
TOPICS = ("inference-logs", "feedback")  # the demo's serving system sends no pre-joined examples
PROGRESS_SECONDS = 1.0
BACKLOG_RATE = 2_000.0     # requests per event-time second when played as fast as possible (--rate 0)
MARKS = {"old": "*", "both": "~", "new": ""}   # how the summary marks a probe segment's concept
LABEL_TAIL = 20            # mean label delays after the last request by which (nearly) all feedback is in


@dataclass(frozen=True)
class DemoOptions:
    requests: int = 20_000
    seed: int = 42
    metrics_port: int = 9108
    rate: float = 2_000.0            # requests per second, of wall time and of event time (0: as fast as possible)
    record: Optional[Path] = None    # also write the traffic as JSONL, for the file source
    progress: bool = True
    torch: bool = True               # also learn a torch mlp on the same requests
    start_ts: Optional[float] = None  # event time of the first request (None: the wall clock when playing starts)
    label_delay: float = 0.5         # mean seconds from a request to its feedback (exponential)


def demo_spec(options: DemoOptions, now: float) -> TrafficSpec:
    """The traffic of a demo that starts playing at wall time `now`.

    Event time runs at the wall clock's pace from `now` (or from `options.start_ts`, which makes the
    bytes independent of when the demo runs). Played as fast as possible (`rate = 0`), the traffic is a
    backlog: its event times end when the demo starts, and the latency shows how old it was when learned.
    """
    rate = options.rate if options.rate > 0 else BACKLOG_RATE
    start = options.start_ts
    if start is None:
        span = options.requests / rate + LABEL_TAIL * options.label_delay
        start = now if options.rate > 0 else now - span
    return TrafficSpec(requests=options.requests, seed=options.seed, model=MODEL, request_rate=rate,
                       mean_label_delay=options.label_delay, start_ts=start,
                       shadow=TORCH_MODEL if options.torch else "")


def demo_config(bootstrap: str, options: DemoOptions, state_dir: str) -> Config:
    """The service configuration the demo runs with (also what a user's config.toml would say).

    Its event-time settings fit a stream of seconds, not days: evaluation segments of 2,000 examples
    (50 probes each, scored every 1,000) give several segments, hence a forgetting figure; the drift
    policy confirms a change after 2 s of event time instead of 120 s. Its state is a temporary folder
    thrown away at the end, so it keeps no snapshots; the stop then learns the torch model's last
    partial micro-batch instead of keeping it queued for a restart.
    """
    models = {MODEL: {"model": "logreg", "window": 1000}}
    if options.torch:
        models[TORCH_MODEL] = {"model": "mlp", "window": 1000}
    return parse_config({
        "seed": options.seed,
        "state_dir": state_dir,
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "streamlearn-demo", "session_timeout_ms": 6000,
                  "examples_topic": ""},
        "join": {"ttl": 10.0, "early_ttl": 2.0, "max_pending": 100_000},
        "intake": {"max_message_bytes": TrafficSpec.max_message_bytes},
        "snapshot": {"enabled": False},
        "eval": {"segment_size": 2_000, "probe_size": 50, "every": 1_000},
        "drift": {"policy": {"confirm_seconds": 2.0}},
        "models": models,
        "metrics": {"host": "127.0.0.1", "port": options.metrics_port},
    }, env={})


def run_demo(options: DemoOptions) -> dict:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamlearn-demo-") as state_dir:
        broker.create_topics(TOPICS, partitions=2)
        broker.create_topics([t + ".dlq" for t in TOPICS], partitions=1)
        service = Service(demo_config(broker.bootstrap_servers, options, state_dir))
        player = TrafficPlayer(broker.bootstrap_servers, options)
        progress = ProgressLine(enabled=options.progress)
        metrics = service.start_metrics()
        if options.progress:
            where = f"http://127.0.0.1:{metrics.port}/metrics" if metrics else "disabled"
            print(f"broker {broker.bootstrap_servers}, metrics {where}; playing {options.requests} requests "
                  f"to {', '.join(service.learners)} once the service reads", file=sys.stderr)
        try:
            summary = service.run(until=player.all_consumed, on_batch=_begin_then(player, progress.update))
        finally:
            player.stop()
            progress.close()
            service.close()
    return demo_summary(summary, service, player)


def _begin_then(player: "TrafficPlayer", update: Callable[[Service, Batch], None]) -> Callable[[Service, Batch], None]:
    """The loop's batch hook: starts the traffic once the service reads its partitions, then `update`."""
    def on_batch(service: Service, batch: Batch) -> None:
        if player.generator is None and service.stats is not None and service.stats.assigned:
            drift_ts = player.begin(time.time()).totals.drift_ts
            for learner in service.learners.values():
                learner.evaluation.mark_score_at(drift_ts)
        update(service, batch)
    return on_batch


class TrafficPlayer(threading.Thread):
    """Produces the simulated traffic into the broker, each message when the wall clock reaches its event time."""

    def __init__(self, bootstrap: str, options: DemoOptions) -> None:
        super().__init__(name="demo-traffic", daemon=True)
        self.bootstrap = bootstrap
        self.options = options
        self.generator: Optional[TrafficGenerator] = None   # fixed by `begin`
        self.sent = 0
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._halt = threading.Event()

    def begin(self, now: float) -> TrafficGenerator:
        """Fixes the traffic's event times (from wall time `now`, or the options' start) and starts playing."""
        self.generator = TrafficGenerator(demo_spec(self.options, now))
        self.start()
        return self.generator

    def run(self) -> None:
        try:
            self._play()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread by all_consumed
            self.error = error
        finally:
            self.done.set()

    def _play(self) -> None:
        from confluent_kafka import Producer

        spec = self.generator.spec
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5,
                             "message.max.bytes": 4 * spec.max_message_bytes})
        record, recorded = self.options.record, []
        paced = self.options.rate > 0   # event seconds are wall seconds; otherwise as fast as possible
        started = time.monotonic()
        for message in self.generator.messages():
            ahead = started + (message.ts - spec.start_ts) - time.monotonic() if paced else 0.0
            if ahead > 0.005:
                producer.poll(0)
                self._halt.wait(ahead)
            if self._halt.is_set():
                break
            while True:
                try:
                    producer.produce(message.topic, value=message.value, key=message.key)
                    break
                except BufferError:
                    producer.poll(0.01)
            self.sent += 1
            if record is not None:
                recorded.append(message)
        producer.flush()
        if record is not None:
            write_jsonl(recorded, record)

    def stop(self) -> None:
        self._halt.set()
        if self.generator is not None:   # started
            self.join(30)

    def all_consumed(self, service: Service) -> bool:
        """Every message sent has been consumed, and the join has released everything it can."""
        if self.error is not None:
            raise RuntimeError(f"demo traffic failed: {self.error!r}") from self.error
        stats = service.stats
        return (self.done.is_set() and stats is not None and stats.caught_up
                and sum(stats.events.values()) >= self.sent)


class ProgressLine:
    """One live line on stderr: events/s, each model's rolling accuracy, join outcomes, dead letters."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = time.monotonic()
        self._last_events = 0

    def update(self, service: Service, batch: Batch) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < PROGRESS_SECONDS or service.stats is None:
            return
        stats = service.stats
        events = sum(stats.events.values())
        rate = (events - self._last_events) / (now - self._last)
        self._last, self._last_events = now, events
        accuracy = "  ".join(f"{name} {learner.evaluation.scores.value('accuracy', rolling=True):5.3f}"
                             for name, learner in service.learners.items())
        sys.stderr.write(
            f"\r{events:>8} events {rate:>7,.0f} ev/s  learned {service.learned:>7}  rolling accuracy {accuracy}  "
            f"matched {stats.join.get('matched', 0):>7}  dead letters {sum(stats.dead_letters.values()):>4}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def demo_summary(summary: dict, service: Service, player: TrafficPlayer) -> dict:
    """What the demo prints: the traffic sent, what became of it, and each model's figures."""
    generator = player.generator or TrafficGenerator(demo_spec(player.options, time.time()))  # none if stopped early
    totals = generator.totals
    join = summary["join"]
    valid = {t: n.get("ok", 0) for t, n in summary["events"].items()}
    accounted = (2 * join.get("matched", 0) + 2 * join.get("invalid_label", 0) + summary["join_pending"]
                 + sum(join.get(k, 0) for k in ("expired", "expired_feedback", "late", "duplicate", "evicted")))
    return {
        "requests": totals.requests,
        "request_rate": generator.spec.request_rate,
        "messages_sent": player.sent,
        "feedback_sent": totals.feedback,
        "malformed_sent": dict(sorted(totals.malformed.items())),
        "dead_letters": summary["dead_letters"],
        "join": join,
        "join_pending": summary["join_pending"],
        "join_balance": {"valid_inputs": valid.get("inference-logs", 0) + valid.get("feedback", 0),
                         "accounted": accounted},
        "learned": summary["learned"],
        "held_out": summary["held_out"],
        "drift_ts": totals.drift_ts,
        "traffic_start_ts": generator.spec.start_ts,
        "models": {name: model_figures(learner.evaluation, summary["models"][name], totals.drift_ts,
                                       _kind(service, name))
                   for name, learner in service.learners.items()},
        "elapsed_seconds": summary["elapsed_seconds"],
    }


def _kind(service: Service, name: str) -> str:
    """What a configured model is, in words: "logreg (River)", "mlp (torch)"."""
    model = service.config.models[name]
    return f"{model.model} ({'torch' if model.is_torch else 'River'})"


def model_figures(learner: ModelEvaluation, figures: dict, drift_ts: float, kind: str) -> dict:
    """One model's demo figures, from the service's summary of it and its latency histogram."""
    latency = learner.loop_latency
    return {
        "model": kind,
        "learned": figures["learned"],
        "held_out": figures.get("held_out", 0),
        "forgetting": _round(figures.get("forgetting")),
        "backward_transfer": _round(figures.get("backward_transfer")),
        "probe_segments": len(figures.get("probe_accuracy", {})),
        "forgetting_by_concept": forgetting_by_concept(learner, drift_ts),
        "accuracy_before_drift": _round(learner.score_at(drift_ts)),
        "accuracy_after_recovery": _round(learner.scores.value("accuracy", rolling=True)),
        "accuracy_overall": _round(learner.scores.value("accuracy", rolling=False)),
        "drift_detected": [{"detector": e.detector, "at_example": e.position} for e in learner.drift.last],
        "loop_latency_seconds": {"mean": _round(latency.total / latency.count if latency.count else math.nan),
                                 "p50": _round(latency.quantile(0.5)), "p99": _round(latency.quantile(0.99))},
    }


def forgetting_by_concept(learner: ModelEvaluation, drift_ts: float) -> dict:
    """Forgetting on the probe segments from before the drift ("old") and after it ("new"), and their accuracy.

    After the concept changes, the old segments' probes carry labels the new concept contradicts: a drop
    there is the drift, not lost knowledge; a drop on the new segments would be forgetting proper.
    """
    by: dict[str, list] = {"old": [], "new": []}
    accuracy = {}
    for segment in learner.probes.segments if learner.probes is not None else ():
        times = [ex.ts for ex in segment.probes]
        concept = "old" if max(times) < drift_ts else "new" if min(times) >= drift_ts else "both"
        accuracy[str(segment.number)] = {"concept": concept, "accuracy": _round(segment.now)}
        if concept in by and segment.best is not None:
            by[concept].append(segment.best - segment.now)
    return {"old": _round(sum(by["old"]) / len(by["old"])) if by["old"] else None,
            "new": _round(sum(by["new"]) / len(by["new"])) if by["new"] else None, "segments": accuracy}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) else round(value, 4)


def print_summary(result: dict) -> None:
    print("streamlearn demo: summary")
    print(f"  requests {result['requests']} at {result['request_rate']:,.0f}/s of event time, "
          f"messages sent {result['messages_sent']}, examples learned {result['learned']}, "
          f"held out as forgetting probes {result['held_out']}")
    for name, m in result["models"].items():
        latency = m["loop_latency_seconds"]
        detected = ", ".join(f"{d['detector']} at example {d['at_example']:,}" for d in m["drift_detected"])
        print(f"  {name} ({m['model']}): learned {m['learned']}")
        print(f"    rolling accuracy  before the drift {m['accuracy_before_drift']}, "
              f"at the end {m['accuracy_after_recovery']}")
        print(f"    forgetting        {m['forgetting']} over {m['probe_segments']} probe segments "
              f"(best earlier probe accuracy minus now; backward transfer {m['backward_transfer']})")
        by = m["forgetting_by_concept"]
        print("    probe accuracy    by segment: "
              + " ".join(f"{v['accuracy']}{MARKS[v['concept']]}" for v in by["segments"].values())
              + " (* before the drift, ~ across it)")
        print(f"    forgetting split  {by['old']} on segments before the drift (the new concept contradicts their "
              f"labels), {by['new']} on those after it")
        print(f"    drift detected    {detected or 'none'} (the traffic's concept changes halfway)")
        print(f"    loop latency      p50 {latency['p50']} s, p99 {latency['p99']} s, mean {latency['mean']} s "
              "(feedback's event time to model updated)")
    print(f"  malformed sent    {result['malformed_sent']}")
    print(f"  dead-lettered     {result['dead_letters']}")
    print(f"  join outcomes     {result['join']} (pending {result['join_pending']})")
    balance = result["join_balance"]
    print(f"  join balance      {balance['valid_inputs']} valid inputs, {balance['accounted']} accounted for")
    print(f"  took {result['elapsed_seconds']} s; run with --json for the full summary")
