"""A poisoning burst on the real broker: the gate keeps production on the last good version, then recovers.

The stream (pre-joined examples on Kafka) has a clean concept, then a burst whose
labels are all flipped, then the clean concept again. The learner follows the
burst and forgets the concept; the candidates made from its poisoned state score
far worse than production on the probes of the older segments, so the gate
rejects them, and nothing of the burst reaches serving; after the burst the
learner relearns and a candidate is promoted again. All of it is checked in the
registry, in the `model-updates` topic and in what `load_production` hands out.
"""

from __future__ import annotations

import json
import random
import tempfile
import uuid

import msgspec
from river import linear_model, optim, preprocessing

from streamlearn.config import parse_config
from streamlearn.deploy import load_production
from streamlearn.deploy.artifacts import open_artifacts
from streamlearn.deploy.loader import load_version
from streamlearn.deploy.records import ModelUpdate
from streamlearn.deploy.registry import open_registry
from streamlearn.service import Service
from tests.test_service_kafka import read_topic

EXAMPLES, BURST = 11_000, (4_500, 7_000)   # the labels of examples BURST[0] .. BURST[1] - 1 are flipped
EVERY = 1_000                               # a candidate every 1,000 examples
SETTLED = 200                               # poisoned examples after which the learner has surely followed the burst


def fast_logreg():
    """A logistic regression with a large step: it follows the burst within ~150 examples, and recovers as fast."""
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.1))


def concept(x1: float, x2: float) -> int:
    return int(x1 + x2 > 1.0)


def stream() -> list[dict]:
    rng, events = random.Random(11), []
    for i in range(EXAMPLES):
        x1, x2 = rng.random(), rng.random()
        label = concept(x1, x2)
        if BURST[0] <= i < BURST[1]:
            label = 1 - label
        events.append({"id": f"e-{i:05d}", "ts": 1_763_800_000.0 + i * 0.01, "model": "fraud",
                       "features": {"x1": x1, "x2": x2}, "label": label})
    return events


def produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for event in events:
        producer.produce(topic, value=json.dumps(event).encode(), key=event["id"].encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def config(bootstrap: str, topics: dict[str, str], updates: str):
    return parse_config({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"g-{topics['examples']}", "session_timeout_ms": 6000,
                  "inference_topic": topics["inference-logs"], "feedback_topic": topics["feedback"],
                  "examples_topic": topics["examples"]},
        "intake": {"batch_size": 100},
        "models": {"fraud": {"model": "tests.test_deploy_poisoning:fast_logreg"}},
        "eval": {"segment_size": 1000, "probe_size": 50, "every": 500, "segments": 20},
        "publish": {"enabled": True, "every_examples": EVERY, "every_seconds": 0, "topic": updates},
        "gate": {"holdout_every": 10, "holdout_size": 200, "min_shadow_examples": 200, "regression_tolerance": 0.05,
                 "min_shadow_score": 0.5},
        "metrics": {"enabled": False},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-poison-"),
    }, env={})


def clean_accuracy(model) -> float:
    rng = random.Random(99)
    rows = [{"x1": rng.random(), "x2": rng.random()} for _ in range(1000)]
    return sum(p == concept(r["x1"], r["x2"]) for p, r in zip(model.predict_many(rows), rows)) / len(rows)


def test_a_poisoning_burst_never_reaches_serving(broker, topics):
    updates = f"{topics['examples']}-model-updates-{uuid.uuid4().hex[:4]}"
    broker.create_topics([updates], partitions=1)
    produce(broker.bootstrap_servers, topics["examples"], stream())
    cfg = config(broker.bootstrap_servers, topics, updates)
    service = Service(cfg)
    forgetting = []
    try:
        summary = service.run(until=lambda s: s.stats is not None and s.stats.caught_up
                              and s.learned + s.held_out >= EXAMPLES,
                              on_batch=lambda s, b: forgetting.append(s.learners["fraud"].evaluation.probes.forgetting))
    finally:
        service.close()
    assert summary["learned"] + summary["held_out"] == EXAMPLES

    registry = open_registry(cfg)
    versions = sorted(registry.versions("fraud"), key=lambda r: r.version)
    made = lambda r: r.position.examples  # noqa: E731  (examples of the stream behind the candidate)
    before = [r for r in versions if made(r) <= BURST[0]]
    poisoned = [r for r in versions if BURST[0] + SETTLED <= made(r) <= BURST[1]]
    after = [r for r in versions if made(r) > BURST[1]]
    assert len(before) >= 3 and len(poisoned) >= 2 and len(after) >= 3, [(r.version, made(r)) for r in versions]

    # The learner degraded: its old segments' probes were forgotten during the burst.
    assert max(f for f in forgetting if f == f) > 0.5

    # Every candidate made from the poisoned state was rejected, for scoring far below production on history.
    for record in poisoned:
        assert record.status == "rejected", record
        assert any(reason.startswith("historical:") for reason in record.reasons), record.reasons
        assert record.scores.historical.candidate < record.scores.historical.production - 0.05
    # Production stayed on the last good version: no version made in the burst ever served.
    served = [c.version for c in registry.changes("fraud") if c.status == "production"]
    in_burst = {r.version for r in versions if BURST[0] < made(r) <= BURST[1]}
    assert served and not in_burst & set(served)
    last_good = max(v for v in served if v in {r.version for r in before})
    first_after = min(v for v in served if v not in {r.version for r in before})
    assert served.index(first_after) == served.index(last_good) + 1, served
    assert made(registry.get("fraud", first_after)) > BURST[1]
    # After the burst a good candidate was promoted again, and is production now.
    production = registry.production("fraud")
    assert production.version in {r.version for r in after} and production.version == served[-1]

    # The topic tells serving the same story: promotions only, in order, with verifiable checksums.
    messages = read_topic(broker.bootstrap_servers, updates, expected=len(served))
    assert [m.key() for m in messages] == [b"fraud"] * len(served)
    events = [msgspec.json.decode(m.value(), type=ModelUpdate) for m in messages]
    assert [e.version for e in events] == served and {e.action for e in events} == {"promote"}
    for event in events:
        assert event.manifest_sha256 == registry.get("fraud", event.version).manifest_sha256
        assert event.checksums == registry.get("fraud", event.version).checksums

    # And serving loads the good version, which knows the clean concept; a poisoned one does not.
    loaded = load_production("fraud", store=open_artifacts(cfg))
    assert loaded.version == production.version and clean_accuracy(loaded) > 0.95
    assert clean_accuracy(load_version("fraud", poisoned[-1].version, open_artifacts(cfg))) < 0.5
