"""Continual learning on scikit-learn's digits, task after task, through the service: who forgets what.

Two scenarios, 5 tasks each, played as a stream of labeled examples (a JSONL
file, the file source, the service's torch learner; nothing here trains a model
itself):
- split (class-incremental): tasks {0,1}, {2,3}, ... {8,9}, one 10-way head
  (`--orders`: order 0 is that one, order k > 0 pairs a permutation of the ten
  digits drawn with seed k: {p0,p1}, {p2,p3}, ...);
- permuted (domain-incremental): all ten digits, each task under its own fixed
  pixel permutation.
Each task's training examples are streamed `--epochs` times (reshuffled each
time; a comma list gives a row set per value: 1 is what a service sees, a single
pass) before the next task begins. Methods: naive fine-tuning, replay only, EWC
only, replay + EWC (EWC over a sweep of lambda), ER-ACE (replay with the
asymmetric cross-entropy, `train.loss = "er_ace"`), DER++ (`der++ α=A`: ER-ACE,
two replayed rows per incoming one, and the replayed rows' outputs pulled toward
those stored with them, `train.distill = A`), the service's defaults with
a buffer of 200 (`default`: nothing else set; `default+der++ α=0.1`: plus
`train.distill = 0.1`), and joint training on the
shuffled union (the upper bound). Same MLP, same micro-batch size, same number
of examples streamed, and, but for `default`, the same budget of gradient steps.

After each task the model is scored on every task's held-out test split:
final accuracy = mean over tasks at the end; forgetting of a task = its best
accuracy after any earlier task - its final accuracy (mean over tasks 1-4).

    .venv/bin/python bench/forgetting.py [--seeds 5] [--epochs 1,3] [--orders 0,1,2] [--workers 2]
        [--scenarios split,permuted] [--methods naive,replay,er-ace,default,joint]

Prints a table per scenario, order and number of passes (mean ± std over seeds),
then one JSON line: every row, and the headline figures of each table (the best
streaming method / joint, its forgetting; default / joint).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import orjson

BATCH = 32
STEPS = 3                 # gradient steps per micro-batch, every method alike
HIDDEN = [128, 128]
LAMBDAS = [1.0, 10.0, 100.0, 1000.0, 10000.0]
DISTILL = [0.1, 0.3]   # train.distill of the DER++ rows (1 and 3 scored lower on every table, 3 seeds)
REPLAY = {"split": {"kind": "class_balanced", "capacity": 200, "ratio": 0.5},
          "permuted": {"kind": "reservoir", "capacity": 200, "ratio": 0.5}}
CONSOLIDATE_EVERY = 500   # examples: EWC consolidates on its own clock, blind to task boundaries
TASKS = 5
# Live forgetting (--live): the service's own probes, a tenth of each segment held out, 15 to 16 segments per
# stream (split digits streams about 3,700 examples, permuted about 18,800), all of them kept and scored.
LIVE_EVAL = {"split": {"segment_size": 250, "probe_size": 25, "every": 250, "segments": 16, "history": False},
             "permuted": {"segment_size": 1250, "probe_size": 125, "every": 250, "segments": 16, "history": False}}
LIVE_METHODS = ("naive", "replay", "replay+ewc λ=10")
DEFAULT_CAPACITY = 200    # the `default` row: the service's settings but for the replay buffer's size
NOT_STREAMING = ("joint",)   # rows left out of "the best streaming method"


def methods(scenario: str) -> list[tuple[str, dict]]:
    """(name, model sections) of each row; all but `default` learn with the service's defaults for the rest."""
    none, replay = {"kind": "none"}, REPLAY[scenario]
    ce, ace = {"loss": "cross_entropy"}, {"loss": "er_ace"}
    out = [("naive", {"replay": none, "ewc": {"lambda": 0.0}, "train": ce}),
           ("replay", {"replay": replay, "ewc": {"lambda": 0.0}, "train": ce})]
    out += [(f"ewc λ={lam:g}", {"replay": none, "ewc": {"lambda": lam}, "train": ce}) for lam in LAMBDAS]
    out += [(f"replay+ewc λ={lam:g}", {"replay": replay, "ewc": {"lambda": lam}, "train": ce}) for lam in LAMBDAS]
    out.append(("er-ace", {"replay": replay, "ewc": {"lambda": 0.0}, "train": ace}))
    out.append(("er-ace+ewc λ=10", {"replay": replay, "ewc": {"lambda": 10.0}, "train": ace}))
    # two replayed rows per incoming one, as the service's default replay.ratio
    out.append(("er-ace+ewc λ=10, 2:1", {"replay": {**replay, "ratio": 0.667}, "ewc": {"lambda": 10.0}, "train": ace}))
    # DER++ on ER-ACE: the buffer also keeps each row's outputs as learned, pulled back to by `train.distill`
    two = {**replay, "ratio": 0.667}
    for alpha in DISTILL:
        out.append((f"der++ α={alpha:g}", {"replay": two, "ewc": {"lambda": 0.0}, "train": {**ace, "distill": alpha}}))
        out.append((f"der++ α={alpha:g} +ewc λ=10", {"replay": two, "ewc": {"lambda": 10.0},
                                                    "train": {**ace, "distill": alpha}}))
    out.append(("default", {"replay": {"capacity": DEFAULT_CAPACITY}}))
    # the service's defaults with logit replay added (α = 0.3 scored lower with one pass, 5 seeds)
    out.append(("default+der++ α=0.1", {"replay": {"capacity": DEFAULT_CAPACITY}, "train": {"distill": 0.1}}))
    out.append(("joint", {"replay": none, "ewc": {"lambda": 0.0}, "train": ce}))
    return out


