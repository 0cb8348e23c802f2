"""Publishing production changes to serving: the production pointer, then the `model-updates` event.

The registry is the truth. A promotion or rollback is first one registry
transaction (old production → retired, new → production, the event queued in
the outbox); then the pointer beside the artifacts is replaced atomically; then
the event is produced (Kafka topic `publish.topic`, keyed by model; with a file
source, a line of `STATE_DIR/model-updates.jsonl`) and marked sent. A crash
between the steps is repaired by `deliver()` at the next start: every pointer is
rewritten from the registry and unsent events are sent (at least once, in order).

>>> import tempfile, pathlib
>>> from streamlearn.deploy.registry import SqliteRegistry
>>> from streamlearn.deploy.artifacts import ArtifactManifest, ArtifactStore
>>> from streamlearn.deploy.records import VersionRecord
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> registry, artifacts = SqliteRegistry(root / "registry.sqlite"), ArtifactStore(root / "artifacts")
>>> a = artifacts.write(ArtifactManifest("m", 1, "river", "classification", 0.0), {"model.pkl": b"x"})
>>> registry.add(VersionRecord("m", 1, "candidate", 0.0, a.url, a.manifest_sha256, a.checksums))
>>> publisher = Publisher(registry, artifacts, FileUpdates(root / "model-updates.jsonl"))
>>> publisher.promote("m", 1, "promote", "operator").version, artifacts.production("m").version
(1, 1)
>>> msgspec.json.decode((root / "model-updates.jsonl").read_bytes())["action"]
'promote'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Protocol

import msgspec

from streamlearn.config import Config, KafkaConfig, Setting, resolve_settings
from streamlearn.deploy.artifacts import ArtifactStore, open_artifacts
from streamlearn.deploy.faults import pause_point
from streamlearn.deploy.records import GateScores, ModelUpdate
from streamlearn.deploy.registry import Registry, RegistryError, open_registry
from streamlearn.stream.producer import Producer

log = logging.getLogger(__name__)
UPDATES_FILE = "model-updates.jsonl"
SEND_TIMEOUT = 10.0   # seconds the loop waits for a delivery; an undelivered event is retried later


class UpdateSink(Protocol):
    def send(self, event: ModelUpdate) -> bool:
        """Sends one event and waits for it; True once delivered."""
        ...

    def close(self) -> None: ...


class FileUpdates:
    """Appends each event as a JSON line (file sources: backfills publish without Kafka)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, event: ModelUpdate) -> bool:
        with open(self.path, "ab") as out:
            out.write(msgspec.json.encode(event) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        return True

    def close(self) -> None:
        pass


class KafkaUpdates:
    """Produces each event to the updates topic, keyed by model (one model's events stay in order)."""

    def __init__(self, config: KafkaConfig, settings: dict[str, Setting], topic: str) -> None:
        self.topic = topic
        self._producer = Producer(config, settings, "model update")

    def send(self, event: ModelUpdate) -> bool:
        failures = self._producer.failures
        self._producer.send(self.topic, msgspec.json.encode(event), key=event.model.encode())
        return self._producer.flush(SEND_TIMEOUT) and self._producer.failures == failures

    def close(self) -> None:
        self._producer.close()


def open_sink(config: Config) -> UpdateSink:
    """Where this config's events go: the Kafka topic, or a JSONL file beside the state with a file source."""
    if config.file_path is not None:
        return FileUpdates(Path(config.state_dir) / UPDATES_FILE)
    return KafkaUpdates(config.kafka, resolve_settings(config.kafka.settings, os.environ), config.publish.topic)


def open_publisher(config: Config) -> "Publisher":
    """The publisher of this config's registry, artifact store and update sink."""
    return Publisher(open_registry(config), open_artifacts(config), open_sink(config))


class Publisher:
    """Changes production in the registry and makes the change visible to serving."""

    def __init__(self, registry: Registry, artifacts: ArtifactStore, sink: UpdateSink) -> None:
        self.registry = registry
        self.artifacts = artifacts
        self.sink = sink

    def promote(self, model: str, version: int, action: str, actor: str, scores: Optional[GateScores] = None,
                reasons: Optional[list[str]] = None) -> ModelUpdate:
        """`version` becomes production (a gate decision, an operator's promote or a rollback), then is published.

        Its artifact is verified first: serving is never pointed at something it could not load.
        """
        record = self.registry.get(model, version)
        if record is None:
            raise RegistryError(f"{model} has no version {version}")
        self.artifacts.load(model, version, record.manifest_sha256)
        event = self.registry.promote(model, version, action, actor, scores, reasons)
        pause_point("after-commit")
        self.deliver()
        return event

    def rollback(self, model: str, to: Optional[int] = None) -> ModelUpdate:
        """Production goes back to `to` (default: the version that was production before the current one)."""
        target = to if to is not None else self.previous_production(model)
        if target is None:
            raise RegistryError(f"{model}: no earlier production version to roll back to")
        current = self.registry.production(model)
        note = f"rolled back from v{current.version} by an operator" if current else "rolled back by an operator"
        return self.promote(model, target, "rollback", "operator", reasons=[note])

    def previous_production(self, model: str) -> Optional[int]:
        """The version that was production before the current one, from the audit trail."""
        current = self.registry.production(model)
        history = [c.version for c in self.registry.changes(model) if c.status == "production"]
        for version in reversed(history):
            if current is None or version != current.version:
                return version
        return None

    def deliver(self) -> bool:
        """Pointers from the registry, then every unsent event, in order; False when one could not be sent."""
        pending = self.registry.unsent()
        self.reconcile({event.model for _, event in pending})
        for event_id, event in pending:
            pause_point("after-pointer")
            if not self.sink.send(event):
                log.error("model-updates event for %s v%d not delivered; it is retried at the next change or start",
                          event.model, event.version)
                return False
            self.registry.mark_sent(event_id)
        return True

    def reconcile(self, models: Iterable[str]) -> None:
        """Points each model's production pointer at the registry's production version (the registry is the truth)."""
        for model in models:
            record = self.registry.production(model)
            if record is None:
                continue
            pointer = self.artifacts.production(model)
            wanted = (record.version, record.manifest_sha256)
            if pointer is None or (pointer.version, pointer.manifest_sha256) != wanted:
                self.artifacts.point_production(model, record.version, record.manifest_sha256)
                log.info("production pointer of %s set to v%d", model, record.version)

    def close(self) -> None:
        self.sink.close()
        self.registry.close()
