"""What bounds the service on the Kafka path: the bare consume, the intake alone, and a loop with no guarantees.

Three reference rows for `throughput.py`, each on the backlog it produced (logs and feedback, two
partitions each), each in examples/s at two messages per example, counted from the first example to
95% of the backlog as the service's own figure is:

- **bare consume**: the same client (confluent-kafka) with the intake's consumer settings, batch
  `consume`, no decoding: the physical limit of reading two topics on this machine.
- **intake alone**: the service's intake process (consume, decode and validate, join, hand-off over
  the socket, the batch decoded in the learner's process) with no learner behind it.
- **dict join loop**: what a user could write in twenty lines: one consumer, `orjson.loads`, a dict
  join by request id, the same River model test-then-train, offsets auto-committed. It keeps
  nothing across a restart, has no watermark, no dead letters and no bound on what it holds.

    >>> from limits import steady_rate
    >>> steady_rate([(0.0, 0), (1.0, 500), (2.0, 1000)], 1000)
    500.0
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

import orjson

from streamlearn.config import Config
from streamlearn.learners.models import build_model
from streamlearn.stream.channel import start_intake
from streamlearn.stream.kafka_source import (FETCH_MAX_BYTES, FETCH_QUEUE_BACKOFF_MS, FETCH_WAIT_MS, PREFETCH_KBYTES,
                                              PREFETCH_MESSAGES)

STEADY_SHARE = 0.95
CONSUME_BATCH = 10_000
IDLE_GIVE_UP = 30.0   # seconds without a message before a reference run says the backlog is short


def steady_rate(marks: list[tuple[float, int]], total: int) -> float:
    """Examples/s between the first mark and the first one at 95% of `total` ((time, count) pairs)."""
    t0, n0 = marks[0]
    t1, n1 = next((t, n) for t, n in marks if n >= STEADY_SHARE * total)
    return (n1 - n0) / (t1 - t0)


def _consumer(bootstrap: str, topics: tuple[str, ...], auto_commit: bool = False):
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": auto_commit,
        "fetch.wait.max.ms": FETCH_WAIT_MS, "queued.max.messages.kbytes": PREFETCH_KBYTES,
        "queued.min.messages": PREFETCH_MESSAGES, "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        "fetch.max.bytes": FETCH_MAX_BYTES,
    })
    consumer.subscribe(list(topics))
    return consumer


def _consume_until(consumer, enough: Callable[[], bool], each: Callable[[object], None]) -> None:
    last = time.monotonic()
    while not enough():
        messages = consumer.consume(CONSUME_BATCH, 0.5)
        if messages:
            last = time.monotonic()
        elif time.monotonic() - last > IDLE_GIVE_UP:
            raise RuntimeError("the backlog ended before the reference run counted it all")
        for message in messages:
            if message.error() is None:
                each(message)


def bare_consume(bootstrap: str, topics: tuple[str, str], total: int) -> float:
    """Examples/s (two messages each) that the client alone reads from the two topics, no decoding."""
    consumer = _consumer(bootstrap, topics)
    count = [0]
    marks: list[tuple[float, int]] = []

    def each(message) -> None:
        count[0] += 1
        if count[0] % 1000 == 0:
            marks.append((time.perf_counter(), count[0] // 2))

    try:
        _consume_until(consumer, lambda: count[0] >= 2 * total, each)
    finally:
        consumer.close()
    return steady_rate(marks, total)


def intake_alone(config: Config, total: int) -> float:
    """Examples/s the intake (process mode, as configured) hands over with no learner behind it."""
    channel = start_intake(config)
    marks: list[tuple[float, int]] = []
    taken, stopped = 0, False
    try:
        for batch in channel.batches():   # after the stop, up to the intake's final batch
            if batch.examples:
                taken += len(batch.examples)
                marks.append((time.perf_counter(), taken))
            if batch.final:   # answered at once: the intake waits for this before it exits
                channel.commit(batch.offsets, final=True)
            elif taken >= total and not stopped:
                channel.request_stop()
                stopped = True
    finally:
        channel.close()
    return steady_rate(marks, total)


def dict_join_loop(bootstrap: str, topics: tuple[str, str], total: int, model_name: str) -> float:
    """Examples/s of the hand-written loop: dict join by request id, test-then-train, auto-commit."""
    logs_topic, _ = topics
    consumer = _consumer(bootstrap, topics, auto_commit=True)
    model = build_model(model_name, "classification", {}, seed=42)
    waiting: dict[str, dict] = {}   # request id -> the other half (a log's features, or a label)
    learned = [0]
    marks: list[tuple[float, int]] = []

    def each(message) -> None:
        event = orjson.loads(message.value())
        rid = event["request_id"]
        other = waiting.pop(rid, None)
        if other is None:
            waiting[rid] = event
            return
        log, feedback = (event, other) if message.topic() == logs_topic else (other, event)
        model.predict_proba_one(log["features"])
        model.learn_one(log["features"], feedback["label"])
        learned[0] += 1
        if learned[0] % 500 == 0:
            marks.append((time.perf_counter(), learned[0]))

    try:
        _consume_until(consumer, lambda: learned[0] >= total, each)
    finally:
        consumer.close()
    return steady_rate(marks, total)
