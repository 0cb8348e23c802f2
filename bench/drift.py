"""Drift through the service: a real change, new classes, a recurring concept, a burst of wrong labels.

Four streams of our own, each played through the service as a user would run it:
inference logs and their feedback in one JSONL file (file source), the feedback
delayed (exponential, mean `DELAY` s of event time at `RATE` requests/s, so out of
order) and 2% of it missing, publishing on (a candidate every 1,000 examples of a
model; the gate decides). Two models see the same inputs: River `logreg` and a
torch `mlp` (one hidden layer of 32) with the default replay, EWC and drift policy.

- (a) change: at 60% of the stream the same inputs take the other label;
- (b) new classes: split digits, five tasks of two classes (`bench/forgetting.py`'s
  tasks, epochs and network; here River `softmax`, since `logreg` is binary);
- (c) recurring: concept A, then B (its opposite) from 40%, then A again from 70%;
- (d) burst: the labels of 40% to 50% of the stream are wrong, then right again.

For each model it prints the examples until the rolling score (the history's score
samples, `eval.sample_every` = 100) is back within 2 points of its level before the
change, the final rolling accuracy, what production scores on fresh traffic of the
final concept, live forgetting, the drift detections, the drift policy's actions
(where the learners have a policy) and the gate's decisions from the registry.
Positions are the model's own stream (examples it took, as in the history).

    .venv/bin/python bench/drift.py [--quick] [--seeds 5] [--workers 2] [--delay 5] [--verbose]

The label delay sets a floor under every recovery figure: examples are learned in the
order their labels arrive, and requests from before a change keep bringing labels of
the old concept after it. With an exponential delay of mean d seconds at r requests/s,
the share of such labels in a window of 200 examples ending k examples after the
change is about exp(-(k - 100) / (d r)): it is under 2 points only from k ≈ 100 + 3.9 d r
(1,078 examples at the default 5 s and 50/s, 295 at 1 s), whatever the model.

A table for people, then as the very last line one JSON object of headline figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/forgetting.py, run as a script or a module
import forgetting as digits  # noqa: E402

RATE = 50.0             # requests per second of event time
DELAY = 5.0             # mean label delay, seconds of event time (about 250 requests of disorder)
MISSING = 0.02          # share of feedback that never arrives (not for the digits: task ends are counted)
START_TS = 1_764_000_000.0
TOLERANCE = 0.02        # "back within 2 points"
SAMPLE_EVERY = 100
# The rolling window measures recovery: a window of w examples cannot be back within 2 points in fewer than
# about w examples (the default 1,000 would hide any recovery faster than that). Learning settings: defaults.
WINDOW = 200
MODELS = {"river": {"model": "logreg", "window": WINDOW},
          "torch": {"model": "mlp", "params": {"hidden": [32]}, "window": WINDOW}}
PUBLISH = {"enabled": True, "every_examples": 1000, "every_seconds": 0}
BOUNDS = {"torch_recovery_examples": 3000, "river_recovery_examples": 1000, "promoted_within_candidates": 3}


@dataclass(frozen=True)
class Phases:
    """Where a stream changes, as request indices: `changes` (concept switches) and an optional wrong-label burst."""

    requests: int
    changes: list[int] = field(default_factory=list)
    burst: Optional[tuple[int, int]] = None


def concept_a(x1: float, x2: float) -> int:
    return int(x1 + x2 > 1.0)


def binary_stream(kind: str, requests: int, seed: int) -> tuple[list[tuple[dict, int]], Phases]:
    """(features, label) per request for scenarios a, c, d; B is A's opposite (the same inputs, the other label)."""
    rng = random.Random(seed)
    if kind == "change":
        phases = Phases(requests, [int(0.6 * requests)])
    elif kind == "recurring":
        phases = Phases(requests, [int(0.4 * requests), int(0.7 * requests)])
    else:
        phases = Phases(requests, [], (int(0.4 * requests), int(0.5 * requests)))
    rows = []
    for i in range(requests):
        x1, x2 = rng.random(), rng.random()
        flipped = sum(i >= c for c in phases.changes) % 2 == 1
        if phases.burst is not None:
            flipped = phases.burst[0] <= i < phases.burst[1]
        rows.append(({"x1": round(x1, 4), "x2": round(x2, 4), "x3": round(rng.random(), 4)},
                     concept_a(x1, x2) ^ flipped))
    return rows, phases


