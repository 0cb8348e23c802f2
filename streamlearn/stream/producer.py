"""Producing to Kafka through the configured client (confluent-kafka or kafka-python).

Used for dead letters and for `model-updates` events: the client choice and the
settings (SASL/TLS) are the consumer's, a full local queue makes `send` wait for
deliveries instead of dropping a message, and every delivery failure is counted
so that a caller can tell whether what it flushed really arrived.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

from streamlearn.config import KafkaConfig, Setting

log = logging.getLogger(__name__)
Headers = list[tuple[str, bytes]]
CLOSE_WAIT = 10.0   # seconds a closing producer waits for its deliveries


class Producer:
    """One Kafka producer of the configured client; `failures` counts messages that could not be delivered."""

    def __init__(self, config: KafkaConfig, settings: Mapping[str, Setting], what: str) -> None:
        self.what = what            # for log lines: "dead letter", "model update"
        self.failures = 0
        self.ends: dict[str, int] = {}   # "topic:partition" -> the offset after the last message delivered there
        self._confluent = config.client == "confluent-kafka"
        if self._confluent:
            from confluent_kafka import Producer as ConfluentProducer

            from streamlearn.stream.broker_watch import client_callbacks

            # Its log lines and errors through Python logging, one line per outage (served by poll and flush).
            self._watch, callbacks = client_callbacks(config.bootstrap_servers, f"{what} producer", stats=False)
            self._producer = ConfluentProducer({"bootstrap.servers": config.bootstrap_servers, "linger.ms": 50,
                                                **settings, **callbacks})
        else:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(bootstrap_servers=config.bootstrap_servers, linger_ms=50, **settings)

    def send(self, topic: str, value: bytes, key: Optional[bytes] = None, headers: Optional[Headers] = None) -> None:
        """Queues one message; one the client refuses outright (e.g. too large) is counted and logged, not raised."""
        try:
            if not self._confluent:
                future = self._producer.send(topic, value=value, key=key, headers=headers or [])
                future.add_callback(self._landed).add_errback(self._failed)
                return
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, headers=headers or [],
                                           on_delivery=self._delivered)
                    break
                except BufferError:  # the local queue is full: wait for deliveries rather than drop one
                    self._producer.poll(0.1)
            self._producer.poll(0)
        except Exception as err:   # KafkaException / KafkaError: the message cannot ever be sent as it is
            self._failed(err)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Blocks until everything sent is delivered or failed (or `timeout`); True when nothing is left queued."""
        if self._confluent:
            return self._producer.flush(*(() if timeout is None else (timeout,))) == 0
        try:
            self._producer.flush(timeout)
        except Exception as err:   # kafka-python raises on a flush timeout
            log.error("%s: flush failed: %s", self.what, err)
            return False
        return True

    def close(self) -> None:
        if not self.flush(CLOSE_WAIT):   # bounded: a broker that cannot be reached must not hold a shutdown
            log.error("%s: messages still undelivered after %.0f s at close (broker unreachable?)", self.what,
                      CLOSE_WAIT)
        # Stop the client now, not at garbage collection (older confluent-kafka has no close).
        if hasattr(self._producer, "close"):
            self._producer.close()

    def _delivered(self, err, msg=None) -> None:
        if err is None:
            self._watch.heard()   # a delivery is the broker answering: it ends an outage the watch said
        if err is not None:  # confluent calls back on success too, with err None
            self._failed(err)
        elif msg is not None:
            self._mark(msg.topic(), msg.partition(), msg.offset())

    def _landed(self, metadata) -> None:   # kafka-python's RecordMetadata
        self._mark(metadata.topic, metadata.partition, metadata.offset)

    def _mark(self, topic: str, partition: int, offset: int) -> None:
        key = f"{topic}:{partition}"
        if offset + 1 > self.ends.get(key, 0):
            self.ends[key] = offset + 1

    def _failed(self, err) -> None:
        self.failures += 1
        log.error("%s could not be produced: %s", self.what, err)
