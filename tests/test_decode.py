"""Decoding and validation against the event contract: every reason code, both ways round."""

from __future__ import annotations

import orjson
import pytest

from streamlearn.records import Example
from streamlearn.stream.decode import REASONS, DeadLetter, EventDecoder, LabelEntry, LogEntry

LOG = {"request_id": "r-1", "ts": 100.5, "model": "fraud", "features": {"x": 1.5, "c": "web", "ok": True}}
FEEDBACK = {"request_id": "r-1", "ts": 130.0, "label": 1}
EXAMPLE = {"id": "e-1", "ts": 5, "model": "fraud", "features": {"x": 1}, "label": "spam"}


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(models={"fraud", "default"}, max_message_bytes=1000)


def with_(event: dict, **changes) -> bytes:
    return orjson.dumps({**event, **changes})


def test_valid_records_decode_to_typed_entries(decoder):
    log = decoder.decode_log(orjson.dumps(LOG))
    assert log == LogEntry("r-1", 100.5, "fraud", {"x": 1.5, "c": "web", "ok": True})
    assert decoder.decode_feedback(orjson.dumps(FEEDBACK)) == LabelEntry("r-1", 130.0, 1, 1.0)
    example = decoder.decode_example(orjson.dumps(EXAMPLE))
    assert isinstance(example, Example)
    assert (example.id, example.label, example.ts, example.label_ts, example.weight) == ("e-1", "spam", 5, 5, 1.0)


def test_missing_model_means_default_and_nulls_are_missing_values(decoder):
    raw = orjson.dumps({"request_id": "r-2", "ts": 1, "features": {"a": None, "b": 2}})
    assert decoder.decode_log(raw) == LogEntry("r-2", 1, "default", {"b": 2})


def test_rfc3339_times_with_offset_are_unix_seconds(decoder):
    entry = decoder.decode_feedback(with_(FEEDBACK, ts="2025-11-22T10:00:00+01:00"))
    assert entry.ts == 1763802000.0
    assert decoder.decode_feedback(with_(FEEDBACK, ts="2025-11-22T09:00:00Z")).ts == 1763802000.0


@pytest.mark.parametrize("raw, reason", [
    (b'{"request_id": "r-1", "ts": 1', "invalid_json"),
    (b"\xff\xfe not utf-8", "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2]", "not_object"),
    (b'"just a string"', "not_object"),
    (b"null", "not_object"),
    (with_(LOG, features=[1, 2]), "schema"),
    (orjson.dumps({k: v for k, v in LOG.items() if k != "request_id"}), "schema"),
    (with_(LOG, request_id=""), "schema"),
    (with_(LOG, request_id="x" * 257), "schema"),
    (with_(LOG, ts="yesterday"), "schema"),
    (with_(LOG, ts="2025-11-22T10:00:00"), "schema"),  # RFC 3339 needs an offset
    (with_(LOG, features={"x": {"nested": 1}}), "schema"),
    (with_(LOG, model=7), "schema"),
    (b'{"request_id": "r-1", "ts": 1e999, "features": {}}', "non_finite"),
    (b'{"request_id": "r-1", "ts": 1, "features": {"x": NaN}}', "non_finite"),
    (b'{"request_id": "r-1", "ts": 1, "features": {"x": -Infinity}}', "non_finite"),
    (with_(LOG, features={"x": "y" * 1000}), "too_large"),
    (with_(LOG, model="no-such-model"), "unknown_model"),
])
def test_bad_inference_logs_get_their_reason(decoder, raw, reason):
    letter = decoder.decode_log(raw)
    assert isinstance(letter, DeadLetter), letter
    assert letter.reason == reason, letter.detail
    assert letter.detail


@pytest.mark.parametrize("raw, reason", [
    (b"{", "invalid_json"),
    (b"[]", "not_object"),
    (orjson.dumps({"request_id": "r-1", "ts": 1}), "schema"),          # no label
    (with_(FEEDBACK, label=[1]), "schema"),
    (with_(FEEDBACK, source="guess"), "schema"),
    (with_(FEEDBACK, weight=0), "schema"),
    (with_(FEEDBACK, weight=-1.0), "schema"),
    (b'{"request_id": "r-1", "ts": 1, "label": 1, "weight": Infinity}', "non_finite"),
    (b'{"request_id": "r-1", "ts": 1, "label": 1e400}', "non_finite"),
    (with_(FEEDBACK, pad="p" * 1000), "too_large"),
])
def test_bad_feedback_gets_its_reason(decoder, raw, reason):
    letter = decoder.decode_feedback(raw)
    assert isinstance(letter, DeadLetter), letter
    assert letter.reason == reason, letter.detail


@pytest.mark.parametrize("raw, reason", [
    (b"nope", "invalid_json"),
    (b"1", "not_object"),
    (orjson.dumps({k: v for k, v in EXAMPLE.items() if k != "label"}), "schema"),
    (b'{"id": "e", "ts": 1, "features": {"x": NaN}, "label": 1}', "non_finite"),
    (with_(EXAMPLE, features={"x": "z" * 2000}), "too_large"),
    (with_(EXAMPLE, model="other"), "unknown_model"),
])
def test_bad_examples_get_their_reason(decoder, raw, reason):
    assert decoder.decode_example(raw).reason == reason


def test_reason_codes_are_the_contracts():
    assert REASONS == ("too_large", "invalid_json", "not_object", "schema", "non_finite", "unknown_model")