def digits_stream(seed: int, epochs: int) -> tuple[list[tuple[dict, int]], Phases, list]:
    """Split digits as `bench/forgetting.py` streams them; the changes are the task starts."""
    tasks = digits.make_tasks("split", seed)
    rows, ends = digits.stream_rows(tasks, epochs, False, np.random.default_rng(seed + 1000))
    return ([(digits.features(x), int(y)) for x, y in rows], Phases(len(rows), [int(e) for e in ends[:-1]]),
            tasks)


def write_traffic(path: Path, rows: list[tuple[dict, int]], models: list[str], seed: int, missing: float,
                  delay: float = DELAY) -> None:
    """Inference logs and delayed feedback for every model on the same inputs, in event-time order (one JSONL)."""
    rng = random.Random(seed + 7)
    pending: list[tuple[float, str, bytes]] = []
    with open(path, "wb") as out:
        for i, (features, label) in enumerate(rows):
            ts = START_TS + i / RATE
            while pending and pending[0][0] <= ts:
                out.write(heapq.heappop(pending)[2] + b"\n")
            for model in models:
                rid = f"{model}-{i:07d}"
                out.write(orjson.dumps({"request_id": rid, "ts": round(ts, 3), "model": model, "model_version": "1",
                                        "features": features, "prediction": 0}) + b"\n")
                if rng.random() >= missing:
                    label_ts = round(ts + rng.expovariate(1.0 / delay), 3)
                    heapq.heappush(pending, (label_ts, rid, orjson.dumps(
                        {"request_id": rid, "ts": label_ts, "label": label})))
        while pending:
            out.write(heapq.heappop(pending)[2] + b"\n")


class Positions:
    """Per model, after each batch: the learner's position, the handoff's (registry) position and the event time."""

    def __init__(self, models: list[str]) -> None:
        self.rows: dict[str, list[tuple[int, int, float]]] = {m: [(0, 0, START_TS)] for m in models}

    def observe(self, service, batch) -> None:
        newest: dict[str, float] = {}
        for ex in batch.examples:
            newest[ex.model] = max(newest.get(ex.model, 0.0), ex.ts)
        for model, rows in self.rows.items():
            learner = service.learners[model]
            handoff = service.handoff.models[model].holdout.position if service.handoff is not None else 0
            rows.append((learner.evaluation.probes.position, handoff, newest.get(model, rows[-1][2])))

    def at_time(self, model: str, ts: float) -> int:
        """The learner's position when its examples reached event time `ts`."""
        learner, _, times = zip(*self.rows[model])
        return int(np.interp(ts, np.maximum.accumulate(times), learner))

    def of_handoff(self, model: str, position: int) -> int:
        """A registry position (examples the handoff took, held-out ones too) as the learner's position."""
        learner, handoff, _ = zip(*self.rows[model])
        return int(np.interp(position, handoff, learner))


def request_ts(index: int) -> float:
    return START_TS + index / RATE


def service_config(path: Path, state: Path, seed: int, models: dict[str, dict]) -> dict:
    return {"source": f"file:{path}", "state_dir": str(state), "seed": seed,
            "intake": {"mode": "inline", "batch_size": 100},
            "snapshot": {"enabled": False}, "metrics": {"enabled": False},
            "eval": {"sample_every": SAMPLE_EVERY},
            "publish": PUBLISH, "models": models}


def run_service(config: dict, models: list[str], on_batch: Optional[Callable] = None) -> dict:
    """Runs the service to the end of the file; returns what the bench reads afterwards (history, registry...)."""
    from streamlearn.config import parse_config
    from streamlearn.deploy.artifacts import open_artifacts
    from streamlearn.deploy.registry import open_registry
    from streamlearn.service import Service
    from streamlearn.telemetry.history import read_history_file

    cfg = parse_config(config, env={})
    service = Service(cfg)
    positions = Positions(models)

    def observe(s, batch) -> None:
        positions.observe(s, batch)
        if on_batch is not None:
            on_batch(s, batch)

    started = time.perf_counter()
    try:
        summary = service.run(on_batch=observe)
    finally:
        service.close()
    history = read_history_file(Path(config["state_dir"]) / "history.jsonl")
    registry = open_registry(cfg)
    out = {"summary": summary, "seconds": time.perf_counter() - started, "positions": positions, "models": {}}
    for model in models:
        learner = service.learners[model]
        policy = learner.evaluation.policy   # the drift policy (every learner's evaluation has one)
        leftover = list(policy.actions) if policy is not None else []
        out["models"][model] = {
            "samples": [(s.position, s.scores.get("accuracy")) for s in history.samples if s.model == model],
            "drifts": [(d.detector, d.position) for r in history.records if r.model == model for d in r.drifts]
            + [(d.detector, d.position) for d in learner.evaluation.drifts],
            "actions": [(a.kind, a.action, a.position) for r in history.records if r.model == model
                        for a in r.actions] + [(a.kind, a.action, a.position) for a in leftover],
            "has_policy": policy is not None,
            "versions": registry.versions(model),
            "served": [c.version for c in registry.changes(model) if c.status == "production"],
            "production": registry.production(model),
        }
    out["artifacts"] = open_artifacts(cfg)
    registry.close()
    return out


