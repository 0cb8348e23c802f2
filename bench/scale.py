"""The cost of one parameter sync between replicas by model size (gloo on loopback), and of two replicas end to end.

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
per second (`cluster.sync_every` seconds of event time apart).

Then end to end: one replica, then two, learn the same backlog on the embedded broker
(4 partitions a topic, two River models); examples/s and CPU microseconds per example
of every process, from the first to the last example learned. On one machine two
replicas share its cores: the figure to read is the CPU per example.

    .venv/bin/python bench/scale.py [--repeat 5] [--requests 100000]

Prints a table, then one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streamlearn.stream.broker import free_port

TORCH_SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
RIVER_FEATURES = (1_000, 10_000, 100_000)
REPLICAS = 2
IDLE_END = 10.0   # seconds without a newly learned example that end an end-to-end run


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


def end_to_end(requests: int, models: list[str]) -> list[dict]:
    """For each model kind, one replica, then two, each learning the same backlog (4 partitions a topic, two models
    of that kind) to its end: examples/s from the first to the last example learned, and CPU microseconds per
    example of every process (learners, intakes) over the same span."""
    from backlog import BacklogSpec, backlog_on_broker, metrics_port, scrape, start_service, write_config
    from streamlearn.stream.broker import EmbeddedBroker

    spec = BacklogSpec(requests=requests, seed=5)
    folder = Path(tempfile.mkdtemp(prefix="streamlearn-scale-"))
    rows = []
    with EmbeddedBroker() as broker:
        topics, produced = backlog_on_broker(broker, spec, None)
        for model, replicas in [(m, r) for m in models for r in (1, 2)]:
            port, group = free_port(), f"scale-{replicas}-{time.monotonic_ns()}"
            configs = []
            for rank in range(replicas):
                cluster = (f"[cluster]\nreplicas = {replicas}\nrank = {rank}\n"
                           f"init_method = \"tcp://127.0.0.1:{port}\"\nsync_every = 60\n") if replicas > 1 else ""
                name = f"{model}-r{replicas}-{rank}"
                config = write_config(folder / f"{name}.toml", folder / name, "kafka", broker.bootstrap_servers,
                                      topics, group, extra="[eval]\nprobe_size = 0\n[drift.policy]\nenabled = false\n"
                                      + cluster)
                config.write_text(config.read_text().replace("[snapshot]\n", "[snapshot]\nenabled = false\n")
                                  .replace('model = "logreg"', f'model = "{model}"'))
                (folder / name).mkdir()
                configs.append((config, folder / f"{name}.log"))
            processes = [start_service(config, log) for config, log in configs]
            ports = [metrics_port(log, p) for (_, log), p in zip(configs, processes)]
            marks = []   # (time, learned, CPU seconds of every replica's processes) while learning grows
            last_growth = time.monotonic()
            while time.monotonic() - last_growth < IDLE_END:
                learned = sum((scrape(p) or (0.0, 0.0))[0] for p in ports)
                if learned > (marks[-1][1] if marks else 0):
                    last_growth = time.monotonic()
                    marks.append((last_growth, learned, sum(cpu_seconds(p.pid) for p in processes)))
                time.sleep(0.05)
            for p in processes:
                p.send_signal(signal.SIGTERM)
            for p in processes:
                p.wait(timeout=120)
            (t0, n0, c0), (t1, n1, c1) = marks[0], marks[-1]
            rows.append({"model": model, "replicas": replicas, "learned": int(n1), "eps": (n1 - n0) / (t1 - t0),
                         "cpu_us_per_example": 1e6 * (c1 - c0) / (n1 - n0)})
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a service process and its intake child so far (0 once gone)."""
    from backlog import intake_pid

    total = 0.0
    for p in (pid, intake_pid(pid)):
        try:
            with open(f"/proc/{p}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError, TypeError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed syncs per size (half of it from 1M parameters)")
    parser.add_argument("--requests", type=int, default=100_000, help="requests of the end-to-end backlog (0: skip)")
    parser.add_argument("--models", default="logreg,mlp", help="model kinds of the end-to-end runs, comma-separated")
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
    report(json.loads(outputs[0].strip().splitlines()[-1]), end_to_end(args.requests, args.models.split(",")) if args.requests else [])


def report(rows: list[dict], runs: list[dict]) -> None:
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
    if runs:
        print(f"\n{'model':<8} {'replicas':<9} {'learned':>9} {'examples/s':>11} {'CPU us/example':>15}")
        for run in runs:
            print(f"{run['model']:<8} {run['replicas']:<9} {run['learned']:>9,} {run['eps']:>11,.0f} "
                  f"{run['cpu_us_per_example']:>15.1f}")
            key = f"{run['model']}_replicas_{run['replicas']}"
            figures[f"{key}_eps"] = round(run["eps"])
            figures[f"{key}_cpu_us_per_example"] = round(run["cpu_us_per_example"], 1)
        print("end to end on this machine: the same backlog of two models of each kind, from the first to the last "
              "example learned (every process shares the same 2 cores and the broker)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
