"""Deterministic simulated production traffic: inference logs and delayed feedback with drift.

A fraud model's serving system logs every prediction; labels arrive later, some
never. The concept comes from River's SEA stream and changes abruptly once
(`drift_at`). A small share of extra messages is malformed, each with the
dead-letter reason the service must give it. Same spec, same bytes.

A `shadow` model (a second model the serving system runs on every request) gets
a copy of each valid log and feedback, its request id suffixed `/<shadow>`: both
models see the same examples, and the base model's messages are unchanged.

>>> generator = TrafficGenerator(TrafficSpec(requests=200))
>>> messages = list(generator.messages())
>>> generator.totals.requests, len(messages) == sum(generator.totals.sent.values())
(200, True)
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import orjson
from river.datasets import synth

from streamlearn.stream.events import FEEDBACK_TOPIC, INFERENCE_TOPIC

MALFORMED_REASONS = ("invalid_json", "not_object", "schema", "non_finite", "too_large", "unknown_model")
CHANNELS = ("web", "app", "pos")


@dataclass(frozen=True)
class TrafficSpec:
    requests: int = 20_000          # inference requests (each one inference-log message)
    seed: int = 42
    drift_at: float = 0.5           # fraction of requests after which the concept changes
    missing_feedback: float = 0.10  # share of requests whose feedback never arrives
    malformed_rate: float = 0.01    # extra malformed messages, as a share of valid ones
    mean_label_delay: float = 30.0  # seconds of event time, exponential
    request_rate: float = 50.0      # requests per second of event time
    start_ts: float = 1_763_800_000.0
    model: str = "fraud"
    max_message_bytes: int = 65_536  # too_large messages are just over this
    shadow: str = ""                 # a second model logged on every request too ("": none)


@dataclass(frozen=True)
class Message:
    topic: str                # "inference-logs" or "feedback"
    key: Optional[bytes]      # the request id
    value: bytes              # exactly what is produced
    ts: float                 # event time it is emitted at (the ordering key)
    malformed: Optional[str]  # the dead-letter reason the service must give it, or None


@dataclass
class TrafficTotals:
    sent: dict[str, int] = field(default_factory=lambda: {INFERENCE_TOPIC: 0, FEEDBACK_TOPIC: 0})
    malformed: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    feedback: int = 0
    drift_ts: float = 0.0     # event time of the first request after the drift


class TrafficGenerator:
    """Yields the messages of one simulated day of traffic, in event-time order."""

    def __init__(self, spec: TrafficSpec) -> None:
        self.spec = spec
        self.totals = TrafficTotals(drift_ts=spec.start_ts + int(spec.requests * spec.drift_at) / spec.request_rate)

    def messages(self) -> Iterator[Message]:
        spec = self.spec
        rng = random.Random(spec.seed)
        concept = _abrupt_drift(int(spec.requests * spec.drift_at), spec.seed)
        pending: list[tuple[float, int, bytes, bytes]] = []  # feedback waiting for its event time
        for i, (x, y) in zip(range(spec.requests), concept):
            ts = spec.start_ts + i / spec.request_rate
            while pending and pending[0][0] <= ts:
                yield from self._emit(rng, *self._feedback(heapq.heappop(pending)))
            rid = f"r-{i:07d}"
            yield from self._emit(rng, INFERENCE_TOPIC, rid.encode(), self._log(rng, rid, ts, x), ts)
            self.totals.requests += 1
            if rng.random() >= spec.missing_feedback:
                label_ts = ts + rng.expovariate(1.0 / spec.mean_label_delay)
                feedback = {"request_id": rid, "ts": round(label_ts, 3), "label": int(y),
                            "source": "explicit", "weight": 1.0}
                heapq.heappush(pending, (label_ts, i, rid.encode(), orjson.dumps(feedback)))
        while pending:
            yield from self._emit(rng, *self._feedback(heapq.heappop(pending)))

    def _feedback(self, item: tuple[float, int, bytes, bytes]) -> tuple[str, bytes, bytes, float]:
        self.totals.feedback += 1
        label_ts, _, key, value = item
        return FEEDBACK_TOPIC, key, value, label_ts

    def _log(self, rng: random.Random, rid: str, ts: float, x: dict) -> bytes:
        features = {"x1": round(x[0], 4), "x2": round(x[1], 4), "x3": round(x[2], 4),
                    "channel": rng.choice(CHANNELS), "hour": datetime.fromtimestamp(ts, timezone.utc).hour}
        if rng.random() < 0.01:
            features["x3"] = None  # a missing value, as real feature pipelines produce
        fraud = x[0] + x[1] > 8.0  # the production model: the concept as it was at training time
        p = 0.85 if fraud else 0.1
        return orjson.dumps({"request_id": rid, "ts": round(ts, 3), "model": self.spec.model, "model_version": "1",
                             "features": features, "prediction": int(fraud),
                             "proba": {"0": round(1 - p, 3), "1": round(p, 3)}})

    def _emit(self, rng: random.Random, topic: str, key: bytes, value: bytes, ts: float) -> Iterator[Message]:
        self.totals.sent[topic] += 1
        yield Message(topic, key, value, ts, None)
        if self.spec.shadow:   # draws nothing from rng: the base model's traffic stays byte for byte the same
            self.totals.sent[topic] += 1
            yield self._shadowed(topic, key, value, ts)
        if rng.random() < self.spec.malformed_rate:
            yield self._malformed(rng, topic, key, value, ts)

    def _shadowed(self, topic: str, key: bytes, value: bytes, ts: float) -> Message:
        """The same log or feedback for the shadow model, under its own request id."""
        event = orjson.loads(value)
        rid = f"{event['request_id']}/{self.spec.shadow}"
        event["request_id"] = rid
        if topic == INFERENCE_TOPIC:
            event["model"] = self.spec.shadow
        return Message(topic, rid.encode(), orjson.dumps(event), ts, None)

    def _malformed(self, rng: random.Random, topic: str, key: bytes, value: bytes, ts: float) -> Message:
        reasons = MALFORMED_REASONS if topic == INFERENCE_TOPIC else MALFORMED_REASONS[:-1]
        reason = rng.choice(reasons)
        self.totals.sent[topic] += 1
        self.totals.malformed[reason] = self.totals.malformed.get(reason, 0) + 1
        return Message(topic, key, _corrupt(value, reason, topic, self.spec.max_message_bytes), ts, reason)


def _abrupt_drift(position: int, seed: int) -> Iterator[tuple[dict, bool]]:
    """SEA's first concept for `position` samples, then its fourth: one abrupt drift.

    (River's ConceptDriftStream overflows `math.exp` for width=1 far from the
    drift point, and a wide sigmoid blurs the "just before the drift" moment.)
    """
    before = synth.SEA(variant=0, seed=seed)
    after = synth.SEA(variant=3, seed=seed + 1)
    return itertools.chain(itertools.islice(before, position), after)


def _corrupt(value: bytes, reason: str, topic: str, max_bytes: int) -> bytes:
    """A broken variant of a valid message that fails for exactly `reason`."""
    event = orjson.loads(value)
    if reason == "invalid_json":
        return value[: len(value) // 2]
    if reason == "not_object":
        return orjson.dumps([event])
    if reason == "schema":
        del event["request_id"]
        return orjson.dumps(event)
    if reason == "non_finite":
        field_name = "weight" if topic == FEEDBACK_TOPIC else "ts"
        return value.replace(f'"{field_name}":'.encode(), f'"{field_name}":1e999,"_was":'.encode(), 1)
    if reason == "too_large":
        event["padding"] = "x" * max_bytes
        return orjson.dumps(event)
    event["model"] = "no-such-model"
    return orjson.dumps(event)


def write_jsonl(messages: Iterable[Message], path: str | Path) -> None:
    """Writes each message's bytes as one line: the file source's format."""
    with Path(path).open("wb") as out:
        for message in messages:
            out.write(message.value + b"\n")