def recovery(samples: list[tuple[int, float]], change: int, since: Optional[int] = None) -> Optional[int]:
    """Examples from `since` (default: `change`) until the rolling accuracy is back within TOLERANCE of its
    level just before `change`.

    0 if it was not below that then; None if it never came back.
    """
    since = change if since is None else since
    before = [acc for pos, acc in samples if pos <= change and acc is not None]
    if not before:
        return None
    level = before[-1] - TOLERANCE
    after = [(pos, acc) for pos, acc in samples if pos > since and acc is not None]
    fell = next((i for i, (_, acc) in enumerate(after) if acc < level), None)
    if fell is None:
        return 0
    back = next((pos for pos, acc in after[fell:] if acc >= level), None)
    return None if back is None else back - since


def fresh_accuracy(deployed, flipped: bool, n: int = 2000) -> float:
    """Production's accuracy on fresh requests of concept A (or B when `flipped`)."""
    rng = random.Random(99)
    rows = [{"x1": rng.random(), "x2": rng.random(), "x3": rng.random()} for _ in range(n)]
    predicted = deployed.predict_many(rows)
    return float(np.mean([int(p) == concept_a(r["x1"], r["x2"]) ^ flipped for p, r in zip(predicted, rows)]))


def gate_story(result: dict, model: str, phases: Phases, changes: list[int], confirmed: Optional[int]) -> dict:
    """The registry's decisions, in the learner's positions: counts, reasons, and around the change or burst."""
    m = result["models"][model]
    to_learner = result["positions"].of_handoff
    versions = [(v, to_learner(model, v.position.examples)) for v in m["versions"]]
    decided = [(v, pos) for v, pos in versions if v.status != "candidate"]
    ever_served = set(m["served"])
    story = {"candidates": len(versions), "promoted": sum(v.version in ever_served for v, _ in versions),
             "rejected": sum(v.status == "rejected" for v, _ in versions),
             "reasons": Counter(r.split(":")[0] for v, _ in decided for r in v.reasons[:1]).most_common(4)}
    if changes:
        start = confirmed if confirmed is not None else changes[0]
        after = [(v, pos) for v, pos in versions if pos > start]
        first = next((i + 1 for i, (v, _) in enumerate(after) if v.version in ever_served), None)
        story["promoted_within_candidates"] = first
    if phases.burst is not None:
        lo, hi = (result["positions"].at_time(model, request_ts(i)) for i in phases.burst)
        story["burst_positions"] = (lo, hi)
        story["burst_promoted_at"] = [pos for v, pos in versions if lo < pos <= hi and v.version in ever_served]
        story["burst_promotions"] = len(story["burst_promoted_at"])
        before = [v.version for v, pos in versions if pos <= lo and v.version in ever_served]
        during = [v.version for v, pos in versions if lo < pos <= hi]
        # production unchanged: nothing made in the burst ever served, and the next served one came after it
        story["production_unchanged"] = not set(during) & ever_served
        story["served_before_burst"] = before[-1] if before else None
    story["rows"] = versions
    return story


def binary_job(job: tuple[str, int, int, float]) -> dict:
    """Scenario a, c or d with one seed and a mean label delay: both models through one service."""
    import torch

    kind, seed, requests, delay = job
    torch.set_num_threads(1)
    rows, phases = binary_stream(kind, requests, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "traffic.jsonl")
        write_traffic(path, rows, list(MODELS), seed, MISSING, delay)
        result = run_service(service_config(path, Path(tmp, "state"), seed, MODELS), list(MODELS))
        final_flipped = len(phases.changes) % 2 == 1   # B (A's opposite) holds at the end
        out = {"scenario": kind, "seed": seed, "seconds": result["seconds"], "models": {}}
        for model in MODELS:
            out["models"][model] = model_figures(result, model, phases, final_flipped)
    return out