def selected(names: str) -> Callable[[str], bool]:
    """A filter of method names from `--methods`: "replay+ewc" takes every lambda of it ("" takes all)."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    return lambda name: not wanted or any(name == w or name.startswith((w + " ", w + ",")) for w in wanted)


def class_order(order: int) -> list[int]:
    """The ten digits in task order: 0..9 for order 0, a permutation drawn with seed `order` otherwise."""
    return list(range(10)) if order == 0 else [int(d) for d in np.random.default_rng(order).permutation(10)]


def make_tasks(scenario: str, seed: int, order: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(train x, train y, test x, test y) per task; a 70/30 split per class, drawn with `seed`; split digits pairs
    the classes in `class_order(order)`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(10):
        rows = rng.permutation(np.flatnonzero(digits.target == label))
        cut = int(0.7 * len(rows))
        train.append(rows[:cut])
        test.append(rows[cut:])
    x, y = digits.data.astype(np.float32), digits.target
    if scenario == "split":
        digits_in = class_order(order)
        pairs = [[digits_in[2 * t], digits_in[2 * t + 1]] for t in range(TASKS)]
        return [(x[np.concatenate([train[d] for d in pair])], y[np.concatenate([train[d] for d in pair])],
                 x[np.concatenate([test[d] for d in pair])], y[np.concatenate([test[d] for d in pair])])
                for pair in pairs]
    tr, te = np.concatenate(train), np.concatenate(test)
    perms = [np.arange(64)] + [rng.permutation(64) for _ in range(TASKS - 1)]
    return [(x[tr][:, p], y[tr], x[te][:, p], y[te]) for p in perms]


def stream_rows(tasks, epochs: int, joint: bool, rng: np.random.Generator) -> tuple[list[tuple], list[int]]:
    """The examples in streaming order and the stream position where each task ends (multiples of BATCH)."""
    per_task = []
    for x, y, _, _ in tasks:
        rows = [(x[i], y[i]) for _ in range(epochs) for i in rng.permutation(len(y))]
        per_task.append(rows[:len(rows) - len(rows) % BATCH])
    if joint:
        union = [row for rows in per_task for row in rows]
        return [union[i] for i in rng.permutation(len(union))], [len(union)]
    ends = list(np.cumsum([len(rows) for rows in per_task]))
    return [row for rows in per_task for row in rows], ends


def features(x: np.ndarray) -> dict[str, float]:
    return {f"p{j}": float(v) for j, v in enumerate(x)}


def run_one(job: tuple[str, int, str, dict, int, int, int, bool, bool]) -> dict:
    """One method on one scenario with one seed, through the service; returns the accuracy matrix.

    With `live`, the service also holds out probes per segment of its stream and
    the result carries its exported `streamlearn_forgetting` after each task. With
    `policy` off, drift detections act as without the drift policy (`default`
    and its variants always run as the service is configured out of the box, the policy on).
    """
    import torch

    from streamlearn.config import parse_config
    from streamlearn.service import Service

    scenario, order, name, overrides, seed, epochs, consolidate_every, live, policy = job
    torch.set_num_threads(1)
    tasks = make_tasks(scenario, seed, order)
    rows, ends = stream_rows(tasks, epochs, name == "joint", np.random.default_rng(seed + 1000))
    tests = [([features(x) for x in tx], ty) for _, _, tx, ty in tasks]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "stream.jsonl")
        with open(path, "wb") as out:
            for i, (x, y) in enumerate(rows):
                out.write(orjson.dumps({"id": f"e-{i}", "ts": float(i), "model": "digits", "features": features(x),
                                        "label": int(y)}) + b"\n")
        config = parse_config({
            "source": f"file:{path}", "state_dir": tmp, "seed": seed,
            "intake": {"mode": "inline", "batch_size": BATCH},
            "snapshot": {"enabled": False}, "metrics": {"enabled": False},
            "drift": {"policy": {"enabled": policy or name.startswith("default")}},
            "eval": LIVE_EVAL[scenario] if live else {"probe_size": 0, "history": False},
            "models": {"digits": {"model": "mlp", "params": {"hidden": HIDDEN},
                                  **_merged(name, overrides, consolidate_every or 10 ** 9)}},
        }, env={})
        service = Service(config)
        learner = service.learners["digits"]
        matrix: list[list[float]] = []
        exported: list[float] = []   # the live metric, as Prometheus would scrape it at each task's end

        def after_task(task: int) -> None:
            if not consolidate_every and task < TASKS - 1 and name != "joint" and not name.startswith("default"):
                learner.consolidate()   # told that the task ends: what was learned becomes the EWC anchor
            matrix.append([float(np.mean(np.asarray(learner.predict_many(fx)) == ty)) for fx, ty in tests])
            value = service.registry.get_sample_value("streamlearn_forgetting", {"model": "digits"})
            exported.append(float("nan") if value is None else value)

        def on_batch(service, batch) -> None:
            evaluation = learner.evaluation
            taken = evaluation.learned + (evaluation.probes.held_out if evaluation.probes else 0)
            while len(matrix) < len(ends) - 1 and taken >= ends[len(matrix)]:
                after_task(len(matrix))

        summary = service.run(on_batch=on_batch)
        after_task(len(matrix))
    assert summary["learned"] + summary["held_out"] == len(rows), summary
    return {"scenario": scenario, "order": order, "epochs": epochs, "method": name, "seed": seed,
            "matrix": matrix, "exported": exported}


def _merged(name: str, overrides: dict, consolidate_every: int) -> dict:
    """The model's sections: the method's, on the bench's micro-batches; `default` keeps the service's steps per
    batch and consolidation clock, every other method gets the bench's."""
    sections = {section: dict(values) for section, values in overrides.items()}
    # max_wait: the stream's event times are its positions, so only the count cuts micro-batches
    sections["train"] = {"batch_size": BATCH, "max_wait": 3600.0, "max_classes": 10, **sections.get("train", {})}
    if not name.startswith("default"):
        sections["train"].setdefault("steps_per_batch", STEPS)
        sections["ewc"]["consolidate"] = {"every_examples": consolidate_every, "on_drift": True}
    return sections


