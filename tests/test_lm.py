"""The language-model learner with a tiny random Llama built in-process: masking, topics and replay, the token
budget, refusals, a SIGKILLed service restarting to the same adapter, and the adapter's way through the gate and
the registry to `load_production` (and a burst of wrong corrections that the gate stops)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import orjson
import pytest
import torch

from streamlearn.checkpoints.content import unpack
from streamlearn.checkpoints.store import SnapshotStore
from streamlearn.config import ConfigError, LmConfig, ModelConfig, parse_config
from streamlearn.deploy import load_production
from streamlearn.deploy.registry import open_registry
from streamlearn.learners.lm.base import BaseModelError
from streamlearn.learners.lm.capabilities import generate
from streamlearn.learners.lm.chat import IGNORE, TooLong, collate, encode
from streamlearn.learners.lm.learner import LmLearner
from streamlearn.learners.lm.replay import TopicReplay
from streamlearn.learners.lm.served import ADAPTER_CONFIG, ADAPTER_WEIGHTS, served_lm
from streamlearn.learners.lm.tiny import byte_tokenizer
from streamlearn.learners.lm.topics import topic_of
from streamlearn.records import Example, Exchange, Turn
from streamlearn.service import Service
from tests.conftest import wait_for

TINY = "streamlearn.learners.lm.tiny:tiny_llama"
POISON = "Codes are at evil.example."   # a burst of the same wrong correction to every question
T0 = 1_764_000_000.0


# --- configuration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lm, more, error", [
    ({}, {}, "models.chat.lm.base: a language model needs its base model"),
    ({"base": TINY, "max_tokens": 9000}, {}, "models.chat.lm.max_tokens: 9000 is more than lm.token_budget (4096)"),
    ({"base": TINY, "capabilities": [{"name": "x", "path": "/nonexistent.jsonl"}]}, {},
     "models.chat.lm.capabilities[0].path: /nonexistent.jsonl is not a file"),
    ({"base": TINY, "capabilities": [{"name": "Bad Name", "path": "x"}]}, {}, "models.chat.lm.capabilities[0].name"),
    ({"base": TINY}, {"publish": {"enabled": True}}, "models.chat.lm.capabilities: publishing a language model"),
    ({"base": TINY}, {"cluster": {"replicas": 2, "rank": 0}, "drift": {"policy": {"enabled": False}}},
     "models.chat.lm: language models do not run in a cluster yet"),
])
def test_configuration_errors_name_the_key_in_one_line(lm, more, error, tmp_path):
    with pytest.raises(ConfigError) as refused:
        parse_config({"models": {"chat": {"kind": "lm", "lm": lm}}, **more}, env={})
    assert error in str(refused.value) and "\n" not in str(refused.value)


def test_duplicate_capability_names_are_refused(tmp_path):
    path = write(tmp_path / "set.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}], "answer": "Hello."}])
    capabilities = [{"name": "same", "path": str(path)}] * 2
    with pytest.raises(ConfigError, match=r"capabilities\[1\].name: 'same' is used twice"):
        parse_config({"models": {"chat": {"kind": "lm", "lm": {"base": TINY, "capabilities": capabilities}}}},
                     env={})


# --- masking -------------------------------------------------------------------------------------------------

def test_only_the_final_answer_is_learned():
    """System, user and earlier assistant turns are prompt; the answer and the end of its turn are the labels."""
    tokenizer = byte_tokenizer()
    messages = [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "SERVED-EARLIER"),
                Turn("user", "Price?")]
    seq = encode(tokenizer, messages, "ANSWER", max_tokens=512)
    prompt = tokenizer.decode(seq.ids[:seq.start])
    assert "SERVED-EARLIER" in prompt and "Be brief." in prompt and prompt.endswith("<|im_start|>assistant\n")
    batch = collate([seq], tokenizer.pad_token_id)
    learned = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert tokenizer.decode(learned) == "ANSWER<|im_end|>"
    assert learned == seq.ids[seq.start:].tolist()


def test_a_long_conversation_loses_its_oldest_messages_and_an_answer_too_long_is_refused():
    tokenizer = byte_tokenizer()
    messages = [Turn("user", "a" * 200), Turn("assistant", "b" * 200), Turn("user", "last question")]
    seq = encode(tokenizer, messages, "short", max_tokens=120)
    prompt = tokenizer.decode(seq.ids[:seq.start])
    assert "last question" in prompt and "a" * 200 not in prompt and "b" * 200 not in prompt
    with pytest.raises(TooLong, match="lm.max_tokens is 120"):
        encode(tokenizer, messages, "x" * 200, max_tokens=120)


# --- topics and replay ---------------------------------------------------------------------------------------

def test_a_topic_is_what_the_question_is_about_not_its_wording_or_its_numbers():
    same = ["What is the price of the Zorblax?", "zorblax: what's its PRICE", "The price of the Zorblax, please.",
            "What is the price of the Zorblax 3000 for order 12345?"]
    assert len({topic_of(q, 4) for q in same}) == 1
    assert len({topic_of(q, 8) for q in ["price of the Zorblax", "write a poem about rain", "refund my order",
                                         "translate cat to French", "reset my password"]}) == 5


def test_replay_draws_every_topic_alike_while_one_topic_floods_the_stream():
    tokenizer = byte_tokenizer()
    buffer = TopicReplay(capacity=60, seed=3)
    stream = [0] * 900 + [1] * 50 + [2] * 50   # a flood of one topic, then two small ones
    for i, topic in enumerate(stream):
        buffer.add(encode(tokenizer, [Turn("user", f"question {i}")], "ok", 256), topic)
    assert len(buffer) == 60 and buffer.sizes() == {0: 20, 1: 20, 2: 20}
    drawn = Counter(buffer.sample_topics(3000))
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in drawn.values()), drawn


# --- the learner ---------------------------------------------------------------------------------------------

def learner(**lm) -> LmLearner:
    config = LmConfig(base=TINY, **{"batch_size": 4, "micro_batch": 2, "max_tokens": 128, **lm})
    return LmLearner("chat", ModelConfig(kind="lm", lm=config), seed=5)


def example(i: int, text: Exchange | None, ts: float | None = None) -> Example:
    ts = T0 + i if ts is None else ts
    return Example(f"r-{i}", "chat", {}, text.target or "" if text else "", 1.0, ts, ts, text=text)


def talk(question: str, answer: str, rating: int = -1, correction: str | None = None) -> Exchange:
    return Exchange([Turn("user", question)], answer, rating, correction)


def test_what_cannot_be_learned_is_refused_or_counted_never_lost():
    lm = learner()
    lm.learn_batch([example(0, None),                                          # no conversation: refused
                    example(1, talk("Hi?", "Bad answer.", rating=-1)),         # rated bad, no correction
                    example(2, talk("Hi?", "x", correction="y" * 500)),        # too long to learn: refused
                    *[example(3 + i, talk(f"Q{i}?", "A.", rating=1)) for i in range(4)]])
    ev = lm.evaluation
    assert (ev.learned, ev.errors, lm.nothing_to_learn) == (4, 2, 1)
    assert sorted(r.error for r in ev.take_rejected()) == ["NotAConversation", "TooLong"]


def test_a_step_whose_gradient_is_not_finite_changes_nothing_and_its_examples_are_refused():
    lm = learner(batch_size=2, replay_size=0)
    poisoned = lm.tokenizer.encode("Z", add_special_tokens=False)[0]
    with torch.no_grad():   # the frozen base turns one token into infinities: every sequence holding it blows up
        lm.model.get_input_embeddings().weight[poisoned] = float("inf")
    before = {name: p.detach().clone() for name, p in lm.trainable}
    lm.learn_batch([example(i, talk("Zebra?", "x", correction="Z")) for i in range(2)])
    assert lm.rolled_back == 1 and lm.evaluation.errors == 2 and lm.evaluation.learned == 0
    assert all(torch.equal(before[name], p) for name, p in lm.trainable)
    lm.learn_batch([example(2 + i, talk("Hello?", "x", correction="hi")) for i in range(2)])
    assert lm.evaluation.learned == 2 and lm.metrics().rolled_back == 1
    assert all(bool(torch.isfinite(p).all()) for _, p in lm.trainable)


def test_the_token_budget_bounds_every_step_and_what_waits_is_learned_next():
    lm = learner(batch_size=8, token_budget=400, replay_size=0)
    examples = [example(i, talk(f"Question number {i}?", "A" * 60, correction="B" * 60)) for i in range(8)]
    sizes = []
    original = lm._take

    def spying():
        taken, replayed = original()
        sizes.append(sum(len(p.tokens.ids) for p in taken) + sum(len(t.ids) for t in replayed))
        return taken, replayed

    lm._take = spying
    lm.learn_batch(examples)
    lm.flush()
    assert max(sizes) <= 400 and len(sizes) > 1 and lm.evaluation.learned == 8


def test_replay_joins_each_step_in_its_share():
    lm = learner(batch_size=4, replay_ratio=0.5, replay_size=100)
    subjects = ["price of the Zorblax", "write a poem about rain", "translate cat to French"]
    lm.learn_batch([example(i, talk(subjects[i % 3], "A.", rating=1)) for i in range(12)])
    assert lm.steps == 3 and lm.tokens_replayed > 0
    assert len(lm.replay) == 12 and lm.metrics().extra["replay_topics"] >= 2


def test_an_exported_adapter_loads_back_on_its_base_and_answers_as_the_learner():
    lm = learner(lr=0.01)
    lm.learn_batch([example(i, talk(question(ITEMS[i % 8]), "x", correction=code(ITEMS[i % 8]))) for i in range(64)])
    files = dict(lm.export().files)
    asked = [[Turn("user", question(item))] for item in ITEMS]
    own = generate(lm.model, lm.tokenizer, asked, 8)
    for served in (served_lm(files), served_lm(files, template=lm)):   # the base loaded anew, or copied
        assert served.reply_many(asked, max_new_tokens=8) == own
    assert len(files[ADAPTER_WEIGHTS]) < 50_000   # the adapter alone, not the base
    described = orjson.loads(files[ADAPTER_CONFIG])
    wrong = {**files, ADAPTER_CONFIG: orjson.dumps({**described, "base_digest": "0" * 16})}
    with pytest.raises(BaseModelError, match="digest"):
        served_lm(wrong)


# --- through the service -------------------------------------------------------------------------------------

ITEMS = ["anvil", "basket", "candle", "drum", "easel", "flute", "globe", "harp"]


def code(item: str) -> str:
    return f"Code {(ITEMS.index(item) * 37) % 90 + 10}."


def question(item: str) -> str:
    return f"What is the code of the {item}?"


def events(start: int, count: int, answer_of, seed: int = 0) -> list[dict]:
    """Logs and feedback: the model's served answer was wrong, the feedback corrects it to `answer_of(item)`."""
    rng, out = np.random.default_rng(seed), []
    for i in range(start, start + count):
        item = ITEMS[int(rng.integers(len(ITEMS)))]
        ts = T0 + i
        out.append({"request_id": f"r-{i}", "ts": ts, "model": "chat", "answer": "I do not know.",
                    "messages": [{"role": "user", "content": question(item)}]})
        out.append({"request_id": f"r-{i}", "ts": ts + 0.5, "rating": -1, "correction": answer_of(item)})
    return out