def model_figures(result: dict, model: str, phases: Phases, final_flipped: Optional[bool]) -> dict:
    from streamlearn.deploy import load_production

    m = result["models"][model]
    positions = result["positions"]
    changes = [positions.at_time(model, request_ts(i)) for i in phases.changes]
    # the confirmation: the policy's "confirm" action of kind "change" (else its first "change" action) after it
    confirmations = sorted((action != "confirm", pos) for kind, action, pos in m["actions"]
                           if kind == "change" and changes and pos > changes[0])
    confirmed = confirmations[0][1] if confirmations else None
    summary = result["summary"]["models"][model]
    production = None
    if final_flipped is not None and m["production"] is not None:
        production = fresh_accuracy(load_production(model, store=result["artifacts"]), final_flipped)
    return {
        "changes": changes, "recovery": _recoveries(m["samples"], changes, phases, positions, model),
        "final_rolling": m["samples"][-1][1] if m["samples"] else None,
        "samples": len(m["samples"]), "production_fresh": production,
        "forgetting": summary.get("forgetting"), "drifts": m["drifts"], "actions": m["actions"],
        "has_policy": m["has_policy"], "confirmed": confirmed,
        "gate": gate_story(result, model, phases, changes, confirmed),
    }


def _recoveries(samples, changes: list[int], phases: Phases, positions: Positions, model: str) -> list:
    """Per change, examples until back within 2 points; for a burst, from its end, to the level before it began."""
    if phases.burst is None:
        return [recovery(samples, c) for c in changes]
    start, end = (positions.at_time(model, request_ts(i)) for i in phases.burst)
    return [recovery(samples, start, since=end)]


def digits_job(job: tuple[str, int, int]) -> dict:
    """Scenario b with one seed: split digits through logs and feedback, both models, publishing on."""
    import torch

    _, seed, epochs = job
    torch.set_num_threads(1)
    rows, phases, tasks = digits_stream(seed, epochs)
    tests = [([digits.features(x) for x in tx], ty) for _, _, tx, ty in tasks]
    models = {"river": {"model": "softmax"},
              "torch": {"model": "mlp", "params": {"hidden": digits.HIDDEN},
                        "train": {"batch_size": digits.BATCH, "steps_per_batch": digits.STEPS, "max_wait": 3600.0,
                                  "max_classes": 10},
                        "replay": digits.REPLAY["split"],
                        "ewc": {"consolidate": {"every_examples": digits.CONSOLIDATE_EVERY, "on_drift": True}}}}
    ends = [c for c in phases.changes] + [phases.requests]
    matrix: list[list[float]] = []

    def after_task(learner) -> None:
        matrix.append([float(np.mean(np.asarray(learner.predict_many(fx)) == ty)) for fx, ty in tests])

    def on_batch(service, batch) -> None:
        taken = service.handoff.models["torch"].holdout.position   # every example of the model, held out or not
        while len(matrix) < len(ends) - 1 and taken >= ends[len(matrix)]:
            after_task(service.learners["torch"])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "traffic.jsonl")
        write_traffic(path, rows, list(models), seed, 0.0)
        config = service_config(path, Path(tmp, "state"), seed, models)
        learner_box = {}

        def capture(service, batch) -> None:
            learner_box["torch"] = service.learners["torch"]
            on_batch(service, batch)

        result = run_service(config, list(models), capture)
        after_task(learner_box["torch"])
        out = {"scenario": "new_classes", "seed": seed, "seconds": result["seconds"], "matrix": matrix, "models": {}}
        for model in models:
            out["models"][model] = model_figures(result, model, phases, None)
    return out


def run_job(job):
    return digits_job(job) if job[0] == "new_classes" else binary_job(job)


# ----------------------------------------------------------------------------------------------------- output

def fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float) else str(value)


def recovery_text(values: list[Optional[int]]) -> str:
    return ", ".join("not back" if v is None else f"{v:,}" for v in values) or "—"


