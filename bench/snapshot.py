"""Snapshot cost: write time and learning-loop stall for model states of about 1, 10 and 100 MB.

A wide linear model (StandardScaler | LogisticRegression over a vocabulary of
sparse features, the shape of a bag-of-words classifier) is grown to the target
size; then the service learns a stream of examples from a file with snapshots at
the default settings (every 100,000 examples or 60 s, serialize = "fork").
Reported per size: snapshot bytes, write time (barrier to durable), the loop's
stall per snapshot, the interval between snapshots and the stall's share of it.
In the same run: the service with snapshots off (the bare learner's throughput,
for the ratio) and serialize = "inline" (what the fork saves).

    .venv/bin/python bench/snapshot.py [--examples 600000] [--sizes 1,10,100]

Prints a table, then one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from streamlearn.config import parse_config
from streamlearn.service import Service

BYTES_PER_FEATURE = 54     # pickled StandardScaler | LogisticRegression, measured
FEATURES_PER_EXAMPLE = 8
START_TS = 1_763_800_000.0


def write_stream(path: Path, examples: int, vocabulary: int, seed: int) -> None:
    """Pre-joined examples over the first `vocabulary` feature names; the label follows two of them."""
    rng = random.Random(seed)
    with open(path, "wb") as out:
        for i in range(examples):
            x = {f"w{rng.randrange(vocabulary)}": round(rng.uniform(0, 1), 3) for _ in range(FEATURES_PER_EXAMPLE)}
            x["bias"] = 1.0
            y = int(sum(x.values()) > FEATURES_PER_EXAMPLE / 2 + 1)
            out.write(orjson.dumps({"id": f"e-{i}", "ts": START_TS + i * 0.001, "features": x, "label": y}) + b"\n")


def grow(model, features: int) -> None:
    """Gives the model a weight (and scaler statistics) for each of `features` feature names."""
    chunk = 100_000
    for start in range(0, features, chunk):
        model.learn_one({f"w{i}": 1.0 for i in range(start, min(features, start + chunk))}, start % 2 == 0)


def run(stream: Path, features: int, snapshots: str) -> dict:
    """One service run over the stream; `snapshots` is "off", "fork" or "inline"."""
    with tempfile.TemporaryDirectory() as state_dir:
        config = parse_config({
            "source": f"file:{stream}", "state_dir": state_dir, "metrics": {"enabled": False},
            "models": {"default": {"model": "scaled_logreg"}},
            "snapshot": {"enabled": snapshots != "off", "serialize": "fork" if snapshots == "off" else snapshots},
        }, env={})
        service = Service(config)
        grow(service.learners["default"].model, features)
        stalls, barriers = [], []

        def on_batch(service: Service, batch) -> None:
            # The triggered snapshots only: the final one on shutdown stalls nothing that is still learning.
            if batch.barrier is not None and service.snapshots is not None and not batch.final:
                barriers.append(time.perf_counter())
                stalls.append(service.snapshots.stall.total - sum(stalls))

        summary = service.run(on_batch=on_batch)
        service.close()
        result = {"eps": summary["learned"] / summary["elapsed_seconds"], "learned": summary["learned"]}
        if service.snapshots is not None:
            service.snapshots.wait()
            sizes = [sum(f.stat().st_size for f in snap.iterdir()) for snap in Path(state_dir, "snapshots").glob("snap-*")]
            writes = service.snapshots.seconds
            intervals = [b - a for a, b in zip(barriers, barriers[1:])]
            result.update(
                state_mb=max(sizes) / 1e6, snapshots=len(barriers), failures=service.snapshots.failures,
                write_s=writes.total / writes.count if writes.count else float("nan"),
                stall_ms=1000 * statistics.mean(stalls), stall_max_ms=1000 * max(stalls),
                interval_s=statistics.mean(intervals) if intervals else float("nan"))
            result["stall_share"] = result["stall_ms"] / 1000 / result["interval_s"]
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=600_000)
    parser.add_argument("--sizes", default="1,10,100", help="target model sizes in MB")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [float(s) for s in args.sizes.split(",")]:
            features = int(size * 1e6 / BYTES_PER_FEATURE)
            stream = Path(tmp, "stream.jsonl")
            write_stream(stream, args.examples, features, args.seed)
            off, fork, inline = (run(stream, features, mode) for mode in ("off", "fork", "inline"))
            rows.append({"target_mb": size, "off": off, "fork": fork, "inline": inline})
            print(f"{size:g} MB done: fork stall {fork['stall_ms']:.1f} ms, inline {inline['stall_ms']:.1f} ms",
                  flush=True)
    report(args, rows)


def report(args, rows: list[dict]) -> None:
    print(f"\nSnapshots at the default settings, {args.examples:,} examples per run "
          f"(every 100,000 examples or 60 s; the final one on shutdown not counted)\n")
    print(f"{'state':>9} {'snaps':>5} {'write s':>8} {'stall ms':>9} {'max ms':>8} {'interval s':>10} "
          f"{'stall %':>8} {'inline ms':>10} {'ex/s':>8} {'off ex/s':>9} {'ratio':>6}")
    for row in rows:
        fork, inline, off = row["fork"], row["inline"], row["off"]
        print(f"{fork['state_mb']:>6.1f} MB {fork['snapshots']:>5} {fork['write_s']:>8.3f} {fork['stall_ms']:>9.1f} "
              f"{fork['stall_max_ms']:>8.1f} {fork['interval_s']:>10.2f} {100 * fork['stall_share']:>7.2f}% "
              f"{inline['stall_ms']:>10.1f} {fork['eps']:>8,.0f} {off['eps']:>9,.0f} {fork['eps'] / off['eps']:>6.2f}")
    print("\nstall: learning-loop time per snapshot (fork: the fork; inline: pickling in the loop);"
          " ratio: ex/s with snapshots over ex/s with them off")
    print(json.dumps({
        "state_mb": [round(r["fork"]["state_mb"], 2) for r in rows],
        "write_s": [round(r["fork"]["write_s"], 3) for r in rows],
        "stall_ms": [round(r["fork"]["stall_ms"], 2) for r in rows],
        "stall_share": [round(r["fork"]["stall_share"], 4) for r in rows],
        "inline_stall_ms": [round(r["inline"]["stall_ms"], 1) for r in rows],
        "service_eps": [round(r["fork"]["eps"]) for r in rows],
        "snapshots_off_eps": [round(r["off"]["eps"]) for r in rows],
        "ratio": [round(r["fork"]["eps"] / r["off"]["eps"], 3) for r in rows],
    }))


if __name__ == "__main__":
    main()