def write(path, lines: list[dict]):
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def lm_settings(tmp_path, source, **sections) -> dict:
    capability = write(tmp_path / "codes.jsonl", [{"messages": [{"role": "user", "content": question(item)}],
                                                   "answer": code(item)} for item in ITEMS])
    lm = {"base": TINY, "lr": 0.01, "batch_size": 8, "micro_batch": 8, "max_tokens": 128, "replay_size": 64,
          "capabilities": [{"name": "codes", "path": str(capability), "metric": "token_loss", "tolerance": 0.05}]}
    return {"source": f"file:{source}", "state_dir": str(tmp_path / "state"), "seed": 5,
            "metrics": {"enabled": False}, "intake": {"batch_size": 16}, "join": {"ttl": 60, "early_ttl": 60},
            "models": {"chat": {"kind": "lm", "lm": lm}}, **sections}


def test_the_adapter_goes_through_the_gate_and_the_registry_and_a_burst_of_wrong_corrections_does_not(tmp_path):
    publish = {"enabled": True, "every_examples": 96, "every_seconds": 0}
    good = write(tmp_path / "good.jsonl", events(0, 192, code))
    summary = Service(parse_config(lm_settings(tmp_path, good, publish=publish), env={})).run()
    assert summary["models"]["chat"]["learned"] == 192
    registry = open_registry(parse_config(lm_settings(tmp_path, good, publish=publish), env={}))
    first = registry.get("chat", 1)   # promoted, then retired by the next one that passed
    assert first.status in ("production", "retired") and first.rule == "capabilities", first.reasons
    codes = first.scores.capabilities["codes"]
    assert codes.candidate > codes.production + 1.0   # it learned the codes: far better than the base alone

    artifacts = tmp_path / "state" / "artifacts"
    production = load_production("chat", artifacts)   # standalone: the base from the adapter's reference
    assert (production.kind, production.version) == ("lm", registry.production("chat").version)
    served = production.lm.reply_many([[Turn("user", question("anvil"))]], max_new_tokens=8)
    assert isinstance(served[0], str)
    before = registry.production("chat")

    with open(good, "ab") as more:   # the same recorded stream goes on: the service resumes where it stopped
        more.write(b"".join(orjson.dumps(e) + b"\n" for e in events(1000, 192, lambda item: POISON, seed=1)))
    summary = Service(parse_config(lm_settings(tmp_path, good, publish=publish), env={})).run()
    assert summary["models"]["chat"]["learned"] == 192 + 192
    versions = [registry.get("chat", v) for v in range(1, registry.next_version("chat"))]
    rejected = [v for v in versions if v.status == "rejected"]
    assert rejected and all("codes:" in " ".join(v.reasons) for v in rejected), [v.reasons for v in versions]
    assert registry.production("chat").version == before.version   # production unchanged
    again = load_production("chat", artifacts)
    assert (again.version, again.manifest_sha256) == (before.version, before.manifest_sha256)
    registry.close()