def print_binary(result: dict, verbose: bool) -> None:
    titles = {"change": "(a) real concept change at 60%", "recurring": "(c) recurring concept A → B (40%) → A (70%)",
              "burst": "(d) wrong labels from 40% to 50%, then right again"}
    print(f"\n{titles[result['scenario']]}  (seed {result['seed']}, {result['seconds']:.0f} s)")
    print(f"  {'model':<6} {'change at':>14} {'back within 2 pts after':>24} {'final rolling':>13} "
          f"{'production, fresh':>17} {'forgetting':>10} {'drifts':>6} {'actions':>8}  gate")
    for model, f in result["models"].items():
        gate = f["gate"]
        text = f"{gate['candidates']} candidates, {gate['promoted']} promoted, {gate['rejected']} rejected"
        if "promoted_within_candidates" in gate:
            text += f"; first promotion {fmt(gate['promoted_within_candidates'])} candidates after " + \
                    ("the confirmation" if f["confirmed"] is not None else "the change (no confirmation)")
        if "burst_promotions" in gate:
            text += f"; made in the burst and promoted: {gate['burst_promotions']} " \
                    f"{[f'@{p:,}' for p in gate['burst_promoted_at']]}, production unchanged: {gate['production_unchanged']}"
        at = ", ".join(f"{c:,}" for c in (f["changes"] or gate.get("burst_positions", ())))
        actions = str(len(f["actions"])) if f["has_policy"] else "no policy"
        print(f"  {model:<6} {at:>14} {recovery_text(f['recovery']):>24} {fmt(f['final_rolling']):>13} "
              f"{fmt(f['production_fresh']):>17} {fmt(f['forgetting']):>10} {len(f['drifts']):>6} {actions:>8}  {text}")
    for model, f in result["models"].items():
        drifts = ", ".join(f"{d}@{p:,}" for d, p in f["drifts"][:8]) + (" ..." if len(f["drifts"]) > 8 else "")
        actions = ", ".join(f"{k}/{a}@{p:,}" for k, a, p in f["actions"][:8]) + \
            (" ..." if len(f["actions"]) > 8 else "")
        reasons = "; ".join(f"{r} ×{n}" for r, n in f["gate"]["reasons"])
        print(f"    {model}: drifts {drifts or '—'} | policy {actions or '—'} | gate's first reasons: {reasons or '—'}")
        if verbose:
            from streamlearn.deploy.views import row

            for version, position in f["gate"]["rows"]:
                print(f"      @{position:>7,}  {row(version)}")


def print_digits(results: list[dict], verbose: bool) -> dict:
    acc = [digits.final_accuracy(r["matrix"]) for r in results]
    fgt = [digits.forgetting(r["matrix"]) for r in results]
    print(f"\n(b) new classes: split digits, 5 tasks of 2 classes, {len(results)} seed{'s' * (len(results) > 1)}; "
          f"torch MLP {digits.HIDDEN}, replay {digits.REPLAY['split']['kind']} + EWC λ=10 (defaults otherwise)")
    print(f"  torch final accuracy {np.mean(acc):.3f} ± {np.std(acc):.3f}, forgetting {np.mean(fgt):.3f} ± "
          f"{np.std(fgt):.3f}  (offline, each task's test split; bound ≥ 0.90 and ≤ 0.10)")
    for model in results[0]["models"]:
        figures = [r["models"][model] for r in results]
        change_actions = sum(sum(k == "change" for k, _, _ in f["actions"]) for f in figures)
        recoveries = [v for f in figures for v in f["recovery"]]
        back = [v for v in recoveries if v is not None]
        gate = Counter()
        for f in figures:
            gate.update({"candidates": f["gate"]["candidates"], "promoted": f["gate"]["promoted"],
                         "rejected": f["gate"]["rejected"]})
        policy = f"{change_actions} 'change' actions" if figures[0]["has_policy"] else "no policy"
        print(f"  {model:<6} final rolling {np.mean([f['final_rolling'] for f in figures]):.3f}, back within 2 pts "
              f"after a new task: median {fmt(float(np.median(back)) if back else None, ',.0f')} examples "
              f"({len(recoveries) - len(back)} of {len(recoveries)} not back), drifts "
              f"{sum(len(f['drifts']) for f in figures)}, {policy}; gate: {gate['candidates']} candidates, "
              f"{gate['promoted']} promoted, {gate['rejected']} rejected")
    return {"split_digits_accuracy": round(float(np.mean(acc)), 4),
            "split_digits_accuracy_std": round(float(np.std(acc)), 4),
            "split_digits_forgetting": round(float(np.mean(fgt)), 4),
            "split_digits_forgetting_std": round(float(np.std(fgt)), 4),
            "split_digits_seeds": len(results),
            "split_digits_change_actions": sum(sum(k == "change" for k, _, _ in r["models"]["torch"]["actions"])
                                               for r in results)}


