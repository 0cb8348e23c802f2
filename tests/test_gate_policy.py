"""The gate follows the drift policy: after a confirmed concept change it promotes a clearly better candidate.

The change is given here as a `ConceptChange` record (set on the learner's policy, or handed to the gate),
so these tests do not depend on how the policy detects one. A stream whose labels flip (a real change)
and later carry a burst of flipped labels that ends runs through the service (file source, River):
without a confirmed change production stays on the old concept for ever (the standard rule rejects every
adapted candidate on the old probes); with one, a candidate made after the change is promoted by the
concept_change rule within three candidates of the confirmation, and the later burst is still judged by
the standard rule, so nothing learned from it reaches serving.
"""

from __future__ import annotations

import math
import random

import msgspec
import orjson
import pytest
from river import linear_model, optim, preprocessing

from streamlearn.config import GateConfig, parse_config
from streamlearn.deploy import load_production
from streamlearn.deploy.artifacts import open_artifacts
from streamlearn.deploy.gate import AfterChange, Gate
from streamlearn.deploy.handoff import ModelHandoffState
from streamlearn.deploy.holdout import Holdout, HoldoutState
from streamlearn.deploy.records import Comparison, GateScores
from streamlearn.deploy.registry import open_registry
from streamlearn.learners.plasticity import ConceptChange
from streamlearn.records import Example
from streamlearn.service import Service

T0 = 1000.0                      # event time of example i is T0 + i
CHANGE = ConceptChange(position=2450, ts=T0 + 2450, confirmed_position=2550, confirmed_ts=T0 + 2550,
                       detector="adwin")


# --- the gate's rules -------------------------------------------------------------------------------------------

def gate(**settings) -> Gate:
    return Gate(GateConfig(**{"regression_tolerance": 0.02, "change_margin": 0.1, **settings}))


def test_the_concept_change_rule_promotes_a_clearly_better_candidate_made_after_the_change():
    scores = GateScores(recent=Comparison(0.95, 0.05, 60), historical=Comparison(0.30, 0.70, 500),
                        shadow=Comparison(0.97, 0.03, 1000))
    standard = gate().decide(scores)
    assert not standard.promote and standard.reasons[0] == "rule=standard"
    assert standard.reasons[1].startswith("historical: 0.3000 is more than 0.02 below production")

    # Probes of the old concept retired by the caller: historical holds segments since the change, if any.
    after = gate().decide(msgspec.structs.replace(scores, historical=None), AfterChange(CHANGE, T0 + 3000))
    assert after.promote and after.rule == "concept_change"
    assert after.reasons == ["rule=concept_change (change detected at example 2450, confirmed at 2550)",
                             "passed: recent 0.9500 vs 0.0500, shadow 0.9700 vs 0.0300"]


@pytest.mark.parametrize("scores, candidate_ts, reason", [
    (GateScores(recent=Comparison(0.60, 0.55, 60), shadow=Comparison(0.97, 0.03, 900)), T0 + 3000,
     "recent: 0.6000 does not beat production (0.5500) by the margin 0.1"),
    (GateScores(recent=Comparison(0.95, 0.05, 60), shadow=Comparison(0.50, 0.45, 900)), T0 + 3000,
     "shadow: 0.5000 does not beat production (0.4500) by the margin 0.1"),
    (GateScores(recent=Comparison(0.95, 0.05, 60), shadow=Comparison(0.97, 0.03, 900)), T0 + 2000,
     f"candidate: made from examples up to event time {T0 + 2000}, not after the change (event time {T0 + 2450})"),
    (GateScores(recent=Comparison(0.95, 0.05, 60), shadow=Comparison(0.97, 0.03, 900)), None,
     f"candidate: made from examples at an unknown event time, not after the change (event time {T0 + 2450})"),
    (GateScores(shadow=Comparison(0.97, 0.03, 900)), T0 + 3000, "recent: no examples since the change"),
    (GateScores(recent=Comparison(0.95, 0.05, 60), historical=Comparison(0.70, 0.90, 100),
                shadow=Comparison(0.97, 0.03, 900)), T0 + 3000,
     "historical: 0.7000 is more than 0.02 below production (0.9000)"),   # segments since the change still count
])
def test_the_concept_change_rule_rejects_and_says_why(scores, candidate_ts, reason):
    decision = gate().decide(scores, AfterChange(CHANGE, candidate_ts))
    assert not decision.promote and decision.rule == "concept_change"
    assert decision.reasons[0].startswith("rule=concept_change") and decision.reasons[1:] == [reason]