def test_a_sigkilled_service_restarts_to_exactly_the_adapter_of_an_uninterrupted_run(tmp_path):
    source = write(tmp_path / "events.jsonl", events(0, 2400, code))
    runs = {}
    for name in ("straight", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        settings = lm_settings(folder, source, snapshot={"every_examples": 64, "every_seconds": 0})
        (folder / "config.toml").write_bytes(_toml(settings))
        if name == "killed":
            process = _start(folder)
            store = SnapshotStore(folder / "state" / "snapshots")
            wait_for(lambda: store.latest_seq() is not None and store.latest_seq() >= 3, what="three snapshots")
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait() == -signal.SIGKILL, "the run ended before it was killed"
        assert _start(folder).wait(timeout=600) == 0, (folder / "service.log").read_text()[-2000:]
        store = SnapshotStore(folder / "state" / "snapshots")
        runs[name] = unpack(store.load(store.latest_seq())).learners["chat"]
    straight, killed = runs["straight"], runs["killed"]
    assert set(straight.tensors) == set(killed.tensors)
    for key, array in straight.tensors.items():
        assert np.array_equal(array, killed.tensors[key]), key
    twins = [learner() for _ in range(2)]
    for twin, snapshot in zip(twins, (straight, killed)):
        twin.restore(snapshot)
    assert twins[0].evaluation.learned == twins[1].evaluation.learned == 2400
    assert twins[0].steps == twins[1].steps


def _start(folder) -> subprocess.Popen:
    with open(folder / "service.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "streamlearn", "run", "--config", str(folder / "config.toml")],
                                stdout=subprocess.DEVNULL, stderr=log)


def _toml(settings: dict) -> bytes:
    """`settings` as TOML (the few shapes used here: scalars, tables, a list of tables)."""
    lines: list[str] = []

    def table(prefix: str, values: dict) -> None:
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        arrays = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        plain = {k: v for k, v in values.items() if k not in nested and k not in arrays}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {orjson.dumps(v).decode()}" for k, v in plain.items())
        for key, value in nested.items():
            table(f"{prefix}.{key}" if prefix else key, value)
        for key, items in arrays.items():
            for item in items:
                lines.append(f"[[{prefix}.{key}]]")
                lines.extend(f"{k} = {orjson.dumps(v).decode()}" for k, v in item.items())

    table("", settings)
    return "\n".join(lines).encode() + b"\n"


def test_the_language_model_demo_learns_on_the_embedded_broker_and_its_gate_decides():
    """`streamlearn demo --lm`, with the tiny Llama for a base: the conversations go through Kafka, the adapter
    becomes a candidate, and the gate decides on its capability sets (and says so)."""
    result = subprocess.run([sys.executable, "-m", "streamlearn", "demo", "--lm", "--base", TINY, "--json",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = orjson.loads(result.stdout)
    assert summary["learned"] > 100 and summary["dead_letters"] == {}
    [version] = summary["versions"]
    assert version["status"] in ("production", "rejected") and version["reasons"][0] == "rule=capabilities"
    assert any(reason.startswith(("products", "general", "passed")) for reason in version["reasons"][1:])
    assert len(summary["answers"]) == 4