def headline(binary: dict[str, dict], split: dict) -> dict:
    out: dict = {}
    change = binary.get("change")
    if change:
        for model in MODELS:
            f = change["models"][model]
            out[f"{model}_recovery_examples"] = f["recovery"][0]
            out[f"{model}_final_rolling_accuracy"] = _round(f["final_rolling"])
            out[f"{model}_production_accuracy_new_concept"] = _round(f["production_fresh"])
            out[f"{model}_forgetting"] = _round(f["forgetting"])
            out[f"{model}_drifts"] = len(f["drifts"])
            out[f"{model}_change_confirmed_at"] = f["confirmed"]
            out[f"{model}_promoted_within_candidates"] = f["gate"].get("promoted_within_candidates")
        within = [out[f"{m}_promoted_within_candidates"] for m in MODELS]
        out["promoted_within_candidates"] = None if None in within else max(within)
        out["policy_present"] = all(change["models"][m]["has_policy"] for m in MODELS)
    out.update(split)
    recurring = binary.get("recurring")
    if recurring:
        for model in MODELS:
            values = recurring["models"][model]["recovery"]
            out[f"recurring_{model}_recovery_examples"] = values   # [to B, back to A]
    burst = binary.get("burst")
    if burst:
        out["burst_promotions"] = sum(burst["models"][m]["gate"]["burst_promotions"] for m in MODELS)
        out["burst_positions"] = {m: burst["models"][m]["gate"]["burst_positions"] for m in MODELS}
        out["burst_promoted_at"] = {m: burst["models"][m]["gate"]["burst_promoted_at"] for m in MODELS}
        out["burst_production_unchanged"] = all(burst["models"][m]["gate"]["production_unchanged"] for m in MODELS)
        out["burst_change_actions"] = sum(k == "change" for m in MODELS for k, _, _ in burst["models"][m]["actions"])
        for model in MODELS:
            out[f"burst_{model}_recovery_examples"] = burst["models"][model]["recovery"][0]
    met = {"torch_recovery_examples": lambda v: v is not None and v <= BOUNDS["torch_recovery_examples"],
           "river_recovery_examples": lambda v: v is not None and v <= BOUNDS["river_recovery_examples"],
           "promoted_within_candidates": lambda v: v is not None and v <= BOUNDS["promoted_within_candidates"],
           "split_digits_accuracy": lambda v: v >= 0.90, "split_digits_forgetting": lambda v: v <= 0.10,
           "burst_promotions": lambda v: v == 0}
    out["bounds_met"] = {k: check(out[k]) for k, check in met.items() if k in out}
    return out


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter streams (15,000 requests) and 2 digit seeds")
    parser.add_argument("--seeds", type=int, default=None, help="split-digits seeds (default 5; --quick 2)")
    parser.add_argument("--requests", type=int, default=None, help="requests per binary stream (default 35,000)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over each digits task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scenarios", default="change,new_classes,recurring,burst")
    parser.add_argument("--delay", type=float, default=DELAY, help="mean label delay of streams a, c, d (seconds)")
    parser.add_argument("--verbose", action="store_true", help="also every registry version (streamlearn models list)")
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    requests = args.requests if args.requests is not None else (15_000 if args.quick else 35_000)
    scenarios = args.scenarios.split(",")
    jobs = [("new_classes", seed, args.epochs) for seed in range(seeds) if "new_classes" in scenarios]
    jobs = [(kind, 0, requests, args.delay) for kind in ("change", "recurring", "burst") if kind in scenarios] + jobs
    started = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers) as pool:
        results = pool.map(run_job, jobs, chunksize=1)
    print(f"drift bench: {requests:,} requests per binary stream, 2 models on the same inputs, feedback delayed "
          f"(mean {args.delay:g} s at {RATE:g}/s), {MISSING:.0%} missing; publish every "
          f"{PUBLISH['every_examples']:,} examples; {time.perf_counter() - started:.0f} s on {args.workers} workers")
    binary = {r["scenario"]: r for r in results if r["scenario"] != "new_classes"}
    split: dict = {}
    for kind in ("change", "new_classes", "recurring", "burst"):
        if kind == "new_classes":
            digit_runs = [r for r in results if r["scenario"] == "new_classes"]
            if digit_runs:
                split = print_digits(digit_runs, args.verbose)
        elif kind in binary:
            print_binary(binary[kind], args.verbose)
    print(json.dumps(headline(binary, split), ensure_ascii=False))


if __name__ == "__main__":
    main()