def test_without_a_holdout_shadow_alone_decides_after_a_change_and_minimums_still_hold():
    shadow_only = GateScores(shadow=Comparison(0.97, 0.03, 900))
    assert gate(holdout_every=0).decide(shadow_only, AfterChange(CHANGE, T0 + 3000)).promote
    low = gate(holdout_every=0, min_shadow_score=0.98).decide(shadow_only, AfterChange(CHANGE, T0 + 3000))
    assert low.reasons[1:] == ["shadow: 0.9700 is below the minimum 0.98"]


def test_held_out_examples_from_before_the_change_are_not_recent_and_the_newest_time_survives_a_restart():
    holdout = Holdout("m", every=10, size=100, seed=1)
    holdout.split([Example(f"e-{i}", "m", {}, 1, 1.0, T0 + i, T0 + i) for i in range(600)])
    assert len(holdout.since(None)) == 60 and holdout.ts == T0 + 599
    assert [ex.ts >= T0 + 450 for ex in holdout.since(T0 + 450)] == [True] * 15
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(holdout.state()), type=HoldoutState)
    again = Holdout("m", every=10, size=100, seed=1, state=state)
    assert again.ts == T0 + 599 and again.since(T0 + 450) == holdout.since(T0 + 450)
    old = msgspec.msgpack.decode(msgspec.msgpack.encode({"position": 5, "held_out": 0, "recent": []}),
                                 type=HoldoutState)
    assert old.ts == -math.inf   # a snapshot from before: nothing known yet


# --- through the service: a real change, then a burst that ends ------------------------------------------------

N, FLIP, BURST = 8500, 2400, (5000, 6500)   # labels flip for good at FLIP; BURST flips them back for a while
SETTLED = 200                                 # burst examples after which the learner has surely followed it


def fast_logreg():
    """Follows a flip within ~150 examples (as in test_deploy_poisoning)."""
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.1))


def label(i: int, x1: float, x2: float) -> int:
    old = int(x1 + x2 > 1.0)
    return old if i < FLIP or BURST[0] <= i < BURST[1] else 1 - old


def write_stream(path) -> None:
    rng = random.Random(5)
    lines = []
    for i in range(N):
        x1, x2 = rng.random(), rng.random()
        lines.append(orjson.dumps({"id": f"e-{i:05d}", "ts": T0 + i, "model": "fraud",
                                   "features": {"x1": x1, "x2": x2}, "label": label(i, x1, x2)}))
    path.write_bytes(b"\n".join(lines) + b"\n")


def run(tmp_path, confirm: bool) -> tuple[Service, dict]:
    write_stream(tmp_path / "events.jsonl")
    cfg = parse_config({
        "source": f"file:{tmp_path / 'events.jsonl'}", "state_dir": str(tmp_path / "state"),
        "intake": {"mode": "inline", "batch_size": 50}, "metrics": {"enabled": False},
        "models": {"fraud": {"model": "tests.test_gate_policy:fast_logreg"}},
        "drift": {"detectors": []},   # the change is given below, not detected: these tests are the gate's
        "eval": {"segment_size": 500, "probe_size": 25, "every": 250, "segments": 20},
        "publish": {"enabled": True, "every_examples": 1000, "every_seconds": 0},
        "gate": {"holdout_every": 10, "holdout_size": 200, "min_shadow_examples": 600, "regression_tolerance": 0.05},
    }, env={})
    service = Service(cfg)

    def confirm_change(service: Service, batch) -> None:
        learner, handoff = service.learners["fraud"], service.handoff.models["fraud"]
        if confirm and handoff.holdout.position >= CHANGE.confirmed_position and not learner.evaluation.policy.changes:
            learner.evaluation.policy.changes.append(CHANGE)   # what the policy records when it confirms a change

    summary = service.run(on_batch=confirm_change)
    return service, summary


