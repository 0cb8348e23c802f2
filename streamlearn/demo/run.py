"""`streamlearn demo`: the embedded default, from an empty machine to a summary.

It starts the embedded broker, creates the topics, plays a production fraud
model's traffic (concept drift halfway, feedback delayed and ~10% missing, ~1%
malformed messages) into it from a producer thread, runs the service on it with
a live progress line, and summarizes what happened.
"""

from __future__ import annotations

import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from streamlearn.config import Config, parse_config
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec, write_jsonl
from streamlearn.records import Batch
from streamlearn.service import Service
from streamlearn.stream.broker import EmbeddedBroker

MODEL = "fraud"
TOPICS = ("inference-logs", "feedback")  # the demo's serving system sends no pre-joined examples
PROGRESS_SECONDS = 1.0


@dataclass(frozen=True)
class DemoOptions:
    requests: int = 20_000
    seed: int = 42
    metrics_port: int = 9108
    rate: float = 2_000.0           # requests per second of wall time (0: as fast as possible)
    record: Optional[Path] = None  # also write the traffic as JSONL, for the file source
    progress: bool = True


def demo_config(bootstrap: str, spec: TrafficSpec, metrics_port: int, seed: int, state_dir: str) -> Config:
    """The service configuration the demo runs with (also what a user's config.toml would say)."""
    return parse_config({
        "seed": seed,
        "state_dir": state_dir,
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "streamlearn-demo", "session_timeout_ms": 6000,
                  "examples_topic": ""},
        "join": {"ttl": 600.0, "early_ttl": 60.0, "max_pending": 100_000},
        "intake": {"max_message_bytes": spec.max_message_bytes},
        "models": {spec.model: {"model": "logreg", "window": 1000}},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    }, env={})


def run_demo(options: DemoOptions) -> dict:
    spec = TrafficSpec(requests=options.requests, seed=options.seed, model=MODEL)
    generator = TrafficGenerator(spec)
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamlearn-demo-") as state_dir:
        broker.create_topics(TOPICS, partitions=2)
        broker.create_topics([t + ".dlq" for t in TOPICS], partitions=1)
        player = TrafficPlayer(broker.bootstrap_servers, generator, options.rate, options.record)
        service = Service(demo_config(broker.bootstrap_servers, spec, options.metrics_port, options.seed, state_dir))
        service.learners[MODEL].mark_score_at(generator.totals.drift_ts)
        progress = ProgressLine(enabled=options.progress)
        metrics = service.start_metrics()
        if options.progress:
            where = f"http://127.0.0.1:{metrics.port}/metrics" if metrics else "disabled"
            print(f"broker {broker.bootstrap_servers}, metrics {where}; playing {spec.requests} requests",
                  file=sys.stderr)
        player.start()
        try:
            summary = service.run(until=player.all_consumed, on_batch=progress.update)
        finally:
            player.stop()
            progress.close()
            service.close()
    return demo_summary(summary, service, generator, player)


class TrafficPlayer(threading.Thread):
    """Produces the simulated traffic into the broker, paced at `rate` requests per second."""

    def __init__(self, bootstrap: str, generator: TrafficGenerator, rate: float, record: Optional[Path]) -> None:
        super().__init__(name="demo-traffic", daemon=True)
        self.bootstrap = bootstrap
        self.generator = generator
        # wall seconds per second of event time (the traffic's own clock runs at spec.request_rate)
        self.pace = generator.spec.request_rate / rate if rate > 0 else 0.0
        self.record = record
        self.sent = 0
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self._play()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread by all_consumed
            self.error = error
        finally:
            self.done.set()

    def _play(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 20,
                             "message.max.bytes": 4 * self.generator.spec.max_message_bytes})
        recorded = []
        started, start_ts = time.monotonic(), self.generator.spec.start_ts
        for message in self.generator.messages():
            ahead = started + (message.ts - start_ts) * self.pace - time.monotonic()
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
            if self.record is not None:
                recorded.append(message)
        producer.flush()
        if self.record is not None:
            write_jsonl(recorded, self.record)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def all_consumed(self, service: Service) -> bool:
        """Every message sent has been consumed, and the join has released everything it can."""
        if self.error is not None:
            raise RuntimeError(f"demo traffic failed: {self.error!r}") from self.error
        stats = service.stats
        return (self.done.is_set() and stats is not None and stats.caught_up
                and sum(stats.events.values()) >= self.sent)


class ProgressLine:
    """One live line on stderr: events/s, rolling accuracy, join outcomes, dead letters."""

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
        learner = service.learners[MODEL]
        accuracy = learner.scores.value("accuracy", rolling=True)
        sys.stderr.write(
            f"\r{events:>8} events  {rate:>8,.0f} ev/s  learned {learner.learned:>7}  "
            f"rolling accuracy {accuracy:6.3f}  matched {stats.join.get('matched', 0):>7}  "
            f"expired {stats.join.get('expired', 0):>5}  dead letters {sum(stats.dead_letters.values()):>4}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def demo_summary(summary: dict, service: Service, generator: TrafficGenerator, player: TrafficPlayer) -> dict:
    totals = generator.totals
    learner = service.learners[MODEL]
    join = summary["join"]
    valid = {t: n.get("ok", 0) for t, n in summary["events"].items()}
    accounted = (2 * join.get("matched", 0) + 2 * join.get("invalid_label", 0) + summary["join_pending"]
                 + sum(join.get(k, 0) for k in ("expired", "expired_feedback", "late", "duplicate", "evicted")))
    return {
        "requests": totals.requests,
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
        "forgetting": _round(learner.probes.forgetting),
        "accuracy_before_drift": _round(learner.score_at(totals.drift_ts)),
        "accuracy_after_recovery": _round(learner.scores.value("accuracy", rolling=True)),
        "accuracy_overall": _round(learner.scores.value("accuracy", rolling=False)),
        "drift_ts": totals.drift_ts,
        "drift_detected": [{"detector": e.detector, "at_example": e.position} for e in learner.drift.last],
        "elapsed_seconds": summary["elapsed_seconds"],
    }


def _round(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(value, 4)


def print_summary(result: dict) -> None:
    print("streamlearn demo: summary")
    print(f"  requests {result['requests']}, messages sent {result['messages_sent']}, "
          f"examples learned {result['learned']}, held out as forgetting probes {result['held_out']}")
    print(f"  rolling accuracy before the drift {result['accuracy_before_drift']}, "
          f"at the end {result['accuracy_after_recovery']}")
    print(f"  forgetting        {result['forgetting']} (best earlier probe accuracy minus now, recent segments)")
    detected = ", ".join(f"{d['detector']} at example {d['at_example']:,}" for d in result["drift_detected"])
    print(f"  drift detected    {detected or 'none'} (the traffic's concept changes halfway)")
    print(f"  malformed sent    {result['malformed_sent']}")
    print(f"  dead-lettered     {result['dead_letters']}")
    print(f"  join outcomes     {result['join']} (pending {result['join_pending']})")
    balance = result["join_balance"]
    print(f"  join balance      {balance['valid_inputs']} valid inputs, {balance['accounted']} accounted for")
    print(f"  took {result['elapsed_seconds']} s; run with --json for the full summary")