def final_accuracy(matrix: list[list[float]]) -> float:
    return float(np.mean(matrix[-1]))


def forgetting(matrix: list[list[float]]) -> float:
    """Mean over all but the last task of (best accuracy after an earlier task - final accuracy)."""
    if len(matrix) < 2:
        return float("nan")
    final = matrix[-1]
    return float(np.mean([max(row[j] for row in matrix[j:-1]) - final[j] for j in range(len(final) - 1)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", default="1,3", help="passes over each task's examples; a row set per value")
    parser.add_argument("--orders", default="0,1,2",
                        help="split digits class orders: 0 the bench's, k > 0 a permutation drawn with seed k")
    parser.add_argument("--methods", default="", help="comma list of method names (\"replay+ewc\": every lambda)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scenarios", default="split,permuted")
    parser.add_argument("--consolidate-every", type=int, default=CONSOLIDATE_EVERY,
                        help="examples between EWC consolidations; 0: at each task's end instead (told the boundary)")
    parser.add_argument("--drift-policy", choices=("on", "off"), default="off",
                        help="the drift policy for every row but `default` (which has it on, as the service): off "
                             "measures the continual-learning methods alone (on, it takes each new permutation of "
                             "the permuted digits for a real change and drops replay and the EWC anchor)")
    parser.add_argument("--live", action="store_true",
                        help="instead of the table: the service's exported forgetting metric (its own probes) "
                             "for naive, replay and replay+EWC, next to the offline figure of the same runs")
    args = parser.parse_args()
    wanted = selected(args.methods)
    jobs = [(scenario, order, name, overrides, seed, epochs, args.consolidate_every, args.live,
             args.drift_policy == "on")
            for scenario, order in settings(args) for epochs in passes(args)
            for name, overrides in methods(scenario)
            if wanted(name) and (not args.live or name in LIVE_METHODS) for seed in range(args.seeds)]
    # The longest jobs first, so that two workers finish together.
    ranked = sorted(range(len(jobs)), key=lambda i: -(jobs[i][5] * (5 if jobs[i][0] == "permuted" else 1)))
    with mp.get_context("fork").Pool(args.workers) as pool:
        done = pool.map(run_one, [jobs[i] for i in ranked], chunksize=1)
    results = [r for _, r in sorted(zip(ranked, done))]
    (report_live if args.live else report)(args, results)


def settings(args) -> list[tuple[str, int]]:
    """(scenario, class order) pairs: split digits in each of `--orders`; the permuted scenario has one order."""
    orders = [int(o) for o in args.orders.split(",")]
    return [(scenario, order) for scenario in args.scenarios.split(",")
            for order in (orders if scenario == "split" else [0])]


def passes(args) -> list[int]:
    return [int(e) for e in args.epochs.split(",")]


Key = tuple[str, int, int, str]   # scenario, class order, passes, method


def summarize(results: list[dict]) -> dict[Key, dict[str, tuple[float, float]]]:
    table: dict[Key, dict[str, list[float]]] = {}
    for r in results:
        row = table.setdefault((r["scenario"], r["order"], r["epochs"], r["method"]), {"acc": [], "forget": []})
        row["acc"].append(final_accuracy(r["matrix"]))
        row["forget"].append(forgetting(r["matrix"]))
    return {key: {k: (float(np.mean(v)), float(np.std(v))) for k, v in row.items()} for key, row in table.items()}


def headline(table: dict[Key, dict], scenario: str, order: int, epochs: int) -> dict:
    """The best streaming method's accuracy / joint and its forgetting; default / joint (where those rows ran)."""
    rows = {key[3]: row for key, row in table.items() if key[:3] == (scenario, order, epochs)}
    out: dict = {}
    streaming = {name: row for name, row in rows.items() if name not in NOT_STREAMING}
    joint = rows.get("joint", {}).get("acc", (float("nan"),))[0]
    if streaming:
        best = max(streaming, key=lambda name: streaming[name]["acc"][0])
        out.update(best=best, best_accuracy=round(streaming[best]["acc"][0], 4),
                   best_forgetting=round(streaming[best]["forget"][0], 4),
                   best_of_joint=round(streaming[best]["acc"][0] / joint, 4))
    if "default" in rows:
        out.update(default_accuracy=round(rows["default"]["acc"][0], 4),
                   default_forgetting=round(rows["default"]["forget"][0], 4),
                   default_of_joint=round(rows["default"]["acc"][0] / joint, 4))
    out["joint"] = round(joint, 4)
    return out


def label(scenario: str, order: int, epochs: int) -> str:
    return f"{scenario}{f' order {order}' if scenario == 'split' else ''}, {epochs} pass{'es' if epochs > 1 else ''}"


def report(args, results: list[dict]) -> None:
    table = summarize(results)
    wanted = selected(args.methods)
    heads = {}
    for scenario, order in settings(args):
        for epochs in passes(args):
            classes = f" (classes {class_order(order)})" if scenario == "split" else ""
            print(f"\n{label(scenario, order, epochs)}{classes}: {TASKS} tasks, MLP {HIDDEN}, batch {BATCH}, "
                  f"{args.seeds} seeds; replay {REPLAY[scenario]}")
            print(f"  {'method':<22} {'final accuracy':>16} {'forgetting':>16}")
            for name, _ in methods(scenario):
                if not wanted(name):
                    continue
                row = table[(scenario, order, epochs, name)]
                fg = "—" if name == "joint" else f"{row['forget'][0]:.3f} ± {row['forget'][1]:.3f}"
                print(f"  {name:<22} {row['acc'][0]:>8.3f} ± {row['acc'][1]:.3f} {fg:>16}")
            heads[label(scenario, order, epochs)] = head = headline(table, scenario, order, epochs)
            print("  " + ", ".join(f"{k} {v}" for k, v in head.items()))
    rows = {f"{label(*key[:3])}: {key[3]}": {"accuracy": round(row["acc"][0], 4),
                                              "forgetting": round(row["forget"][0], 4)}
            for key, row in table.items()}
    print(json.dumps({"headline": heads, "rows": rows}, ensure_ascii=False))


def report_live(args, results: list[dict]) -> None:
    """Exported `streamlearn_forgetting` at the end of the stream (and its mean over task ends) per method."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in results:
        row = rows.setdefault((label(r["scenario"], r["order"], r["epochs"]), r["method"]),
                              {"live": [], "live_mean": [], "offline": []})
        row["live"].append(r["exported"][-1])
        row["live_mean"].append(float(np.nanmean(r["exported"][1:])))
        row["offline"].append(forgetting(r["matrix"]))
    sizes = ", ".join(f"{s} {e['probe_size']} of every {e['segment_size']}" for s, e in LIVE_EVAL.items())
    print(f"\nlive forgetting: exported streamlearn_forgetting (probes: {sizes} examples), {args.seeds} seeds")
    print(f"  {'scenario':<26} {'method':<18} {'exported, end':>16} {'exported, mean':>16} {'offline table':>16}")
    out = {}
    for (scenario, method), row in rows.items():
        cells = {k: (float(np.mean(v)), float(np.std(v))) for k, v in row.items()}
        print(f"  {scenario:<26} {method:<18}" + "".join(f" {m:>8.3f} ± {sd:.3f}" for m, sd in cells.values()))
        out[f"{scenario}_{method}"] = {k: round(m, 4) for k, (m, _) in cells.items()}
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
