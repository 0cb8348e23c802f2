"""The handoff to serving inside the learning loop: held-out data, candidates, shadow scoring, the gate.

The service calls it on every batch, left to right:

    before_learning(model, examples)   a waiting candidate and production score the examples side by side;
                                       the gate's recent examples are held out; the rest is returned to learn
    after_learning(offsets, ...)     per model: a waiting candidate with enough shadow examples goes to
                                       the gate (promoted and published, or rejected with its reasons);
                                       otherwise the publish trigger may make the learner's state a candidate

One candidate per model waits at a time (the publish trigger is not checked while
one does).

A language model (`kind = "lm"`) holds nothing out and is not shadow-scored: its
candidate (an adapter) goes to the gate at once, which scores it and production
(the base alone before any promotion) on the model's capability sets
(`rule=capabilities`).

The handoff follows each learner's drift policy. Once a real concept change is
confirmed (its policy's `last_change`), the learner's probes from before it are retired
(`ProbeSets.follow`), only held-out examples since it count as recent, and while
the production version was made before the change the gate decides by its
`concept_change` rule (`AfterChange`). At the confirmation a waiting candidate
made before the change is decided at once (and rejected by that rule), and up to
`gate.change_candidates` candidates are asked for one after another, without
waiting for the publish trigger (reason `change`), until one is promoted. While a
drift case is open (a detection judged, a change suspected), a candidate may be rejected
but not promoted: one that passes waits for the case to close and is decided again, so
that a burst of wrong labels is over, or a change confirmed, before anything is promoted.

What must survive a crash is in the snapshot (`state()`: the holdout, the
trigger's last firing, the shadow totals, the change followed) or in the registry; on start,
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
from streamlearn.deploy.gate import AfterChange, Gate, compare, compare_segments
from streamlearn.deploy.holdout import Holdout, HoldoutState
from streamlearn.deploy.model_files import Deployed, deployed, model_files
from streamlearn.deploy.publisher import Publisher, open_publisher
from streamlearn.deploy.records import OUTCOMES, Comparison, GateScores, StreamPosition, VersionRecord
from streamlearn.deploy.shadow import Shadow, ShadowTally
from streamlearn.learners.contract import Learner
from streamlearn.learners.plasticity import ConceptChange
from streamlearn.learners.probes import change_start
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
    change: Optional[ConceptChange] = None   # the learner's confirmed concept change followed last
    asked: int = 0                        # candidates asked for because of it (up to gate.change_candidates)
    rules: dict[str, int] = {}            # gate rule -> decisions it made


class ModelHandoff:
    """One model's holdout, publish trigger, waiting candidate and gate decisions."""

    def __init__(self, name: str, config: Config, learner: Learner, state: Optional[ModelHandoffState]) -> None:
        g = config.gate
        self.lm = learner if learner.kind == "lm" else None   # a language model: its own gate (capabilities)
        every = 0 if self.lm is not None else g.holdout_every   # counts its examples, holds none out
        self.holdout = Holdout(name, every, g.holdout_size, config.seed, state.holdout if state else None)
        # Without a state of its own (publishing just turned on), drifts detected before now are not news.
        trigger = state.trigger if state else TriggerState(drifts=learner.evaluation.drift.total)
        self.trigger = Trigger("publish", config.publish, time.monotonic(), trigger)
        self.decisions: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.decisions.update(state.decisions if state else {})
        self.rules: Counter[str] = Counter(state.rules if state else {})
        self.shadow: Optional[Shadow] = None
        self.deferred = False   # the waiting candidate passed while a drift case was open: decided again after it
        # Without a state of its own, a change confirmed before now is followed but asks for no candidates.
        self.change = state.change if state else learner.evaluation.policy.last_change
        self.asked = state.asked if state else g.change_candidates

    @property
    def since(self) -> Optional[float]:
        """Event time from which examples belong to the current concept (None: no change confirmed)."""
        return change_start(self.change)

    def state(self) -> ModelHandoffState:
        return ModelHandoffState(self.holdout.state(), self.trigger.state(),
                                 self.shadow.tally if self.shadow else None, dict(self.decisions), self.change,
                                 self.asked, dict(self.rules))


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
                candidate = deployed(self.artifacts.load(name, record.version, record.manifest_sha256), model.lm)
                model.shadow = Shadow(candidate, self._production(name), tally)
                keep = record.version
            except Exception as err:   # an artifact that no longer verifies is abandoned with the rest
                log.error("model %s: candidate v%d cannot be resumed: %s", name, record.version, err)
        for version in self.registry.abandon_candidates(name, keep, ABANDONED):
            log.warning("model %s: candidate v%d %s", name, version, ABANDONED)

    def before_learning(self, name: str, examples: list[Example]) -> list[Example]:
        """Shadow-scores the model's new examples, holds out the gate's share; returns those to learn."""
        model = self.models[name]
        if model.shadow is not None and model.lm is None:
            model.shadow.observe(examples)
        return model.holdout.split(examples)

    def after_learning(self, offsets: dict[str, int], snapshot_seq: Callable[[], Optional[int]]) -> None:
        """Decides for candidates that have waited long enough, and makes new ones when a trigger fires."""
        now = time.monotonic()
        if now - self._refreshed >= REFRESH_SECONDS:
            self._refresh(now)
        for name, model in self.models.items():
            try:
                self._follow(name, model)
                if model.shadow is None and (self._asked(name, model, now) or self._due(name, model, now)):
                    self._candidate(name, model, offsets, snapshot_seq())
                if model.shadow is not None and self._ready(name, model):
                    self._decide(name, model)
            except Exception as err:   # the registry, the artifact store or the event sink failed: learning goes on
                self._give_up(name, model, err)

    def _follow(self, name: str, model: ModelHandoff) -> None:
        """Takes a concept change the learner's policy confirmed since the last batch: probes, candidates."""
        evaluation = self.learners[name].evaluation
        change = evaluation.policy.last_change
        if evaluation.probes is not None:   # idempotent; the learner also does it at its evaluations
            evaluation.probes.follow(change)
        start = change_start(change)
        if start is None or (model.since is not None and start <= model.since):
            return
        model.change, model.asked = change, 0
        log.info("model %s: concept change confirmed at example %d (detected at %d): following it", name,
                 change.confirmed_position, change.position)
        if model.shadow is not None and self._after_change(name, model) is not None:
            record = self.registry.get(name, model.shadow.candidate.version)
            if record is not None and (record.position.ts is None or record.position.ts < start):
                self._decide(name, model)   # made from the old concept: rejected now, not after its shadow

    def _after_change(self, name: str, model: ModelHandoff,
                      candidate_ts: Optional[float] = None) -> Optional[AfterChange]:
        """The concept change the gate must follow, if production was made before it (an unknown time: before)."""
        start = model.since
        if start is None:
            return None
        production = self.registry.production(name)
        if production is None or (production.position.ts is not None and production.position.ts >= start):
            return None
        return AfterChange(model.change, candidate_ts)

    def _asked(self, name: str, model: ModelHandoff, now: float) -> bool:
        """Whether a candidate is due because of a confirmed change production predates (counted as `change`)."""
        if model.asked >= self.config.gate.change_candidates:
            return False
        if self._after_change(name, model) is None:   # production follows the change already: no more asking
            model.asked = self.config.gate.change_candidates
            return False
        model.asked += 1
        model.trigger.fire("change", model.holdout.position, now, self.learners[name].evaluation.drift.total)
        return True

    def _ready(self, name: str, model: ModelHandoff) -> bool:
        """Enough shadow examples, no drift case holding a promotion back, and, for the concept_change rule, enough
        held-out examples since the change."""
        g = self.config.gate
        if model.lm is not None:
            return True
        if model.shadow.tally.examples < g.min_shadow_examples:
            return False
        if model.deferred:   # a promotion waits for the drift case to close (the decision is made again then)
            return not self.learners[name].evaluation.policy.case_open
        if model.since is None or not g.holdout_every or len(model.holdout.since(model.since)) >= g.change_min_recent:
            return True
        return self._after_change(name, model) is None   # it waits only where the concept_change rule decides

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
        evaluation = self.learners[name].evaluation
        return model.trigger.check(model.holdout.position, now, evaluation.drift.total,
                                   lambda: evaluation.watched_score) is not None

    def _candidate(self, name: str, model: ModelHandoff, offsets: dict[str, int], snapshot: Optional[int]) -> None:
        """The learner's model now becomes an immutable artifact and a registered candidate."""
        learner = self.learners[name]
        production = self._production(name)   # first: if production no longer loads, no candidate is made
        kind, files = model_files(learner)
        version = self.registry.next_version(name)
        written = self.artifacts.write(ArtifactManifest(name, version, kind, learner.task, time.time(),
                                                        self.config.models[name]), files)
        newest = model.holdout.ts if model.holdout.ts != float("-inf") else None
        self.registry.add(VersionRecord(
            name, version, "candidate", written.manifest.created, written.url, written.manifest_sha256,
            written.checksums, production.version if production else None, snapshot,
            StreamPosition(model.holdout.position, dict(offsets), newest)))
        try:   # the gate scores what serving would load: the artifact as written, read back and verified
            candidate = deployed(self.artifacts.load(name, version, written.manifest_sha256), model.lm)
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
        if model.lm is not None:
            decision = self.gate.decide_capabilities(_capability_scores(model.lm, shadow.candidate, production),
                                                     model.lm.lm.capabilities)
        else:
            probes = self.learners[name].evaluation.probes   # its segments from before a confirmed change were retired
            segments = [segment.probes for segment in probes.segments] if probes is not None else []
            scores = GateScores(compare(shadow.candidate, production, model.holdout.since(model.since)),
                                compare_segments(shadow.candidate, production, segments), shadow.tally.comparison())
            decision = self.gate.decide(scores, self._after_change(name, model, record.position.ts))
        scores = decision.scores
        model.deferred = decision.promote and self.learners[name].evaluation.policy.case_open
        if model.deferred:   # neither concept is known to be right yet: a rejection stands, a promotion waits
            log.info("model %s: v%d passed the gate while a drift case is open; it waits for the case", name, version)
            return
        if decision.promote:
            self.publisher.promote(name, version, "promote", "gate", scores, decision.reasons)
            self.production_versions[name] = version
        else:
            self.registry.reject(name, version, scores, decision.reasons, "gate")
        outcome = "promoted" if decision.promote else "rejected"
        model.decisions[outcome] += 1
        model.rules[decision.rule] += 1
        model.shadow = None
        log.info("model %s: gate %s v%d: %s", name, outcome, version, "; ".join(decision.reasons))

    def _production(self, name: str) -> Optional[Deployed]:
        """The registry's production version of `name`, loaded and verified (kept until it changes)."""
        record = self.registry.production(name)
        if record is None:
            return None
        loaded = self._loaded.get(name)
        if loaded is None or (loaded.version, loaded.manifest_sha256) != (record.version, record.manifest_sha256):
            loaded = self._loaded[name] = deployed(self.artifacts.load(name, record.version, record.manifest_sha256),
                                                   self.models[name].lm)
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
                       "rules": dict(model.rules), "held_out": model.holdout.held_out,
                       "waiting": model.shadow.candidate.version if model.shadow else None}
                for name, model in self.models.items()}

    def close(self) -> None:
        self.publisher.close()


def _capability_scores(learner, candidate: Deployed, production: Optional[Deployed]) -> GateScores:
    """A language model's candidate and production (or, before any promotion, the base alone) on each capability."""
    from streamlearn.learners.lm.served import base_alone

    theirs = production.lm if production is not None else base_alone(learner)
    return GateScores(capabilities={
        capability.name: Comparison(candidate.lm.score(items, capability.metric), theirs.score(items, capability.metric),
                                    len(items))
        for capability, items in learner.capability_sets})
