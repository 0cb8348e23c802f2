"""The service: intake batches in, test-then-train per model, metrics out.

The learner side owns everything a snapshot will need: the models, the scores,
the positions of the last batch learned and the intake's counters at that point.

>>> import tempfile, pathlib
>>> from streamlearn.config import parse_config
>>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
>>> _ = path.write_text('{"id": "e-1", "ts": 1, "features": {"x": 1.0}, "label": 1}\\n')
>>> cfg = parse_config({"source": f"file:{path}", "intake": {"mode": "inline"}, "metrics": {"enabled": False}}, env={})
>>> Service(cfg).run()["learned"]
1
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry

from streamlearn.config import Config, ConfigError, ModelConfig
from streamlearn.learners.models import ModelError
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Batch, Example, IntakeStats
from streamlearn.stream.channel import Channel, start_intake
from streamlearn.telemetry.exporter import ServiceCollector
from streamlearn.telemetry.server import MetricsServer

log = logging.getLogger(__name__)
COMMIT_SECONDS = 1.0
STALL_SECONDS = 60.0  # /healthz fails when the loop has not turned for this long


class Service:
    """One running streamlearn: the learners, the intake channel and the metrics endpoint."""

    def __init__(self, config: Config, registry: Optional[CollectorRegistry] = None) -> None:
        self.config = config
        self.learners = {name: _build_learner(name, m, config.seed) for name, m in config.models.items()}
        self.stats: Optional[IntakeStats] = None
        self.positions: dict[str, int] = {}
        self.registry = registry or CollectorRegistry()
        self.registry.register(ServiceCollector(lambda: self.stats, lambda: self.learners.values()))
        self.metrics: Optional[MetricsServer] = None
        self._channel: Optional[Channel] = None
        self._stop = threading.Event()
        self._last_turn = time.monotonic()
        self._learning_seconds = 0.0
        self._started = 0.0

    def start_metrics(self) -> Optional[MetricsServer]:
        """Starts the HTTP endpoint (idempotent); its port is `self.metrics.port`."""
        if self.metrics is None and self.config.metrics.enabled:
            m = self.config.metrics
            try:
                self.metrics = MetricsServer(self.registry, m.host, m.port, self.health, self.ready)
            except OSError as err:
                raise ConfigError(f"config error: metrics.port: cannot listen on {m.host}:{m.port}: "
                                  f"{err.strerror} (0 picks a free port)") from None
            self.metrics.start()
        return self.metrics

    def run(self, until: Optional[Callable[["Service"], bool]] = None,
            on_batch: Optional[Callable[["Service", Batch], None]] = None) -> dict:
        """Learns until the source ends, `stop()` is called, a signal arrives or `until(self)` holds."""
        self.start_metrics()
        restore = _install_signal_handlers(self.stop)
        self._started = time.monotonic()
        self._channel = start_intake(self.config)
        last_commit = time.monotonic()
        stopping = False
        try:
            for batch in self._channel.batches():
                self._learn(batch)
                if on_batch is not None:
                    on_batch(self, batch)
                if batch.final:
                    break
                if not stopping and (self._stop.is_set() or (until is not None and until(self))):
                    self._channel.request_stop()  # the intake drains and sends a final batch
                    stopping = True
                if time.monotonic() - last_commit >= COMMIT_SECONDS:
                    self._channel.commit(self.positions)
                    last_commit = time.monotonic()
            self._channel.commit(self.positions, final=True)
        finally:
            self._channel.close()
            restore()
        return self.summary()

    def stop(self) -> None:
        """Asks the loop to drain the current batch and return (safe from any thread or signal)."""
        self._stop.set()

    def close(self) -> None:
        """Stops the metrics endpoint."""
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None

    def _learn(self, batch: Batch) -> None:
        self._last_turn = time.monotonic()
        if batch.examples:
            started = time.perf_counter()
            now = time.time()
            for name, examples in _by_model(batch.examples, len(self.learners)):
                self.learners[name].learn_batch(examples, now)
            self._learning_seconds += time.perf_counter() - started
        if batch.cut:
            self.positions = batch.positions
        self.stats = batch.stats

    @property
    def learned(self) -> int:
        return sum(l.learned for l in self.learners.values())

    def health(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._last_turn
        if self._channel is not None and stalled > STALL_SECONDS:
            return False, f"learning loop has not turned for {stalled:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.stats is None:
            return False, "waiting for the intake"
        if not self.stats.assigned:
            return False, "no partitions assigned yet"
        return True, "ok"

    def summary(self) -> dict:
        stats = self.stats or IntakeStats()
        elapsed = time.monotonic() - self._started if self._started else 0.0
        events: dict[str, dict[str, int]] = {}
        for (topic, outcome), n in sorted(stats.events.items()):
            events.setdefault(topic, {})[outcome] = n
        dead: dict[str, int] = {}
        for (_, reason), n in stats.dead_letters.items():
            dead[reason] = dead.get(reason, 0) + n
        return {
            "events": events,
            "dead_letters": dict(sorted(dead.items())),
            "join": dict(sorted(stats.join.items())),
            "join_pending": stats.join_pending,
            "learned": self.learned,
            "models": {name: l.summary() for name, l in self.learners.items()},
            "positions": dict(sorted(self.positions.items())),
            "elapsed_seconds": round(elapsed, 3),
            "learning_seconds": round(self._learning_seconds, 3),
            "examples_per_second": round(self.learned / elapsed, 1) if elapsed else 0.0,
        }


def _by_model(examples: list[Example], models: int):
    """Splits a batch per model, keeping each model's examples in order."""
    if models == 1:
        return [(examples[0].model, examples)]
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.model, []).append(ex)
    return list(groups.items())


def _install_signal_handlers(stop: Callable[[], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT drain and stop; a second SIGINT interrupts at once. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("signal %d: draining the current batch, then stopping", signum)
        stop()

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _build_learner(name: str, model: ModelConfig, seed: int) -> RiverLearner:
    """A learner per configured model; a model that cannot be built is a config error naming its key."""
    try:
        return RiverLearner(name, model.model, model.task, model.learn_mode, model.window, model.params, seed)
    except ModelError as err:
        raise ConfigError(f"config error: models.{name}.{err.key}: {err}") from None
