"""End-to-end throughput and loop latency of the service on the real two-topic path.

Inference logs and feedback go to the embedded broker (2 partitions each); the
service consumes both, joins, and learns test-then-train. Next to it, in the same
run, the bare River loop does the same work on the same examples already in
memory (predict_proba_one + learn_one, same model). The torch learner (an MLP)
is measured the same way at micro-batches of 32 and 256, plain and with replay +
EWC, against the bare torch loop of `torch_loop.py` on the same tensors. Then a
fixed offered rate, below capacity, gives the feedback-to-learned latency, with the
default and the low-latency setting (`latency.py`, which also splits it by stage).

What bounds the Kafka path is measured in the same rounds (`limits.py`): the bare
consume of the two topics with the same client and no decoding, the intake alone
(decode, validate, join, hand-off; no learner), and a hand-written confluent-kafka
loop with a dict join and no guarantees. The service's limit is the lower of the
bare learner and the bare consume; the service is reported against it too.

    .venv/bin/python bench/throughput.py [--examples 100000] [--torch-examples 50000] [--repeat 3]
                                         [--rate 5000] [--seconds 10]

Prints a table, then one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid

import orjson

import torch
from limits import bare_consume, dict_join_loop, intake_alone
from torch_loop import bare_torch_loop, encoded, learner_loop, model_table

from streamlearn.config import parse_config
from streamlearn.learners.models import build_model
from streamlearn.service import Service
from streamlearn.stream.broker import EmbeddedBroker

MODEL = "scaled_logreg"  # StandardScaler | LogisticRegression
TOPICS = ("inference-logs", "feedback", "examples")
START_TS = 1_763_800_000.0
STEADY_SHARE = 0.95
TORCH_RUNS = ((32, "plain"), (32, "replay+ewc"), (256, "plain"), (256, "replay+ewc"), (32, "ewc"))


def make_examples(n: int, seed: int) -> list[tuple[str, dict, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x = {f"f{k}": round(rng.uniform(0, 10), 4) for k in range(6)}
        drift = i > n // 2
        y = int(x["f0"] + x["f1"] <= (7.0 if drift else 8.0))
        out.append((f"r-{i:08d}", x, y))
    return out


def encode_pair(rid: str, x: dict, y: int, ts: float, delay: float = 0.5) -> tuple[bytes, bytes]:
    """The inference log at `ts` and its feedback `delay` seconds later."""
    log = orjson.dumps({"request_id": rid, "ts": ts, "model": "default", "model_version": "1",
                        "features": x, "prediction": 0, "proba": {"0": 0.8, "1": 0.2}})
    feedback = orjson.dumps({"request_id": rid, "ts": ts + delay, "label": y, "source": "explicit", "weight": 1.0})
    return log, feedback


def produce_backlog(bootstrap: str, examples) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, (rid, x, y) in enumerate(examples):
        log, feedback = encode_pair(rid, x, y, START_TS + i * 0.001)
        _produce(producer, "inference-logs", rid, log)
        _produce(producer, "feedback", rid, feedback)
    producer.flush()


def _produce(producer, topic: str, key: str, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key.encode())
            return
        except BufferError:
            producer.poll(0.01)


def bare_loop(examples) -> float:
    """The bare River loop: the same model, test-then-train, examples already in memory."""
    model = build_model(MODEL, "classification", {}, seed=42)
    started = time.perf_counter()
    for _, x, y in examples:
        model.predict_proba_one(x)
        model.learn_one(x, y)
    return len(examples) / (time.perf_counter() - started)


def service_config(bootstrap: str, client: str, mode: str, model: dict | None = None, processes: int = 1):
    return parse_config({
        "kafka": {"bootstrap_servers": bootstrap, "client": client, "group_id": f"bench-{uuid.uuid4().hex[:8]}",
                  "session_timeout_ms": 6000, "examples_topic": ""},
        "intake": {"mode": mode, "processes": processes},
        "models": {"default": model or {"model": MODEL}},
        "metrics": {"enabled": False},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-bench-"),
    }, env={})


def service_throughput(bootstrap: str, client: str, mode: str, total: int, model: dict | None = None,
                       processes: int = 1) -> float:
    """Steady-state examples/s: from the first learned batch until 95% of the backlog is learned.

    The group join before and the tail after are left out (as they were when the tail waited for
    `join.idle_timeout`; a finished backlog is released at once now).
    """
    marks: list[tuple[float, int]] = []

    def taken(service: Service) -> int:   # learned, or held out as a forgetting probe (scored, never learned)
        return service.learned + service.held_out

    def on_batch(service: Service, batch) -> None:
        if batch.examples and (not marks or marks[-1][1] < STEADY_SHARE * total):
            marks.append((time.perf_counter(), taken(service)))

    Service(service_config(bootstrap, client, mode, model, processes)).run(until=lambda s: taken(s) >= total, on_batch=on_batch)
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


# (client, intake mode, intake processes)
SERVICE_PATHS = (("confluent-kafka", "process", 1), ("kafka-python", "process", 1), ("confluent-kafka", "inline", 1),
                 ("confluent-kafka", "process", 2))
LIMITS = ("bare consume", "intake alone", "dict join loop", "intake alone, 2 processes")


def limit_rounds(bootstrap: str, total: int) -> dict[str, float]:
    """One round of the reference rows of `limits.py` on the backlog (examples/s)."""
    return {"bare consume": bare_consume(bootstrap, TOPICS[:2], total),
            "intake alone": intake_alone(service_config(bootstrap, "confluent-kafka", "process"), total),
            "dict join loop": dict_join_loop(bootstrap, TOPICS[:2], total, MODEL),
            "intake alone, 2 processes": intake_alone(service_config(bootstrap, "confluent-kafka", "process",
                                                                     processes=2), total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--torch-examples", type=int, default=50_000, help="examples per torch learner run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each figure is the median of its rounds")
    parser.add_argument("--rate", type=float, default=5_000.0, help="offered examples/s for the latency run")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    examples = make_examples(args.examples, seed=1)
    torch.set_num_threads(1)  # as the service does (torch_threads = 1): small networks lose to thread hand-offs
    x, y = encoded(examples[:args.torch_examples])
    bare: list[float] = []
    service: dict[tuple[str, str, int], list[float]] = {path: [] for path in SERVICE_PATHS}
    limits: dict[str, list[float]] = {name: [] for name in LIMITS}
    torch_runs: dict[tuple[int, str], dict[str, list[float]]] = {
        run: {"bare": [], "learner": [], "service": []} for run in TORCH_RUNS}
    with EmbeddedBroker() as broker:
        broker.create_topics(TOPICS, partitions=2)
        produce_backlog(broker.bootstrap_servers, examples)
        for _ in range(args.repeat):  # interleaved, so that a machine that drifts affects both sides alike
            bare.append(bare_loop(examples))
            for client, mode, processes in SERVICE_PATHS:
                service[(client, mode, processes)].append(
                    service_throughput(broker.bootstrap_servers, client, mode, len(examples), processes=processes))
            for name, eps in limit_rounds(broker.bootstrap_servers, len(examples)).items():
                limits[name].append(eps)
            for batch, config in TORCH_RUNS:
                torch_runs[(batch, config)]["bare"].append(bare_torch_loop(x, y, batch, config))
                torch_runs[(batch, config)]["learner"].append(learner_loop(examples[:args.torch_examples], batch, config))
                torch_runs[(batch, config)]["service"].append(service_throughput(
                    broker.bootstrap_servers, "confluent-kafka", "process", args.torch_examples,
                    model_table(batch, config)))

    from latency import measured, print_run   # imports this module: not at the top (no cycle)

    runs = {setting: measured(args.rate, args.seconds, setting) for setting in ("default", "low")}
    for run in runs.values():
        print_run(run, args.rate)
    report(args, bare, service, limits, runs, torch_runs)


def report(args, bare: list[float], service: dict[tuple[str, str, int], list[float]], limits: dict[str, list[float]],
           latency_runs: dict, torch_runs: dict[tuple[int, str], dict[str, list[float]]]) -> None:
    bare_eps = statistics.median(bare)
    print(f"{'path':<40} {'examples/s':>11} {'min':>9} {'max':>9} {'x bare':>7}")
    print(f"{'bare River loop (in memory)':<40} {bare_eps:>11,.0f} {min(bare):>9,.0f} {max(bare):>9,.0f} {1:>7.2f}")
    medians = {}
    for (client, mode, processes), runs in service.items():
        medians[(client, mode, processes)] = eps = statistics.median(runs)
        path = f"service: {client}, intake {mode}" + (f" x{processes}" if processes > 1 else "")
        print(f"{path:<40} {eps:>11,.0f} {min(runs):>9,.0f} {max(runs):>9,.0f} {eps / bare_eps:>7.2f}")
    limit_eps = {name: statistics.median(runs) for name, runs in limits.items()}
    for name, runs in limits.items():
        print(f"{'reference: ' + name:<40} {limit_eps[name]:>11,.0f} {min(runs):>9,.0f} {max(runs):>9,.0f} "
              f"{limit_eps[name] / bare_eps:>7.2f}")
    limit = min(bare_eps, limit_eps["bare consume"])
    service_eps = medians[SERVICE_PATHS[0]]
    print(f"limit (lower of bare learner and bare consume) {limit:,.0f} examples/s: service (confluent-kafka, intake "
          f"process) {service_eps / limit:.2f} x limit, {service_eps / limit_eps['dict join loop']:.2f} x the dict "
          f"join loop; intake alone {limit_eps['intake alone'] / limit_eps['bare consume']:.2f} x bare consume")
    from latency import figures

    latency = latency_runs["default"]
    p50, p99 = latency.quantile(0.5), latency.quantile(0.99)
    low = latency_runs["low"]
    print(f"median of {args.repeat} rounds of {args.examples:,} examples; loop latency at {args.rate:,.0f} examples/s "
          f"offered: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms ({len(latency.latencies):,} examples); "
          f"low-latency setting: p50 {low.quantile(0.5) * 1000:.1f} ms, p99 {low.quantile(0.99) * 1000:.1f} ms")
    print(f"\n{'torch learner (MLP 64-64, Adam)':<32} {'service':>9} {'learner':>9} {'bare loop':>10} "
          f"{'service/bare':>13} {'learner/bare':>13}")
    torch_figures = {}
    for (batch, config), runs in torch_runs.items():
        eps, alone, bare_torch = (statistics.median(runs[k]) for k in ("service", "learner", "bare"))
        print(f"{f'batch {batch}, {config}':<32} {eps:>9,.0f} {alone:>9,.0f} {bare_torch:>10,.0f} "
              f"{eps / bare_torch:>13.2f} {alone / bare_torch:>13.2f}")
        key = f"torch_{batch}_{config.replace('+', '_')}"
        torch_figures.update({f"{key}_eps": round(eps), f"{key}_learner_eps": round(alone),
                              f"{key}_bare_eps": round(bare_torch), f"{key}_ratio": round(eps / bare_torch, 3),
                              f"{key}_learner_ratio": round(alone / bare_torch, 3)})
    ewc_cost = 1 - torch_figures["torch_32_ewc_learner_eps"] / torch_figures["torch_32_plain_learner_eps"]
    torch_figures["torch_32_ewc_cost"] = round(ewc_cost, 3)
    print(f"service: end to end through Kafka; learner: the TorchLearner alone on the same examples in memory. "
          f"EWC penalty at batch 32: {100 * ewc_cost:.1f}% of the learner's throughput (ewc vs plain)")
    service_eps, kafka_python_eps, inline_eps, two_intakes_eps = (medians[path] for path in SERVICE_PATHS)
    consume_eps, intake_eps, loop_eps, two_intakes_alone_eps = (limit_eps[name] for name in LIMITS)
    print(json.dumps({
        "service_eps": round(service_eps), "bare_eps": round(bare_eps), "ratio": round(service_eps / bare_eps, 3),
        "bare_consume_eps": round(consume_eps), "intake_eps": round(intake_eps), "dict_join_loop_eps": round(loop_eps),
        "limit_eps": round(limit), "limit_ratio": round(service_eps / limit, 3),
        "loop_ratio": round(service_eps / loop_eps, 3), "intake_consume_ratio": round(intake_eps / consume_eps, 3),
        "kafka_python_eps": round(kafka_python_eps), "kafka_python_ratio": round(kafka_python_eps / bare_eps, 3),
        "inline_eps": round(inline_eps), "inline_ratio": round(inline_eps / bare_eps, 3),
        "two_intakes_eps": round(two_intakes_eps), "two_intakes_ratio": round(two_intakes_eps / bare_eps, 3),
        "two_intakes_alone_eps": round(two_intakes_alone_eps),
        "offered_rate": args.rate, "latency_p50_ms": round(p50 * 1000, 1), "latency_p99_ms": round(p99 * 1000, 1),
        **{k: v for run, prefix in ((latency, "latency_"), (low, "latency_low_"))
           for k, v in figures(run, prefix).items() if k not in ("latency_p50_ms", "latency_p99_ms")},
        **torch_figures,
    }))


if __name__ == "__main__":
    main()
