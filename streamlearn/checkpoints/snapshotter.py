"""Decides when to snapshot and writes snapshots on a background thread.

The learning loop only serializes (pickle of the models, the intake's state as
it came with the barrier); writing and fsyncing happen here, off the hot path.
A failed write leaves the last good snapshot in place, is counted and logged in
one line, and the next trigger tries again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Optional

import msgspec

from streamlearn.checkpoints.store import SnapshotStore
from streamlearn.config import Config, SnapshotConfig
from streamlearn.telemetry.histogram import LATENCY_BUCKETS, Histogram

log = logging.getLogger(__name__)


def config_fingerprint(config: Config) -> str:
    """Hash of the settings a snapshot's state depends on: the models, the join, the source."""
    relevant = {"models": config.models, "join": [config.join.ttl, config.join.early_ttl],
                "source": config.source if config.file_path else "kafka",
                "topics": [config.kafka.inference_topic, config.kafka.feedback_topic, config.kafka.examples_topic]}
    return hashlib.sha256(msgspec.json.encode(relevant)).hexdigest()[:16]


class PendingSnapshot(msgspec.Struct):
    files: dict[str, bytes]
    offsets: dict[str, int]
    meta: dict[str, float]


class Snapshotter:
    """Snapshot triggers (every N examples, every T seconds) and the background writer."""

    def __init__(self, settings: SnapshotConfig, store: SnapshotStore, fingerprint: str) -> None:
        self.settings = settings
        self.store = store
        self.fingerprint = fingerprint
        self.seconds = Histogram(LATENCY_BUCKETS)   # duration of each successful write
        self.failures = 0
        self.last_success: Optional[float] = None   # unix time of the newest durable snapshot
        self.durable_offsets: dict[str, int] = {}
        self.parent: Optional[int] = None           # the restored snapshot the next one grows from
        self._last_examples = 0
        self._last_time = time.monotonic()
        self._idle = threading.Event()
        self._idle.set()

    def due(self, learned: int) -> bool:
        s = self.settings
        return (learned - self._last_examples >= s.every_examples
                or time.monotonic() - self._last_time >= s.every_seconds)

    def submit(self, snapshot: PendingSnapshot, learned: int) -> None:
        """Starts writing in the background; waits first if the previous write is still going."""
        self._idle.wait()
        self._idle.clear()
        self._last_examples, self._last_time = learned, time.monotonic()
        threading.Thread(target=self._write, args=(snapshot,), name="snapshot-writer", daemon=True).start()

    def wait(self) -> None:
        """Blocks until no write is in flight."""
        self._idle.wait()

    def age(self, now: float) -> Optional[float]:
        return None if self.last_success is None else now - self.last_success

    def _write(self, snapshot: PendingSnapshot) -> None:
        started = time.perf_counter()
        try:
            manifest = self.store.write(snapshot.files, snapshot.offsets, self.fingerprint, snapshot.meta,
                                        parent=self.parent)
        except OSError as err:
            self.failures += 1
            log.error("snapshot failed (%d so far), the last good one stays: %s", self.failures, err)
        else:
            took = time.perf_counter() - started
            self.seconds.observe(took)
            self.parent = None
            self.durable_offsets = dict(snapshot.offsets)  # one reference swap: readers see old or new
            self.last_success = manifest.created
            log.info("snapshot %d written in %.3f s", manifest.seq, took)
        finally:
            self._idle.set()
