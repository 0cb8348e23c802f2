"""A language model's events: conversations in the logs, ratings and corrections as feedback, joined into examples."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from streamlearn.config import parse_config
from streamlearn.records import Example, Exchange, Rejected, Turn, decode_batch, encode_batch
from streamlearn.stream.decode import DeadLetter, EventDecoder, LabelEntry, LogEntry
from streamlearn.stream.events import (EXAMPLES_TOPIC, FEEDBACK_TOPIC, INFERENCE_TOPIC, MAX_CONTENT_CHARS,
                                       MAX_CONVERSATION_CHARS, MAX_MESSAGES)
from streamlearn.stream.file_source import FileSource
from streamlearn.stream.join import FeedbackJoiner, JoinerState
from streamlearn.testing import EOF, MemorySource, Resume, memory_intake

SYSTEM = {"role": "system", "content": "Answer in one word."}
QUESTION = {"role": "user", "content": "The capital of France?"}
LOG = {"request_id": "r-1", "ts": 100.0, "model": "chat", "messages": [SYSTEM, QUESTION], "answer": "Lyon."}
RATED = {"request_id": "r-1", "ts": 110.0, "rating": 1}
CORRECTED = {"request_id": "r-1", "ts": 110.0, "rating": -1, "correction": "Paris."}
FRAUD_LOG = {"request_id": "f-1", "ts": 100.0, "model": "fraud", "features": {"x": 1.0}}
LM_EXAMPLE = {"id": "e-1", "ts": 50.0, "model": "chat", "messages": [QUESTION], "answer": "Lyon.",
              "correction": "Paris."}
TURNS = [Turn("system", "Answer in one word."), Turn("user", "The capital of France?")]
LM = frozenset({"chat"})


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(models={"chat", "fraud"}, lm_models=LM)


@pytest.fixture
def joiner() -> FeedbackJoiner:
    return FeedbackJoiner(ttl=60, early_ttl=10, max_pending=100, lm_models=LM)


def with_(event: dict, **changes) -> bytes:
    return orjson.dumps({**event, **changes})


def without(event: dict, name: str) -> bytes:
    return orjson.dumps({k: v for k, v in event.items() if k != name})


def without_correction(event: dict) -> dict:
    return {k: v for k, v in event.items() if k != "correction"}


def message(content: str, role: str = "user") -> dict:
    return {"role": role, "content": content}


def joined(decoder: EventDecoder, joiner: FeedbackJoiner, log: dict, feedback: dict) -> list[Example]:
    log_entry, label_entry = decoder.decode_log(orjson.dumps(log)), decoder.decode_feedback(orjson.dumps(feedback))
    assert isinstance(log_entry, LogEntry) and isinstance(label_entry, LabelEntry), (log_entry, label_entry)
    joiner.add_log(log_entry)
    joiner.add_feedback(label_entry)
    return joiner.advance(1000.0)


def test_a_log_decodes_to_its_conversation_and_answer(decoder):
    entry = decoder.decode_log(orjson.dumps(LOG))
    assert entry == LogEntry("r-1", 100.0, "chat", {}, text=Exchange(TURNS, "Lyon."))
    assert decoder.decode_log(with_(LOG, features={})).text == Exchange(TURNS, "Lyon.")   # empty features: fine


def test_a_good_rating_teaches_the_answer_as_served(decoder, joiner):
    [example] = joined(decoder, joiner, LOG, RATED)
    assert (example.id, example.model, example.features, example.label, example.ts) == ("r-1", "chat", {}, "Lyon.", 110)
    assert example.text == Exchange(TURNS, "Lyon.", rating=1)
    assert joiner.outcomes["matched"] == 1


def test_a_correction_is_the_answer_to_learn(decoder, joiner):
    [example] = joined(decoder, joiner, LOG, CORRECTED)
    assert example.label == "Paris."
    assert example.text == Exchange(TURNS, "Lyon.", rating=-1, correction="Paris.")


def test_a_bad_rating_alone_is_delivered_with_nothing_to_learn(decoder, joiner):
    [example] = joined(decoder, joiner, LOG, {"request_id": "r-1", "ts": 110.0, "rating": -1})
    assert example.label == "" and example.text.target is None and example.text.rating == -1


def test_a_label_beside_a_rating_is_ignored_for_a_language_model(decoder, joiner):
    [example] = joined(decoder, joiner, LOG, {**RATED, "label": "whatever"})
    assert example.label == "Lyon."


def test_tabs_newlines_and_escaped_unicode_are_fine(decoder):
    text = "a\tb\r\nc \u00e9 \U0001F600"
    raw = orjson.dumps({**LOG, "messages": [message(text)], "answer": text})
    raw = raw.replace("\U0001F600".encode(), rb"\ud83d\ude00").replace("\u00e9".encode(), rb"\u00e9")
    entry = decoder.decode_log(raw)
    assert entry.text == Exchange([Turn("user", text)], text)
    assert decoder.decode_feedback(with_(RATED, correction=text)).correction == text


def test_the_limits_themselves_pass(decoder):
    most = [message("q" * (MAX_CONVERSATION_CHARS // MAX_MESSAGES)) for _ in range(MAX_MESSAGES)]   # 32,000 in all
    assert len(decoder.decode_log(with_(LOG, messages=most, answer="")).text.messages) == MAX_MESSAGES
    raw = with_(LOG, messages=[message("q" * MAX_CONTENT_CHARS)], answer="a" * MAX_CONTENT_CHARS)
    assert len(decoder.decode_log(raw).text.answer) == MAX_CONTENT_CHARS


LONG = "x" * (MAX_CONTENT_CHARS + 1)


@pytest.mark.parametrize("raw, words", [
    (with_(LOG, messages=[message("Hi?", role="bot")]), ["'bot'", "$.messages[0].role"]),
    (with_(LOG, messages=[]), ["length >= 1", "$.messages"]),
    (with_(LOG, messages=[message("q")] * (MAX_MESSAGES + 1)), [f"length <= {MAX_MESSAGES}", "$.messages"]),
    (with_(LOG, messages=[SYSTEM, message(LONG)]), [f"length <= {MAX_CONTENT_CHARS}", "$.messages[1].content"]),
    (with_(LOG, answer=LONG), [f"length <= {MAX_CONTENT_CHARS}", "$.answer"]),
    (with_(LOG, messages=[message("q" * 7000)] * 4, answer="a" * 4001),
     ["32001 characters", str(MAX_CONVERSATION_CHARS), "MAX_CONVERSATION_CHARS"]),
    (with_(LOG, messages=[SYSTEM, message("Hi\u0007?")]), ["messages[1].content", "control character", "'\\x07'"]),
    (with_(LOG, answer="Lyon\u0000"), ["answer", "control character"]),
    (with_(LOG, messages=[QUESTION, message("Lyon.", role="assistant")]), ["last of `messages`", "assistant",
                                                                             "user's"]),
    (without(LOG, "messages"), ["missing required field `messages`", 'kind = "lm"']),
    (without(LOG, "answer"), ["missing required field `answer`", 'kind = "lm"']),
    (with_(LOG, features={"x": 1.0}), ["`features` must be absent or empty", "'chat'"]),
    (with_(LOG, features={"x": 1e300}), ["`features` must be absent or empty"]),   # not out_of_range
    (with_(FRAUD_LOG, messages=[QUESTION]), ['`messages` is only for models with kind = "lm"', "'fraud'"]),
    (with_(FRAUD_LOG, answer="Yes."), ['`answer` is only for models with kind = "lm"']),
    (without(FRAUD_LOG, "features"), ["missing required field `features`"]),
])
def test_bad_logs_are_schema_dead_letters_that_say_why(decoder, raw, words):
    letter = decoder.decode_log(raw)
    assert isinstance(letter, DeadLetter), letter
    assert letter.reason == "schema", letter.detail
    assert all(word in letter.detail for word in words), letter.detail


@pytest.mark.parametrize("raw, words", [
    (orjson.dumps({"request_id": "r-1", "ts": 110.0}), ["at least one of `label`, `rating` and `correction`"]),
    (with_(RATED, rating=2), ["2", "$.rating"]),
    (with_(RATED, rating=True), ["$.rating"]),
    (with_(RATED, correction=LONG), [f"length <= {MAX_CONTENT_CHARS}", "$.correction"]),
    (with_(RATED, correction=""), ["length >= 1", "$.correction"]),
    (with_(RATED, correction="Paris\u001b[0m"), ["correction", "control character"]),
])
def test_bad_feedback_is_a_schema_dead_letter_that_says_why(decoder, raw, words):
    letter = decoder.decode_feedback(raw)
    assert isinstance(letter, DeadLetter), letter
    assert letter.reason == "schema", letter.detail
    assert all(word in letter.detail for word in words), letter.detail


def test_a_lone_surrogate_escape_is_not_json_to_the_decoder(decoder):
    # msgspec refuses an unpaired surrogate escape while it parses (as tests/test_hostile_input.py holds for ids),
    # so no such string ever reaches the content checks.
    raw = orjson.dumps({**LOG, "messages": [message("Hi SURROGATE")]}).replace(b"SURROGATE", rb"\ud800")
    letter = decoder.decode_log(raw)
    assert letter.reason == "invalid_json" and "surrogate" in letter.detail
    raw = with_(RATED, correction="SURROGATE").replace(b"SURROGATE", rb"\udc00")
    assert decoder.decode_feedback(raw).reason == "invalid_json"


def test_feedback_without_what_its_model_learns_closes_as_invalid_label(decoder, joiner):
    assert joined(decoder, joiner, LOG, {"request_id": "r-1", "ts": 110.0, "label": "Paris."}) == []
    assert joined(decoder, joiner, FRAUD_LOG, {"request_id": "f-1", "ts": 110.0, "rating": 1}) == []
    assert joiner.outcomes["invalid_label"] == 2 and joiner.outcomes["matched"] == 0
    [example] = joined(decoder, joiner, {**FRAUD_LOG, "request_id": "f-2"},
                       {"request_id": "f-2", "ts": 110.0, "label": 1, "rating": -1})
    assert (example.label, example.text) == (1, None)   # another model's feedback: the label, nothing else


def test_a_prejoined_example_carries_its_conversation(decoder, joiner):
    example = decoder.decode_example(orjson.dumps(LM_EXAMPLE))
    assert (example.features, example.label) == ({}, "Paris.")
    assert example.text == Exchange(TURNS[1:], "Lyon.", None, "Paris.")
    joiner.add_example(example)
    only_label = decoder.decode_example(with_(without_correction(LM_EXAMPLE), id="e-2", label="Paris."))
    assert only_label.text.correction is None
    joiner.add_example(only_label)   # as a pair would: nothing to learn from
    assert [e.id for e in joiner.advance(1000.0)] == ["e-1"]
    assert (joiner.outcomes["prejoined"], joiner.outcomes["invalid_label"]) == (1, 1)


@pytest.mark.parametrize("raw, words", [
    (with_(LM_EXAMPLE, features={"x": 1}), ["`features` must be absent or empty"]),
    (without(LM_EXAMPLE, "answer"), ["missing required field `answer`"]),
    (with_(without_correction(LM_EXAMPLE), label="Paris."), []),   # valid: the join decides
    (without(LM_EXAMPLE, "correction"), ["at least one of `label`, `rating` and `correction`"]),
    (with_({"id": "e-3", "ts": 5, "model": "fraud", "features": {"x": 1}, "label": 1}, rating=1),
     ['`rating` is only for models with kind = "lm"']),
    (orjson.dumps({"id": "e-3", "ts": 5, "model": "fraud", "features": {"x": 1}}), ["missing required field `label`"]),
])
def test_prejoined_examples_are_checked_as_logs_and_feedback_are(decoder, raw, words):
    result = decoder.decode_example(raw)
    if not words:
        assert isinstance(result, Example), result
        return
    assert result.reason == "schema" and all(word in result.detail for word in words), result.detail


def test_the_join_state_keeps_conversations_through_a_snapshot(decoder, joiner):
    joiner.add_log(decoder.decode_log(orjson.dumps(LOG)))
    joiner.add_feedback(decoder.decode_feedback(orjson.dumps({**CORRECTED, "request_id": "r-2", "ts": 200.0})))
    joiner.add_example(decoder.decode_example(orjson.dumps(LM_EXAMPLE)))
    encoded = msgspec.msgpack.encode(joiner.state())
    assert b"".join(joiner.state_pieces(msgspec.msgpack.Encoder().encode)) == encoded
    again = FeedbackJoiner(ttl=60, early_ttl=10, max_pending=100, lm_models=LM)
    again.restore(msgspec.msgpack.decode(encoded, type=JoinerState))
    again.add_feedback(decoder.decode_feedback(orjson.dumps(CORRECTED)))
    again.add_log(decoder.decode_log(with_(LOG, request_id="r-2", ts=195.0)))
    released = {e.id: e for e in again.advance(1000.0)}
    assert released["r-1"].text == released["r-2"].text == Exchange(TURNS, "Lyon.", -1, "Paris.")
    assert released["e-1"].text.correction == "Paris."


def test_the_file_source_tells_a_language_models_events_by_their_shape(tmp_path):
    lines = [LOG, RATED, {"request_id": "r-1", "ts": 1, "correction": "Paris."}, LM_EXAMPLE, FRAUD_LOG]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(map(orjson.dumps, lines)) + b"\n")
    chunks = FileSource(path, max_message_bytes=1 << 20).poll(10, 0)
    assert {c.topic: c.offsets for c in chunks} == {INFERENCE_TOPIC: [0, 4], FEEDBACK_TOPIC: [1, 2],
                                                    EXAMPLES_TOPIC: [3]}


def lm_config():
    return parse_config({"models": {"chat": {"kind": "lm", "lm": {"base": "x:y"}}, "fraud": {}},
                         "intake": {"batch_size": 2}}, env={})


def test_end_to_end_through_the_intake_with_a_restore_in_between():
    config = lm_config()
    logs = [LOG, FRAUD_LOG, with_(LOG, request_id="r-bad", messages=[message("Hi", role="bot")])]
    first = memory_intake(config, MemorySource({"inference-logs:0": logs, "feedback:0": []}, follow=True))
    assert first.poll(timeout=0) == [] and first.joiner.pending == 2   # the logs wait for their feedback
    resume = Resume(dict(first.offsets), first.state())

    feedback = [CORRECTED, {"request_id": "f-1", "ts": 120.0, "label": 1}, with_(RATED, rating=5), EOF()]
    source = MemorySource({"inference-logs:0": logs + [EOF()], "feedback:0": feedback}, start=resume.offsets)
    intake = memory_intake(config, source, first.dead_letters, resume=resume)
    examples = [e for batch in intake.batches() for e in decode_batch(encode_batch(batch)).examples]
    assert [(e.id, e.label, e.text) for e in examples] == [
        ("r-1", "Paris.", Exchange(TURNS, "Lyon.", -1, "Paris.")), ("f-1", 1, None)]
    letters = [(letter.key, letter.reason) for letter in intake.dead_letters.letters]
    assert letters == [("inference-logs:0@2", "schema"), ("feedback:0@2", "schema")]

    # A model that refused the example: its dead letter is an `examples` message that gives it again.
    intake.reject([Rejected("chat", examples[0], "ValueError", "boom")])
    raw = intake.dead_letters.letters[-1].raw
    again = EventDecoder(set(config.models), lm_models=LM).decode_example(raw)
    assert (again.id, again.label, again.text) == ("r-1", "Paris.", examples[0].text)
