"""Kafka sources: a consumer group with manual offsets, through either Kafka client.

`confluent-kafka` (librdkafka) is the default: on two messages per example the
client is the intake's main cost, and it delivers several times the messages per
second of `kafka-python`, which stays supported (`kafka.client = "kafka-python"`).

Offsets are never auto-committed: the service decides what is done. When
`start_offsets` are given (from a snapshot), an assigned partition starts there
instead of at the group's committed offset.

Given a `Share` (`intake.processes` > 1), a source takes no part in the group's
rebalancing: it assigns itself its share of the partitions (the same numbers of
every topic), looks again every `SHARE_REFRESH_SECONDS` for partitions added, and
commits to the group's offsets as a member would.

When the broker cannot be reached, the client keeps retrying and the source says so
once (`streamlearn.stream.broker_watch`); `problem()` puts it in words for `/readyz`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Mapping, Optional

from streamlearn.config import KafkaConfig, Setting
from streamlearn.stream.broker_watch import BrokerWatch, client_callbacks
from streamlearn.stream.source import Chunk, Share, position_key, split_position

log = logging.getLogger(__name__)
LAG_REFRESH_SECONDS = 5.0
# How long the broker may hold a fetch that has no new data. Both clients default to 500 ms,
# which the event-time watermark (the slowest partition) turns into ~0.5 s of extra loop latency.
FETCH_WAIT_MS = 100
# librdkafka prefetches up to 64 MB by default; a backlog fills all of it, an idle stream none. A quarter of
# that kept catch-up at the same speed here and keeps the intake's memory from growing with the backlog.
PREFETCH_KBYTES = 16_384
# ... and at most this many messages (librdkafka's default is 100,000). librdkafka keeps ~300 bytes of its own
# next to each queued message, more than a log or feedback message itself: the 16 MB of prefetch held ~130,000
# messages and ~55 MB of the intake's memory. 20,000 is half a second of catching up, refilled every 20 ms.
PREFETCH_MESSAGES = 20_000
# With the prefetch full, librdkafka puts off a partition's next fetch by `fetch.queue.backoff.ms` (1 s by default),
# and does not look again when the queue drains: a backlog caught up at half speed, the consumer waiting for that
# second after every prefetch it emptied (1M requests: 18.9k examples/s, 35k with 20 ms).
FETCH_QUEUE_BACKOFF_MS = 20
# A fetch response is held whole until the last of its messages is consumed, and partitions paused for running
# ahead in event time keep theirs: with the default 50 MB, responses of several MB each came and went, the intake
# swung by ~10 MB and grew 25-28% from a 100,000 to a 1,000,000-request backlog. 1 MB: +12%, catch-up as fast.
FETCH_MAX_BYTES = 1 << 20
SHARE_REFRESH_SECONDS = 30.0   # a source with a share looks this often for partitions added to its topics
METADATA_TIMEOUT = 1.0         # seconds one look at the topics' metadata may take (the poll waits for it)
NO_TIMESTAMP = float("nan")   # a message without a broker timestamp: the list stays one entry per message
def share_due(last_look: float, assigned: bool) -> bool:
    """Whether a source with a share looks at its topics' partitions again: every poll (a second apart at most)
    until it has some, then every `SHARE_REFRESH_SECONDS` for partitions added."""
    return time.monotonic() - last_look >= (SHARE_REFRESH_SECONDS if assigned else METADATA_TIMEOUT)


def kafka_topics(config: KafkaConfig) -> list[str]:
    return [t for t in (config.inference_topic, config.feedback_topic, config.examples_topic) if t]


def open_kafka_source(config: KafkaConfig, settings: Mapping[str, Setting],
                      start_offsets: Optional[Mapping[str, int]] = None, share: Optional[Share] = None):
    """Returns a subscribed source for the configured client (given a share: one assigned that share)."""
    kind = ConfluentSource if config.client == "confluent-kafka" else KafkaPythonSource
    return kind(config, settings, dict(start_offsets or {}), share)


class ConfluentSource:
    """Consumer group through librdkafka (confluent-kafka)."""

    def __init__(self, config: KafkaConfig, settings: Mapping[str, Setting], start: dict[str, int],
                 share: Optional[Share] = None) -> None:
        from confluent_kafka import Consumer

        self._start = start
        self._topics = kafka_topics(config)
        self._share = share
        self._share_at = -LAG_REFRESH_SECONDS   # monotonic time of the last look at the share's partitions
        self._assigned: set[str] = set()
        self._at_end: set[str] = set()   # partitions whose last word was an end-of-partition event
        self._lag: dict[tuple[str, int], int] = {}
        self._lag_at = 0.0
        self._warned: set[str] = set()
        self._watch, callbacks = client_callbacks(config.bootstrap_servers, "consumer")
        self._last_commit: list = []
        self._consumer = Consumer({
            "bootstrap.servers": config.bootstrap_servers, "group.id": config.group_id,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": config.session_timeout_ms,
            "heartbeat.interval.ms": max(100, config.session_timeout_ms // 3),
            "max.poll.interval.ms": config.max_poll_interval_ms,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "enable.partition.eof": True,   # the broker's word that a partition is caught up (see caught_up)
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
            "queued.min.messages": PREFETCH_MESSAGES,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            "fetch.max.bytes": FETCH_MAX_BYTES,
            **settings, **callbacks,
        })
        if share is None:
            self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        else:
            self._assign_share()

    def _assign_share(self) -> None:
        """Assigns the share's partitions not assigned yet (all of them at the first look that finds every topic)."""
        from confluent_kafka import OFFSET_STORED, KafkaException, TopicPartition

        self._share_at = time.monotonic()
        try:
            metadata = self._consumer.list_topics(timeout=METADATA_TIMEOUT)
        except KafkaException as err:
            self._warn(f"cannot read the topics' partitions yet: {err}")
            return
        counts = {}
        for topic in self._topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or not found.partitions:
                self._warn(f"topic {topic} not found: waiting for it to read this intake's share of its partitions")
                return
            counts[topic] = len(found.partitions)
        new = sorted(set(self._share.partitions(counts)) - self._assigned)
        if new:
            self._consumer.incremental_assign([TopicPartition(*split_position(key), self._start.get(key, OFFSET_STORED))
                                               for key in new])
            self._assigned.update(new)
            log.info("intake %d of %d reads %s", self._share.index + 1, self._share.count, ", ".join(new))

    def _on_assign(self, consumer, partitions) -> None:
        for tp in partitions:
            key = position_key(tp.topic, tp.partition)
            if key in self._start:
                tp.offset = self._start[key]
            self._assigned.add(key)
            self._at_end.discard(key)
        consumer.assign(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        for tp in partitions:
            self._assigned.discard(position_key(tp.topic, tp.partition))
            self._at_end.discard(position_key(tp.topic, tp.partition))

    def poll(self, max_records: int, timeout: float) -> list[Chunk]:
        if self._share is not None and share_due(self._share_at, bool(self._assigned)):
            self._assign_share()
        chunks: dict[tuple[str, int], Chunk] = {}
        where, chunk = None, None
        for msg in self._consumer.consume(max_records, timeout):
            if msg.error() is not None:
                self._error(msg)
                continue
            here = (msg.topic(), msg.partition())
            if here != where:  # messages come in runs per partition: look the chunk up once a run
                where, chunk = here, chunks.get(here)
                if chunk is None:
                    chunk = chunks[here] = Chunk(here[0], position_key(*here), [], [], 0, [])
                    self._at_end.discard(chunk.partition)
            chunk.values.append(msg.value() or b"")
            chunk.offsets.append(msg.offset())
            kind, millis = msg.timestamp()
            chunk.timestamps.append(millis / 1000 if kind else NO_TIMESTAMP)   # kind 0: TIMESTAMP_NOT_AVAILABLE
        for chunk in chunks.values():
            chunk.next_offset = chunk.offsets[-1] + 1
        if chunks:
            self._watch.heard()
        return list(chunks.values())

    def _error(self, msg) -> None:
        from confluent_kafka import KafkaError

        if msg.error().code() == KafkaError._PARTITION_EOF:   # not an error: the partition has no more for now
            self._at_end.add(position_key(msg.topic(), msg.partition()))
        else:
            self._warn(str(msg.error()))

    def problem(self) -> str:
        return self._watch.problem()

    def partitions(self) -> list[str]:
        return sorted(self._assigned)

    def exhausted(self) -> bool:
        return False

    def caught_up(self) -> set[str]:
        return self._at_end & self._assigned

    def pause(self, keys: set[str]) -> None:
        if keys := keys & self._assigned:
            self._consumer.pause(_topic_partitions(keys))

    def resume(self, keys: set[str]) -> None:
        if keys := keys & self._assigned:
            self._consumer.resume(_topic_partitions(keys))

    def commit(self, offsets: dict[str, int]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        ours = [TopicPartition(*split_position(k), v) for k, v in offsets.items() if k in self._assigned]
        log.debug("committing %d of %d offsets (%d partitions assigned)", len(ours), len(offsets),
                  len(self._assigned))
        self._last_commit = ours
        if ours and self._watch.problem():
            log.debug("broker unreachable: the commit waits for the next one")   # offsets are absolute
        elif ours:
            try:   # asynchronous: a broker that stops answering must not stop the loop; close() makes the last sure
                self._consumer.commit(offsets=ours, asynchronous=True)
            except KafkaException as err:  # e.g. during a rebalance; the next commit catches up
                log.warning("offset commit failed, will retry with the next one: %s", err)

    def lag(self) -> dict[tuple[str, int], int]:
        from confluent_kafka import TopicPartition

        if time.monotonic() - self._lag_at >= LAG_REFRESH_SECONDS:
            self._lag_at = time.monotonic()
            tps = [TopicPartition(*split_position(k)) for k in self._assigned]
            lag = {}
            for tp in self._consumer.position(tps) if tps else []:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True) or (0, 0)
                if tp.offset >= 0:
                    lag[(tp.topic, tp.partition)] = max(0, high - tp.offset)
            self._lag = lag
        return self._lag

    def close(self) -> None:
        """Commits the last offsets for sure (when the broker answers), then leaves the group."""
        from confluent_kafka import KafkaException

        if self._last_commit and not self._watch.problem():
            try:
                self._consumer.commit(offsets=self._last_commit, asynchronous=False)
            except KafkaException as err:
                log.warning("the last offset commit failed (the next start reads from the snapshot's): %s", err)
        self._consumer.close()

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # once per distinct error, e.g. a topic that does not exist yet
            self._warned.add(message)
            log.warning("kafka: %s", message)


class KafkaPythonSource:
    """Consumer group through kafka-python (pure Python; install crc32c with it)."""

    def __init__(self, config: KafkaConfig, settings: Mapping[str, Setting], start: dict[str, int],
                 share: Optional[Share] = None) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        self._start = start
        self._topics = kafka_topics(config)
        self._share = share
        self._share_at = -LAG_REFRESH_SECONDS
        self._missing: set[str] = set()     # topics the share waits for, told once
        self._delivered: set[str] = set()   # partitions the last poll delivered from
        self._consumer = KafkaConsumer(**{
            "bootstrap_servers": config.bootstrap_servers, "group_id": config.group_id,
            "enable_auto_commit": False, "auto_offset_reset": "earliest",
            "session_timeout_ms": config.session_timeout_ms,
            "heartbeat_interval_ms": max(100, config.session_timeout_ms // 3),
            "max_poll_interval_ms": config.max_poll_interval_ms, "fetch_max_wait_ms": FETCH_WAIT_MS,
            **settings,
        })
        self._watch = BrokerWatch(config.bootstrap_servers, "consumer")
        source = self

        class SeekOnAssign(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked) -> None:
                pass

            def on_partitions_assigned(self, assigned) -> None:
                for tp in assigned:
                    key = position_key(tp.topic, tp.partition)
                    if key in source._start:
                        source._consumer.seek(tp, source._start[key])

        if share is None:
            self._consumer.subscribe(self._topics, listener=SeekOnAssign())
        else:
            self._assign_share()

    def _assign_share(self) -> None:
        """Assigns the share's partitions not assigned yet; those assigned before keep their positions."""
        from kafka import TopicPartition

        self._share_at = time.monotonic()
        counts = {}
        for topic in self._topics:
            found = self._consumer.partitions_for_topic(topic)
            if not found:
                if topic not in self._missing:   # once, not at every poll
                    log.warning("topic %s not found: waiting for it to read this intake's share of its partitions",
                                topic)
                    self._missing.add(topic)
                return
            counts[topic] = len(found)
        assigned = self._consumer.assignment()
        new = set(self._share.partitions(counts)) - {position_key(tp.topic, tp.partition) for tp in assigned}
        if not new:
            return
        positions = {tp: self._consumer.position(tp) for tp in assigned}   # `assign` replaces the whole assignment
        self._consumer.assign([*assigned, *(TopicPartition(*split_position(key)) for key in new)])
        for tp, offset in positions.items():
            self._consumer.seek(tp, offset)
        for key in new & set(self._start):
            self._consumer.seek(TopicPartition(*split_position(key)), self._start[key])
        log.info("intake %d of %d reads %s", self._share.index + 1, self._share.count, ", ".join(sorted(new)))

    def poll(self, max_records: int, timeout: float) -> list[Chunk]:
        if self._share is not None and share_due(self._share_at, bool(self._consumer.assignment())):
            self._assign_share()
        chunks = []
        records = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        self._delivered = {position_key(tp.topic, tp.partition) for tp in records}
        for tp, batch in records.items():
            values = [r.value or b"" for r in batch]
            offsets = [r.offset for r in batch]
            stamps = [r.timestamp / 1000 if r.timestamp is not None and r.timestamp >= 0 else NO_TIMESTAMP
                      for r in batch]
            chunks.append(Chunk(tp.topic, position_key(tp.topic, tp.partition), values, offsets, offsets[-1] + 1,
                                stamps))
        return chunks

    def problem(self) -> str:
        """The outage in words, from whether the client holds any open broker connection."""
        connections = getattr(getattr(self._consumer, "_client", None), "_conns", {})   # kafka-python's own
        if any(conn.connected() for conn in list(connections.values())):
            self._watch.heard()
        else:
            self._watch.failed("no connection")
        return self._watch.problem()

    def partitions(self) -> list[str]:
        return sorted(position_key(tp.topic, tp.partition) for tp in self._consumer.assignment())

    def exhausted(self) -> bool:
        return False

    def caught_up(self) -> set[str]:
        """Partitions the last poll delivered nothing from, at or past the high watermark of their last fetch.

        kafka-python has no end-of-partition event; against a broker that undercounts high watermarks (the
        embedded one) this may call a partition caught up one poll early. confluent-kafka (the default) uses
        the broker's end-of-partition events instead.
        """
        at_end = set()
        for tp in self._consumer.assignment():
            key, high = position_key(tp.topic, tp.partition), self._consumer.highwater(tp)
            if key not in self._delivered and high is not None and self._consumer.position(tp) >= high:
                at_end.add(key)
        return at_end

    def pause(self, keys: set[str]) -> None:
        pass   # kafka-python stopped fetching a paused partition for good after `resume` (seen against Tansu)

    def resume(self, keys: set[str]) -> None:
        pass

    def commit(self, offsets: dict[str, int]) -> None:
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        assigned = set(self.partitions())
        ours = {TopicPartition(*split_position(k)): OffsetAndMetadata(v, "", -1)
                for k, v in offsets.items() if k in assigned}
        if ours:
            try:
                self._consumer.commit(ours)
            except KafkaError as err:
                log.warning("offset commit failed, will retry with the next one: %s", err)

    def lag(self) -> dict[tuple[str, int], int]:
        lag = defaultdict(int)
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - self._consumer.position(tp))
        return dict(lag)

    def close(self) -> None:
        self._consumer.close()


def _topic_partitions(keys: set[str]) -> list:
    from confluent_kafka import TopicPartition

    return [TopicPartition(*split_position(key)) for key in sorted(keys)]