def new_concept_accuracy(model) -> float:
    rng = random.Random(99)
    rows = [{"x1": rng.random(), "x2": rng.random()} for _ in range(1000)]
    return sum(p == 1 - int(r["x1"] + r["x2"] > 1.0) for p, r in zip(model.predict_many(rows), rows)) / len(rows)


def test_without_a_confirmed_change_production_stays_on_the_old_concept(tmp_path):
    service, summary = run(tmp_path, confirm=False)
    service.close()
    registry = open_registry(service.config)
    versions = sorted(registry.versions("fraud"), key=lambda r: r.version)
    adapted = [r for r in versions if FLIP + SETTLED <= r.position.examples <= BURST[0] and r.status != "candidate"]
    assert adapted and all(r.status == "rejected" and r.rule == "standard" for r in adapted)
    assert all(any(reason.startswith("historical:") for reason in r.reasons) for r in adapted)
    production = load_production("fraud", store=open_artifacts(service.config))
    assert new_concept_accuracy(production) < 0.2   # today's failure: serving keeps a model that is wrong
    assert summary["deploy"]["fraud"]["rules"].get("concept_change", 0) == 0


def test_after_a_confirmed_change_a_new_candidate_is_promoted_and_a_later_burst_is_kept_out(tmp_path):
    service, summary = run(tmp_path, confirm=True)
    service.close()
    cfg = service.config
    registry = open_registry(cfg)
    versions = sorted(registry.versions("fraud"), key=lambda r: r.version)
    made = lambda r: r.position.examples  # noqa: E731

    # The candidate waiting at the confirmation was made from the old concept: rejected at once, by the new rule.
    old = [r for r in versions if made(r) <= CHANGE.position]
    assert old[-1].status == "rejected" and old[-1].rule == "concept_change", old[-1]
    assert old[-1].reasons[1].startswith("candidate: made from examples up to event time"), old[-1].reasons
    # A candidate is asked for at the confirmation, not at the next trigger, and is promoted by the new rule:
    # within three candidates of the confirmation.
    since = [r for r in versions if made(r) >= CHANGE.confirmed_position]
    assert made(since[0]) < CHANGE.confirmed_position + 100, made(since[0])
    promoted = next(r for r in since if any(c.status == "production" for c in registry.changes("fraud")
                                            if c.version == r.version))
    assert since.index(promoted) < 3 and promoted.rule == "concept_change", [(r.version, r.reasons) for r in since]
    assert promoted.scores.shadow.candidate >= promoted.scores.shadow.production + 0.1
    assert promoted.position.ts >= CHANGE.ts
    state = msgspec.msgpack.decode(service.handoff.state(), type=dict[str, ModelHandoffState])["fraud"]
    assert state.change == CHANGE and state.trigger.fired.get("change") == 1   # in the snapshot; one was enough

    # The later burst is judged by the standard rule again (production follows the change): nothing learned
    # from it ever served, and the candidates made in it failed on the probes of segments since the change.
    served = [c.version for c in registry.changes("fraud") if c.status == "production"]
    poisoned = [r for r in versions if BURST[0] + SETTLED <= made(r) <= BURST[1]]
    assert poisoned and all(r.status == "rejected" and r.rule == "standard" for r in poisoned)
    assert all(any(reason.startswith("historical:") for reason in r.reasons) for r in poisoned)
    assert not {r.version for r in versions if BURST[0] < made(r) <= BURST[1]} & set(served)
    production = load_production("fraud", store=open_artifacts(cfg))
    assert new_concept_accuracy(production) > 0.95

    # Live forgetting follows the change: the old concept's segments are retired, not counted as forgotten.
    probes = service.learners["fraud"].evaluation.probes
    assert probes.since == CHANGE.ts and probes.retired
    assert all(ex.ts >= CHANGE.ts for segment in probes.segments for ex in segment.probes)
    assert all(ex.ts < CHANGE.ts for segment in probes.retired for ex in segment.probes[:1])
    assert summary["deploy"]["fraud"]["rules"]["concept_change"] >= 2
