"""Feedback-to-learned latency of the service at a fixed offered rate, split by stage.

Real-time traffic goes to the embedded broker (2 partitions per topic): each request's
inference log at its event time, its feedback `FEEDBACK_DELAY` seconds later at the
feedback's event time, as a serving system and its users would. The service (confluent-kafka,
intake process) learns it; every example's latency is the feedback's event time to the end
of the learning of its batch. The split by stage comes from the service's own
`streamlearn_stage_seconds` histograms (what /metrics exports): kafka, join, batch, handoff,
queue, learn (see `streamlearn.stream.intake.INTAKE_STAGES`, `streamlearn.service.LEARNER_STAGES`).
Each run gets a fresh broker, once with the default settings and once with the low-latency
setting (`LOW_LATENCY`, the README's table).

    .venv/bin/python bench/latency.py [--rate 5000] [--seconds 10] [--setting both|default|low] [--repeat 1]

Prints a table per run, then one JSON line with the headline figures (of the last run of each setting).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from streamlearn.config import parse_config
from streamlearn.service import Service
from streamlearn.stream.broker import EmbeddedBroker
from streamlearn.telemetry.histogram import Histogram, HistogramState

FEEDBACK_DELAY = 0.2  # seconds between a request and its label
LATENCY_TAIL_SECONDS = 5.0   # traffic goes on this long past the measured examples (no end of input)
TOPICS = ("inference-logs", "feedback")
STAGES = ("kafka", "join", "batch", "handoff", "queue", "learn")
# The documented low-latency setting (README "Low latency"): hand batches over within 2 ms, at most 200 examples
# each (a burst is learned in several short turns), and a fetch held at most 20 ms by a broker with nothing new.
# (On the embedded broker 5 ms was worse, not better: its fetches cost CPU that grows with the topic, and at
# 5 ms it saturated a core and fell behind within seconds; 10 ms: p99 69 ms, 20 ms: 53-63 ms.)
LOW_LATENCY = {"intake": {"max_wait": 0.002, "batch_size": 200}, "kafka": {"fetch_wait_ms": 20}}
SETTINGS = {"default": {}, "low": LOW_LATENCY}


@dataclass
class LatencyRun:
    """One latency run: every measured example's latency (seconds, sorted) and the stage histograms."""

    setting: str
    latencies: list[float]
    stages: dict[str, HistogramState] = field(default_factory=dict)
    in_order: list[float] = field(default_factory=list)   # the latencies in learning order

    def quantile(self, q: float) -> float:
        return self.latencies[min(len(self.latencies) - 1, int(len(self.latencies) * q))]

    def stage(self, name: str, q: float) -> float:
        """A stage's quantile, estimated from its histogram buckets (as PromQL's histogram_quantile)."""
        state = self.stages.get(name)
        return Histogram.from_state(state).quantile(q) if state is not None else float("nan")


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s values put in, table by table (nested tables merged too)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def latency_config(bootstrap: str, overrides: dict):
    """The service's config for a latency run: the bench's usual one, with a setting's tables merged in."""
    table = {
        "kafka": {"bootstrap_servers": bootstrap, "client": "confluent-kafka", "group_id": f"bench-{uuid.uuid4().hex[:8]}",
                  "session_timeout_ms": 6000, "examples_topic": ""},
        "intake": {"mode": "process"},
        "models": {"default": {"model": "scaled_logreg"}},
        "metrics": {"enabled": False},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-bench-"),
    }
    return parse_config(merged(table, overrides), env={})


def offered_load(bootstrap: str, rate: float, seconds: float, seed: int) -> None:
    """Runs in its own process: real-time traffic at `rate` examples/s.

    Each request's log is produced at its event time and its feedback `FEEDBACK_DELAY`
    seconds later, at the feedback's event time, as a serving system and its users would.
    """
    from confluent_kafka import Producer
    from throughput import _produce, encode_pair, make_examples

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
    examples = make_examples(int(rate * seconds), seed)
    started = time.time() + 0.1
    waiting: deque[tuple[float, str, bytes]] = deque()  # feedback due later, in due order
    for i, (rid, x, y) in enumerate(examples):
        due = started + i / rate
        _sleep_until(due)
        while waiting and waiting[0][0] <= due:
            _, key, value = waiting.popleft()
            _produce(producer, "feedback", key, value)
        log, feedback = encode_pair(rid, x, y, due, FEEDBACK_DELAY)
        _produce(producer, "inference-logs", rid, log)
        waiting.append((due + FEEDBACK_DELAY, rid, feedback))
        producer.poll(0)
    for due, key, value in waiting:
        _sleep_until(due)
        _produce(producer, "feedback", key, value)
    producer.flush()


