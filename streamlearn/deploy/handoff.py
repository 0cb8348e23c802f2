"""The handoff to serving inside the learning loop: held-out data, candidates, shadow scoring, the gate.

The service calls it on every batch, left to right:

    before_learning(model, examples)   a waiting candidate and production score the examples side by side;
                                       the gate's recent examples are held out; the rest is returned to learn
    after_learning(positions, ...)     per model: a waiting candidate with enough shadow examples goes to
                                       the gate (promoted and published, or rejected with its reasons);
                                       otherwise the publish trigger may make the learner's state a candidate

One candidate per model waits at a time (the publish trigger is not checked while
one does). What must survive a crash is in the snapshot (`state()`: the holdout,
the trigger's last firing, the shadow totals) or in the registry; on start,
candidates the restored state does not know about (made after the snapshot) are
rejected as abandoned, and pointers and unsent events are repaired.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable, Optional

import msgspec

from streamlearn.config import Config
from streamlearn.deploy.artifacts import ArtifactManifest
from streamlearn.deploy.gate import Gate, compare, compare_segments
from streamlearn.deploy.holdout import Holdout, HoldoutState
from streamlearn.deploy.model_files import Deployed, deployed, model_files
from streamlearn.deploy.publisher import Publisher, open_publisher
from streamlearn.deploy.records import OUTCOMES, GateScores, StreamPosition, VersionRecord
from streamlearn.deploy.shadow import Shadow, ShadowTally
from streamlearn.learners.base import Learner
from streamlearn.records import Example
from streamlearn.triggers import Trigger, TriggerState

log = logging.getLogger(__name__)
REFRESH_SECONDS = 5.0   # how often the production versions are re-read (an operator may promote meanwhile)
RETRY_SECONDS = 60.0    # how often an undelivered model-updates event is tried again (each try may wait for Kafka)
ABANDONED = "abandoned: made after the snapshot the service restarted from, never decided"


class ModelHandoffState(msgspec.Struct):
    holdout: HoldoutState
    trigger: TriggerState = msgspec.field(default_factory=TriggerState)   # the publish trigger
    shadow: Optional[ShadowTally] = None  # the waiting candidate's totals
    decisions: dict[str, int] = {}        # gate outcome -> count


class ModelHandoff:
    """One model's holdout, publish trigger, waiting candidate and gate decisions."""

    def __init__(self, name: str, config: Config, learner: Learner, state: Optional[ModelHandoffState]) -> None:
        g = config.gate
        self.holdout = Holdout(name, g.holdout_every, g.holdout_size, config.seed, state.holdout if state else None)
        # Without a state of its own (publishing just turned on), drifts detected before now are not news.
        trigger = state.trigger if state else TriggerState(drifts=learner.drift.total)
        self.trigger = Trigger("publish", config.publish, time.monotonic(), trigger)
        self.decisions: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.decisions.update(state.decisions if state else {})
        self.shadow: Optional[Shadow] = None

    def state(self) -> ModelHandoffState:
        return ModelHandoffState(self.holdout.state(), self.trigger.state(),
                                 self.shadow.tally if self.shadow else None, dict(self.decisions))


