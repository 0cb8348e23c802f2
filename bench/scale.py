"""The cost of one parameter sync between replicas, by model size (gloo on loopback).

Two replica processes join one torch.distributed process group (gloo, TCP on
127.0.0.1) and time `ReplicaGroup.average`, what a sync costs each replica: its
parameter sets as bytes (`streamlearn.cluster.wire`), gathered from every replica,
decoded and combined. Two model shapes:

- **torch**: one flat float32 tensor of 10k to 10M parameters (`TorchParameters`),
  averaged by a weighted all-reduce in float64; beside it, in the same run, a bare
  `all_reduce` of the same float32 tensor: the floor on this transport.
- **River**: a `StandardScaler | LogisticRegression` over 1k to 100k features
  (weights keyed by feature name, and the scaler's statistics).

Reported per size: median milliseconds per sync, the bytes each replica hands in (its
gathered header, and its positional values as float64 for the all-reduce), and the
ratio to the bare all-reduce. What a sync costs a service is this times the syncs
per second (`cluster.sync_every` seconds of event time apart); what the replicas'
examples/s are end to end is not measured here yet (the replica runtime of issue 19).

    .venv/bin/python bench/scale.py [--repeat 5]

Prints a table, then one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TORCH_SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
RIVER_FEATURES = (1_000, 10_000, 100_000)
REPLICAS = 2


def torch_sets(size: int, rank: int):
    from streamlearn.learners.averaging import ParameterSet, Values

    values = np.random.default_rng(rank).standard_normal(size).astype(np.float32)
    return {"default": ParameterSet(float(rank + 1), {"flat": Values(values)})}


def river_sets(features: int, rank: int):
    from streamlearn.learners.averaging import Moments, ParameterSet, Values

    rng = np.random.default_rng(rank)
    keys = tuple(f"w{i}" for i in range(features))
    weights = Values(rng.standard_normal(features), keys)
    moments = Moments(keys, np.full(features, 100.0), rng.standard_normal(features), rng.random(features))
    return {"default": ParameterSet(float(rank + 1), {"LogisticRegression.weights": weights,
                                                      "LogisticRegression.intercept": Values(np.zeros(1))},
                                    {"StandardScaler": moments})}


def timed(call, repeat: int) -> float:
    """Median seconds of `repeat` calls after one to warm up."""
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def replica(rank: int, port: int, repeat: int) -> None:
    """One replica: times each sync in step with the other (collectives), rank 0 prints a JSON line per size."""
    import torch
    import torch.distributed as dist

    from streamlearn.cluster.group import ReplicaGroup, sync_bytes

    torch.set_num_threads(1)
    group = ReplicaGroup(rank, REPLICAS, init_method=f"tcp://127.0.0.1:{port}", timeout=600)
    rows = []
    for kind, sizes, make in (("torch", TORCH_SIZES, torch_sets), ("river", RIVER_FEATURES, river_sets)):
        for size in sizes:
            sets = make(size, rank)
            reps = max(1, repeat if size < 1_000_000 else repeat // 2)
            sync = timed(lambda: group.average(sets), reps)
            row = {"kind": kind, "size": size, "sync_s": sync, "bytes": sync_bytes(sets)}
            if kind == "torch":
                tensor = torch.from_numpy(sets["default"].values["flat"].values.copy())
                row["all_reduce_s"] = timed(lambda: dist.all_reduce(tensor), reps)
            rows.append(row)
    group.close()
    if rank == 0:
        print(json.dumps(rows), flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed syncs per size (half of it from 1M parameters)")
    parser.add_argument("--replica", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica is not None:
        replica(args.replica, args.port, args.repeat)
        return
    port = free_port()
    processes = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--replica", str(rank), "--port",
                                   str(port), "--repeat", str(args.repeat)], stdout=subprocess.PIPE, text=True)
                 for rank in range(REPLICAS)]
    outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        sys.exit(f"a replica failed: exit codes {[p.returncode for p in processes]}")
    report(json.loads(outputs[0].strip().splitlines()[-1]))


def report(rows: list[dict]) -> None:
    print(f"{'model':<8} {'parameters':>12} {'bytes in':>12} {'sync ms':>9} {'all-reduce ms':>14} {'x all-reduce':>13}")
    figures = {}
    for row in rows:
        ms = row["sync_s"] * 1000
        reduce_ms = row.get("all_reduce_s", float("nan")) * 1000
        print(f"{row['kind']:<8} {row['size']:>12,} {row['bytes']:>12,} {ms:>9.2f} {reduce_ms:>14.2f} "
              f"{ms / reduce_ms:>13.1f}" if row["kind"] == "torch" else
              f"{row['kind']:<8} {row['size']:>12,} {row['bytes']:>12,} {ms:>9.2f} {'':>14} {'':>13}")
        key = f"{row['kind']}_{row['size']}"
        figures[f"{key}_sync_ms"] = round(ms, 3)
        if row["kind"] == "torch":
            figures[f"{key}_all_reduce_ms"] = round(reduce_ms, 3)
    print(f"{REPLICAS} replicas on one machine, gloo over TCP loopback; River sizes are features (weights + scaler "
          "statistics, keyed by name)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