def _sleep_until(due: float) -> None:
    while (now := time.time()) < due:
        time.sleep(min(0.001, due - now))


def loop_latency(bootstrap: str, rate: float, seconds: float, setting: str = "default",
                 extra: dict | None = None) -> LatencyRun:
    """Feedback event time -> model updated, for every example, at a fixed offered rate; and the stage split.

    `extra`: config tables merged over the setting's (to try a variant).
    """
    run = LatencyRun(setting, [])
    total = int(rate * seconds)
    service = Service(latency_config(bootstrap, merged(SETTINGS[setting], extra or {})))
    # Traffic goes on past the measured examples, as a live service sees it (no end of input).
    producer = mp.get_context("spawn").Process(
        target=offered_load, args=(bootstrap, rate, seconds + LATENCY_TAIL_SECONDS, 7), daemon=True)

    def on_batch(svc: Service, batch) -> None:
        now = time.time()
        if len(run.latencies) < total:
            run.latencies.extend(now - ex.label_ts for ex in batch.examples[:total - len(run.latencies)])
            run.stages = svc.stage_states()   # as of the last measured batch
        if svc.stats is not None and svc.stats.assigned and not producer.is_alive() and producer.exitcode is None:
            producer.start()  # start offering load once the group has its partitions

    try:
        service.run(until=lambda s: s.learned >= total, on_batch=on_batch)
    finally:
        if producer.is_alive():
            producer.terminate()
        if producer.exitcode is not None or producer.is_alive():
            producer.join()
    run.in_order = list(run.latencies)
    run.latencies.sort()
    return run


def measured(rate: float, seconds: float, setting: str, extra: dict | None = None) -> LatencyRun:
    """One run on a fresh broker (a new group would otherwise read an earlier run's traffic from the start)."""
    with EmbeddedBroker() as broker:
        broker.create_topics(TOPICS, partitions=2)
        return loop_latency(broker.bootstrap_servers, rate, seconds, setting, extra)


def print_run(run: LatencyRun, rate: float) -> None:
    print(f"{run.setting} setting, {rate:,.0f} examples/s offered, {len(run.latencies):,} examples: "
          f"end to end p50 {run.quantile(0.5) * 1000:.1f} ms, p99 {run.quantile(0.99) * 1000:.1f} ms")
    fifth = max(1, len(run.in_order) // 5)
    first, last = sorted(run.in_order[:fifth]), sorted(run.in_order[-fifth:])
    print(f"  first fifth of the examples: p50 {first[len(first) // 2] * 1000:.1f} ms, p99 "
          f"{first[int(len(first) * 0.99)] * 1000:.1f} ms; last fifth: p50 {last[len(last) // 2] * 1000:.1f} ms, p99 "
          f"{last[int(len(last) * 0.99)] * 1000:.1f} ms (a rise: the embedded broker slowing down as its topics grow)")
    print(f"  {'stage':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'examples':>9}")
    for name in STAGES:
        state = run.stages.get(name)
        count = sum(state.counts) if state is not None else 0
        mean = state.total / count * 1000 if count else float("nan")
        print(f"  {name:<8} {run.stage(name, 0.5) * 1000:>8.1f} {run.stage(name, 0.99) * 1000:>8.1f} {mean:>8.1f} "
              f"{count:>9,}")


def figures(run: LatencyRun, prefix: str) -> dict[str, float]:
    """The JSON keys of one run: end-to-end and per-stage p50/p99 in ms."""
    out = {f"{prefix}p50_ms": round(run.quantile(0.5) * 1000, 1), f"{prefix}p99_ms": round(run.quantile(0.99) * 1000, 1)}
    for name in STAGES:
        out[f"{prefix}{name}_p50_ms"] = round(run.stage(name, 0.5) * 1000, 2)
        out[f"{prefix}{name}_p99_ms"] = round(run.stage(name, 0.99) * 1000, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5_000.0, help="offered examples/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of measured traffic per run")
    parser.add_argument("--setting", choices=("both", "default", "low"), default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting (interleaved)")
    parser.add_argument("--extra", type=json.loads, default={}, help="config tables (JSON) merged over each setting, "
                        "e.g. '{\"intake\": {\"max_wait\": 0.001}}'")
    args = parser.parse_args()
    settings = ("default", "low") if args.setting == "both" else (args.setting,)
    last: dict[str, LatencyRun] = {}
    for _ in range(args.repeat):
        for setting in settings:
            last[setting] = run = measured(args.rate, args.seconds, setting, args.extra)
            print_run(run, args.rate)
    out: dict[str, float] = {"offered_rate": args.rate}
    for setting, run in last.items():
        out.update(figures(run, "latency_" if setting == "default" else "latency_low_"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