class Handoff:
    """Candidates, gate and publishing for every configured model (when `publish.enabled`)."""

    def __init__(self, config: Config, learners: dict[str, Learner], state: Optional[bytes] = None,
                 publisher: Optional[Publisher] = None) -> None:
        self.config = config
        self.learners = learners
        self.publisher = publisher or open_publisher(config)
        self.registry, self.artifacts = self.publisher.registry, self.publisher.artifacts
        self.gate = Gate(config.gate)
        restored = msgspec.msgpack.decode(state, type=dict[str, ModelHandoffState]) if state else {}
        self.models = {name: ModelHandoff(name, config, learner, restored.get(name))
                       for name, learner in learners.items()}
        self.production_versions: dict[str, int] = {}
        self.failures = 0
        self._loaded: dict[str, Deployed] = {}   # production versions loaded for comparison, by model
        self._refreshed = 0.0
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self.publisher.reconcile(learners)
        self.publisher.deliver()
        for name, model in self.models.items():
            self._resume(name, model, restored[name].shadow if name in restored else None)
        self._refresh(time.monotonic())

    def _resume(self, name: str, model: ModelHandoff, tally: Optional[ShadowTally]) -> None:
        """Goes on shadowing the candidate the snapshot was waiting for; rejects candidates it never knew."""
        keep = None
        record = self.registry.get(name, tally.candidate) if tally is not None else None
        if record is not None and record.status == "candidate":
            try:
                candidate = deployed(self.artifacts.load(name, record.version, record.manifest_sha256))
                model.shadow = Shadow(candidate, self._production(name), tally)
                keep = record.version
            except Exception as err:   # an artifact that no longer verifies is abandoned with the rest
                log.error("model %s: candidate v%d cannot be resumed: %s", name, record.version, err)
        for version in self.registry.abandon_candidates(name, keep, ABANDONED):
            log.warning("model %s: candidate v%d %s", name, version, ABANDONED)

    def before_learning(self, name: str, examples: list[Example]) -> list[Example]:
        """Shadow-scores the model's new examples, holds out the gate's share; returns those to learn."""
        model = self.models[name]
        if model.shadow is not None:
            model.shadow.observe(examples)
        return model.holdout.split(examples)

    def after_learning(self, positions: dict[str, int], snapshot_seq: Callable[[], Optional[int]]) -> None:
        """Decides for candidates that have waited long enough, and makes new ones when a trigger fires."""
        now = time.monotonic()
        if now - self._refreshed >= REFRESH_SECONDS:
            self._refresh(now)
        for name, model in self.models.items():
            try:
                if model.shadow is None and self._due(name, model, now):
                    self._candidate(name, model, positions, snapshot_seq())
                if model.shadow is not None and model.shadow.tally.examples >= self.config.gate.min_shadow_examples:
                    self._decide(name, model)
            except Exception as err:   # the registry, the artifact store or the event sink failed: learning goes on
                self._give_up(name, model, err)

    def _give_up(self, name: str, model: ModelHandoff, err: Exception) -> None:
        """Logs the failure and rejects the waiting candidate, if any (a promotion already made stands)."""
        self.failures += 1
        log.error("model %s: publishing failed (%d so far), learning goes on: %s: %s",
                  name, self.failures, type(err).__name__, err)
        if model.shadow is not None:
            version, model.shadow = model.shadow.candidate.version, None
            try:
                self.registry.reject(name, version, GateScores(), [f"publishing failed: {err}"], "service")
            except Exception as again:   # the registry itself is failing: the next start abandons it
                log.error("model %s: candidate v%d stays a candidate: %s", name, version, again)

    def _due(self, name: str, model: ModelHandoff, now: float) -> bool:
        learner = self.learners[name]
        return model.trigger.check(model.holdout.position, now, learner.drift.total,
                                   lambda: learner.watched_score) is not None

    def _candidate(self, name: str, model: ModelHandoff, positions: dict[str, int], snapshot: Optional[int]) -> None:
        """The learner's model now becomes an immutable artifact and a registered candidate."""
        learner = self.learners[name]
        production = self._production(name)   # first: if production no longer loads, no candidate is made
        kind, files = model_files(learner)
        version = self.registry.next_version(name)
        written = self.artifacts.write(ArtifactManifest(name, version, kind, learner.task, time.time(),
                                                        self.config.models[name]), files)
        self.registry.add(VersionRecord(
            name, version, "candidate", written.manifest.created, written.url, written.manifest_sha256,
            written.checksums, production.version if production else None, snapshot,
            StreamPosition(model.holdout.position, dict(positions))))
        try:   # the gate scores what serving would load: the artifact as written, read back and verified
            candidate = deployed(self.artifacts.load(name, version, written.manifest_sha256))
        except Exception as err:
            self.registry.reject(name, version, GateScores(), [f"the artifact does not load back: {err}"], "service")
            raise
        model.shadow = Shadow(candidate, production)
        log.info("model %s: candidate v%d made at example %d", name, version, model.holdout.position)

    def _decide(self, name: str, model: ModelHandoff) -> None:
        shadow = model.shadow
        version = shadow.candidate.version
        record = self.registry.get(name, version)
        if record is None or record.status != "candidate":   # an operator decided meanwhile
            model.shadow = None
            return
        production = self._production(name)
        if (production.version if production else None) != shadow.tally.production:
            log.info("model %s: production changed while v%d waited; shadow scoring starts again", name, version)
            model.shadow = Shadow(shadow.candidate, production)
            return
        probes = self.learners[name].probes
        segments = [segment.probes for segment in probes.segments] if probes is not None else []
        scores = GateScores(compare(shadow.candidate, production, list(model.holdout.recent)),
                            compare_segments(shadow.candidate, production, segments), shadow.tally.comparison())
        decision = self.gate.decide(scores)
        if decision.promote:
            self.publisher.promote(name, version, "promote", "gate", scores, decision.reasons)
            self.production_versions[name] = version
        else:
            self.registry.reject(name, version, scores, decision.reasons, "gate")
        outcome = "promoted" if decision.promote else "rejected"
        model.decisions[outcome] += 1
        model.shadow = None
        log.info("model %s: gate %s v%d: %s", name, outcome, version, "; ".join(decision.reasons))

    def _production(self, name: str) -> Optional[Deployed]:
        """The registry's production version of `name`, loaded and verified (kept until it changes)."""
        record = self.registry.production(name)
        if record is None:
            return None
        loaded = self._loaded.get(name)
        if loaded is None or (loaded.version, loaded.manifest_sha256) != (record.version, record.manifest_sha256):
            loaded = self._loaded[name] = deployed(self.artifacts.load(name, record.version, record.manifest_sha256))
        return loaded

    def _refresh(self, now: float) -> None:
        """Re-reads the production versions; now and then retries events that could not be delivered."""
        self._refreshed = now
        try:
            for name in self.models:
                record = self.registry.production(name)
                if record is not None:
                    self.production_versions[name] = record.version
            if now >= self._retry_at:   # delivering an empty outbox does nothing
                self._retry_at = now + RETRY_SECONDS
                self.publisher.deliver()
        except Exception as err:   # as in after_learning: the registry or the sink failing never stops learning
            self.failures += 1
            log.error("publishing: refresh failed (%d so far): %s: %s", self.failures, type(err).__name__, err)

    @property
    def held_out(self) -> int:
        return sum(model.holdout.held_out for model in self.models.values())

    def triggers(self) -> list[Trigger]:
        return [model.trigger for model in self.models.values()]

    def state(self) -> bytes:
        """What the snapshot keeps of the handoff."""
        return msgspec.msgpack.encode({name: model.state() for name, model in self.models.items()})

    def summary(self) -> dict[str, dict]:
        return {name: {"production": self.production_versions.get(name), "decisions": dict(model.decisions),
                       "held_out": model.holdout.held_out,
                       "waiting": model.shadow.candidate.version if model.shadow else None}
                for name, model in self.models.items()}

    def close(self) -> None:
        self.publisher.close()
