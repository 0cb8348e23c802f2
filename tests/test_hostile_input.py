"""Hostile input: every kind of bad message an attacker or a buggy producer sends, mixed into valid traffic.

Each hostile message must end as a dead letter with its own expected reason (or, for a label that is
valid JSON but no label, as the join outcome `invalid_label`), every valid pair and pre-joined example
must be learned, exactly once, and the service must run to its end: through the file source (in
process and through `streamlearn run`, which exits 0) and through a real Kafka broker.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import orjson

from streamlearn.config import parse_config
from streamlearn.service import Service
from streamlearn.stream.dead_letters import MAX_LETTER_BYTES
from tests.test_service_kafka import read_topic

LOGS, FEEDBACK, EXAMPLES = "inference-logs", "feedback", "examples"
DEEP = 5000
BASE_TS = float(int(time.time()) - 86_400)   # yesterday: valid for Kafka's broker-time rule as well
PAIRS, PREJOINED = 300, 40


class Hostile(NamedTuple):
    name: str
    topic: str        # where it does harm on Kafka (the file source tells the topic by shape)
    raw: bytes
    reason: str       # the dead-letter reason it must get
    file: bool = True   # a file cannot carry it (blank lines are layout; no broker timestamp there)


def log(rid: str, **changes) -> dict:
    return {"request_id": rid, "ts": BASE_TS, "features": {"x": 1.0, "c": "web"}, **changes}


def feedback(rid: str, **changes) -> dict:
    return {"request_id": rid, "ts": BASE_TS + 1, "label": 1, **changes}


def example(rid: str, **changes) -> dict:
    return {"id": rid, "ts": BASE_TS, "features": {"x": 1.0}, "label": 0, **changes}


def js(event: dict) -> bytes:
    return orjson.dumps(event)


def hostile_messages(limit: int) -> list[Hostile]:
    """The hostile kinds; the large ones are just over `limit` (intake.max_message_bytes)."""
    valid_log = js(log("h-enc"))
    many = limit // 10   # features of about 12 bytes each: over the limit
    h = [
        # encodings
        Hostile("utf-16", LOGS, json.dumps(log("h-u16")).encode("utf-16"), "invalid_json"),
        Hostile("utf-16-be without bom", FEEDBACK, json.dumps(feedback("h-u16be")).encode("utf-16-be"),
                "invalid_json"),
        Hostile("latin-1", LOGS, json.dumps(log("h-café"), ensure_ascii=False).encode("latin-1"), "invalid_json"),
        Hostile("invalid utf-8", FEEDBACK, b'{"request_id": "h-\xff\xfe", "ts": 1, "label": 1}', "invalid_json"),
        Hostile("byte order mark", LOGS, b"\xef\xbb\xbf" + valid_log, "invalid_json"),
        Hostile("overlong utf-8 slash", LOGS, b'{"request_id": "h-\xc0\xaf", "ts": 1, "features": {}}',
                "invalid_json"),
        Hostile("lone surrogate escape", EXAMPLES, b'{"id": "h-\\ud800", "ts": 1, "features": {}, "label": 1}',
                "invalid_json"),
        Hostile("binary garbage", FEEDBACK, bytes(range(128, 256)) + b"\x00\x01\x02", "invalid_json"),
        # nesting
        Hostile("deep array", LOGS, b"[" * DEEP + b"]" * DEEP, "not_object"),
        Hostile("deep object", FEEDBACK, b'{"a":' * DEEP + b"1" + b"}" * DEEP, "schema"),
        Hostile("deep array in features", LOGS,
                b'{"request_id": "h-da", "ts": 1, "features": {"x": ' + b"[" * DEEP + b"]" * DEEP + b"}}", "schema"),
        Hostile("deep object in example features", EXAMPLES,
                b'{"id": "h-do", "ts": 1, "label": 1, "features": {"x": ' + b'{"a":' * DEEP + b"1"
                + b"}" * DEEP + b"}}", "schema"),
        Hostile("deep unknown field", FEEDBACK,
                b'{"request_id": "h-du", "ts": 1, "label": 1, "extra": ' + b"[" * DEEP + b"]" * DEEP + b"}", "schema"),
        # numbers
        Hostile("1e400 feature", LOGS, b'{"request_id": "h-inf", "ts": 1, "features": {"x": 1e400}}', "non_finite"),
        Hostile("10**400 feature", LOGS, b'{"request_id": "h-bigint", "ts": 1, "features": {"x": 1'
                + b"0" * 400 + b"}}", "non_finite"),
        Hostile("-1e300 feature", LOGS, js(log("h-neg", features={"x": -1e300})), "out_of_range"),
        Hostile("1e300 example feature", EXAMPLES, js(example("h-pos", features={"x": 1e300})), "out_of_range"),
        Hostile("1e12 feature", LOGS, js(log("h-ms", features={"x": 1.7e12})), "out_of_range"),
        Hostile("NaN feature", LOGS, b'{"request_id": "h-nan", "ts": 1, "features": {"x": NaN}}', "non_finite"),
        Hostile("Infinity label", FEEDBACK, b'{"request_id": "h-infl", "ts": 1, "label": Infinity}', "non_finite"),
        # event times
        Hostile("ts -1e300", LOGS, js(log("h-ts1", ts=-1e300)), "schema"),
        Hostile("ts 1e300", FEEDBACK, js(feedback("h-ts2", ts=1e300)), "schema"),
        Hostile("ts negative", EXAMPLES, js(example("h-ts3", ts=-5)), "schema"),
        Hostile("ts year 9999", LOGS, js(log("h-ts4", ts="9999-12-31T23:59:59Z")), "schema"),
        Hostile("ts not a date", FEEDBACK, js(feedback("h-ts5", ts="not a date")), "schema"),
        Hostile("ts without offset", LOGS, js(log("h-ts6", ts="2025-11-22T10:00:00")), "schema"),
        Hostile("ts bool", FEEDBACK, js(feedback("h-ts7", ts=True)), "schema"),
        Hostile("ts list", LOGS, js(log("h-ts8", ts=[1])), "schema"),
        Hostile("ts ten days after the broker's", LOGS, js(log("h-ts9", ts=time.time() + 10 * 86_400)), "schema",
                file=False),
        # sizes
        Hostile("id of 257 characters", LOGS, js(log("h" * 257)), "schema"),
        Hostile("empty id", FEEDBACK, js(feedback("")), "schema"),
        Hostile("huge string", LOGS, js(log("h-mb", features={"s": "x" * limit})), "too_large"),
        Hostile("many features", LOGS, js(log("h-keys", features={f"f{i:06d}": 1 for i in range(many)})),
                "too_large"),
        # types
        Hostile("features as list", LOGS, js(log("h-fl", features=[1, 2])), "schema"),
        Hostile("label as object", FEEDBACK, js(feedback("h-lo", label={"class": 1})), "schema"),
        Hostile("label null", EXAMPLES, js(example("h-ln", label=None)), "schema"),
        Hostile("id as number", FEEDBACK, js(feedback(7)), "schema"),
        Hostile("model as list", LOGS, js(log("h-ml", model=["default"])), "schema"),
        # control characters
        Hostile("NUL in id", LOGS, js(log("h-\u0000-nul")), "schema"),
        Hostile("newline in id", FEEDBACK, js(feedback("h-\n-nl")), "schema"),
        Hostile("control character in feature name", LOGS, js(log("h-cf", features={"x\u0007": 1})), "schema"),
        Hostile("NUL in example feature name", EXAMPLES, js(example("h-cn", features={"\u0000": 1})), "schema"),
        # shapes
        Hostile("duplicate key, the last one bad", LOGS,
                b'{"request_id": "h-dk", "ts": 1, "features": {}, "ts": "garbage"}', "schema"),
        Hostile("empty message", FEEDBACK, b"", "invalid_json", file=False),
        Hostile("whitespace only", LOGS, b" \t ", "invalid_json", file=False),
        Hostile("truncated", LOGS, valid_log[:-7], "invalid_json"),
        Hostile("trailing garbage", FEEDBACK, js(feedback("h-tg")) + b" }{", "invalid_json"),
        Hostile("a comment", LOGS, b"// " + valid_log, "invalid_json"),
        Hostile("top-level array", EXAMPLES, js([example("h-arr")]), "not_object"),
        Hostile("top-level string", FEEDBACK, b'"label"', "not_object"),
        Hostile("top-level number", LOGS, b"42", "not_object"),
        Hostile("top-level null", EXAMPLES, b"null", "not_object"),
        # weights and models
        Hostile("weight 0", FEEDBACK, js(feedback("h-w0", weight=0)), "schema"),
        Hostile("weight -1", EXAMPLES, js(example("h-w1", weight=-1)), "schema"),
        Hostile("weight NaN", FEEDBACK, b'{"request_id": "h-wn", "ts": 1, "label": 1, "weight": NaN}', "non_finite"),
        Hostile("unknown model", LOGS, js(log("h-um", model="no-such-model")), "unknown_model"),
        Hostile("unknown model, pre-joined", EXAMPLES, js(example("h-ume", model="../../etc")), "unknown_model"),
    ]
    assert len({m.name for m in h}) == len(h) and len({m.raw for m in h}) == len(h)
    return h


class Traffic(NamedTuple):
    messages: list[tuple[str, bytes]]   # (topic, raw) in sending order
    valid_ids: set[str]                 # what must be learned, each once
    hostile: list[Hostile]


def traffic(for_file: bool, limit: int) -> Traffic:
    """Valid pairs and pre-joined examples with the hostile messages (and label attacks) spread between them."""
    valid, ids = [], set()
    for i in range(PAIRS):
        rid = f"r-{i:04d}"
        valid.append((LOGS, js(log(rid, ts=BASE_TS + i, features={"x": float(i % 2), "c": "ab"[i % 3 == 0]}))))
        valid.append((FEEDBACK, js(feedback(rid, ts=BASE_TS + i + 1, label=i % 2))))
        ids.add(rid)
    for i in range(PREJOINED):
        rid = f"e-{i:04d}"
        valid.append((EXAMPLES, js(example(rid, ts=BASE_TS + 2 * i, features={"x": float(i % 2)}, label=i % 2))))
        ids.add(rid)
    # Valid JSON whose label is no label for a regression model: join outcome `invalid_label`, not a dead letter.
    valid.append((LOGS, js(log("p-huge", model="price"))))
    valid.append((FEEDBACK, js(feedback("p-huge", label=1e300))))
    valid.append((EXAMPLES, js(example("p-word", model="price", label="cheap"))))
    valid.append((EXAMPLES, js(example("e-0003", ts=BASE_TS + 50))))   # a pre-joined example sent twice
    hostile = [m for m in hostile_messages(limit) if m.file or not for_file]
    step = len(valid) // (len(hostile) + 1)
    messages = list(valid)
    for n, m in enumerate(reversed(hostile)):
        messages.insert((len(hostile) - n) * step, (m.topic, m.raw))
    return Traffic(messages, ids, hostile)


def check_dead_letters(letters: list[tuple[bytes, str]], hostile: list[Hostile]) -> None:
    """Each hostile message dead-lettered once, with its own reason; nothing else."""
    got = {raw: reason for raw, reason in letters}
    assert len(got) == len(letters) == len(hostile), (len(letters), len(hostile))
    wrong = [(m.name, got.get(m.raw), m.reason) for m in hostile if got.get(m.raw) != m.reason]
    assert not wrong, wrong


def check_summary(summary: dict, t: Traffic) -> None:
    assert summary["dead_letters"] == dict(sorted(Counter(m.reason for m in t.hostile).items()))
    assert summary["learned"] == len(t.valid_ids)
    assert summary["join"]["matched"] == PAIRS and summary["join"]["prejoined"] == PREJOINED
    assert summary["join"]["invalid_label"] == 2 and summary["join"]["duplicate"] == 1
    assert summary["join_pending"] == 0


# Kafka: a smaller intake limit, so that more kinds are `too_large` there (dead letters over MAX_LETTER_BYTES
# travel cut short, with a `truncated_from` header: see test_a_message_over_the_producers_limit_...).
KAFKA_LIMIT = 500_000
MODELS = {"default": {"model": "logreg"}, "price": {"model": "linreg", "task": "regression"}}


def test_file_source_in_process_and_through_the_cli(tmp_path):
    t = traffic(for_file=True, limit=1 << 20)   # the default limit: a 1 MiB string, 100k features
    assert len({m.reason for m in t.hostile}) == 7 and len(t.hostile) >= 30
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for _, raw in t.messages))
    config = parse_config({"source": f"file:{path}", "state_dir": str(tmp_path / "state"), "models": MODELS,
                           "eval": {"probe_size": 0}, "metrics": {"enabled": False}}, env={})
    learned: Counter[str] = Counter()
    summary = Service(config).run(on_batch=lambda s, b: learned.update(e.id for e in b.examples))
    dlq = tmp_path / "events.jsonl.dlq.jsonl"
    letters = [orjson.loads(line) for line in dlq.read_bytes().splitlines()]
    check_dead_letters([(base64.b64decode(d["raw_b64"]), d["reason"]) for d in letters], t.hostile)
    assert learned == Counter(t.valid_ids)
    check_summary(summary, t)

    # The same file through the command line, from scratch: it runs to the end and exits 0.
    dlq.unlink()
    toml = tmp_path / "hostile.toml"
    toml.write_text(f'source = "file:{path}"\nstate_dir = "{tmp_path / "cli-state"}"\n[metrics]\nenabled = false\n'
                    '[eval]\nprobe_size = 0\n[models.default]\nmodel = "logreg"\n'
                    '[models.price]\nmodel = "linreg"\ntask = "regression"\n')
    out = tmp_path / "summary.json"
    cli = Path(sys.executable).parent / "streamlearn"
    result = subprocess.run([str(cli), "run", "--config", str(toml), "--summary", str(out)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    check_summary(json.loads(out.read_text()), t)


def test_kafka_all_kinds_in_one_run(broker, topics):
    from confluent_kafka import Producer

    t = traffic(for_file=False, limit=KAFKA_LIMIT)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 10,
                         "message.max.bytes": 4 << 20})
    for topic, raw in t.messages:
        producer.produce(topics[topic], value=raw)
        producer.poll(0)
    assert producer.flush(30) == 0
    config = parse_config({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "group_id": f"g-{topics[FEEDBACK]}",
                  "session_timeout_ms": 6000, "inference_topic": topics[LOGS], "feedback_topic": topics[FEEDBACK],
                  "examples_topic": topics[EXAMPLES]},
        "models": MODELS, "eval": {"probe_size": 0}, "metrics": {"enabled": False},
        "intake": {"max_message_bytes": KAFKA_LIMIT},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-hostile-"),
    }, env={})
    learned: Counter[str] = Counter()
    sent = len(t.messages)

    def consumed_all(s: Service) -> bool:
        return s.stats is not None and s.stats.caught_up and sum(s.stats.events.values()) >= sent
    summary = Service(config).run(until=consumed_all, on_batch=lambda s, b: learned.update(e.id for e in b.examples))
    letters = []
    for kind in (LOGS, FEEDBACK, EXAMPLES):
        expected = sum(1 for m in t.hostile if m.topic == kind)
        letters += read_topic(broker.bootstrap_servers, topics[kind] + ".dlq", expected)
    check_dead_letters([(original(m, t.hostile), dict(m.headers())["reason"].decode()) for m in letters], t.hostile)
    assert learned == Counter(t.valid_ids)
    check_summary(summary, t)


def original(letter, hostile: list[Hostile]) -> bytes:
    """The message a Kafka dead letter holds: its bytes, or the hostile message they were cut from."""
    value, headers = letter.value() or b"", dict(letter.headers())
    if "truncated_from" not in headers:
        return value
    size = int(headers["truncated_from"])
    cut_from = [m.raw for m in hostile if len(m.raw) == size and m.raw.startswith(value)]
    assert len(cut_from) == 1 and len(value) == MAX_LETTER_BYTES
    return cut_from[0]


def test_a_message_over_the_producers_limit_is_dead_lettered_cut_short(broker, topics):
    from confluent_kafka import Producer

    messages = [(LOGS, js(log("h-mb", features={"s": "x" * (1 << 20)}))), (LOGS, js(log("r-1"))),
                (FEEDBACK, js(feedback("r-1")))]
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "message.max.bytes": 4 << 20})
    for topic, raw in messages:
        producer.produce(topics[topic], value=raw)
    assert producer.flush(30) == 0
    config = parse_config({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "group_id": f"g-{topics[FEEDBACK]}",
                  "session_timeout_ms": 6000, "inference_topic": topics[LOGS], "feedback_topic": topics[FEEDBACK],
                  "examples_topic": topics[EXAMPLES]},
        "eval": {"probe_size": 0}, "metrics": {"enabled": False},
        "state_dir": tempfile.mkdtemp(prefix="streamlearn-hostile-"),
    }, env={})
    summary = Service(config).run(
        until=lambda s: s.stats is not None and s.stats.caught_up and sum(s.stats.events.values()) >= 3)
    assert summary["dead_letters"] == {"too_large": 1} and summary["learned"] == 1
