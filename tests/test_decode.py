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
    assert REASONS == ("too_large", "invalid_json", "not_object", "schema", "non_finite", "unknown_model",
                       "out_of_range", "undecodable")


DEEP = 5000


@pytest.mark.parametrize("raw, reason", [
    (b"[" * DEEP + b"]" * DEEP, "not_object"),
    (b'{"a":' * DEEP + b"1" + b"}" * DEEP, "schema"),                       # unknown field, nested 5,000 deep
    (b"[" * DEEP, "not_object"),                                           # and truncated
    (b'{"a":' * DEEP, "schema"),
    (b'{"request_id": "r", "ts": 1, "label": 1, "features": {"x": ' + b"[" * DEEP + b"]" * DEEP + b"}}", "schema"),
    (b'{"request_id": "r", "ts": 1, "label": 1, "features": {"x": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}}",
     "schema"),
    (b'{"request_id": "r", "ts": 1, "label": 1, "extra": ' + b"[" * DEEP + b"]" * DEEP + b"}", "schema"),
])
@pytest.mark.parametrize("kind", ["decode_log", "decode_feedback", "decode_example"])
def test_deep_nesting_gets_an_honest_reason_not_a_recursion_error(raw, reason, kind):
    decoder = EventDecoder(models={"default"}, max_message_bytes=1 << 20)
    letter = getattr(decoder, kind)(raw)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == reason, letter.detail


@pytest.mark.parametrize("value", [1e300, -1e300, 1e10, -1.0000001e9, 10**12])
def test_features_beyond_the_models_bound_are_out_of_range(decoder, value):
    letter = decoder.decode_log(with_(LOG, features={"x": 1.0, "amount": value}))
    assert letter.reason == "out_of_range"
    assert "'amount'" in letter.detail and "1e+09" in letter.detail
    assert "models.fraud.max_abs_feature" in letter.detail
    assert decoder.decode_example(with_(EXAMPLE, features={"amount": value})).reason == "out_of_range"


def test_the_bound_itself_booleans_and_strings_pass(decoder):
    log = decoder.decode_log(with_(LOG, features={"a": 1e9, "b": -1e9, "c": True, "d": "1e300"}))
    assert log.features == {"a": 1e9, "b": -1e9, "c": True, "d": "1e300"}


def test_each_model_has_its_own_bound():
    decoder = EventDecoder(models={"tight", "wide"}, max_abs_feature={"tight": 10.0, "wide": 1e15})
    tight = with_(LOG, model="tight", features={"ms": 1.7e12})
    wide = with_(LOG, model="wide", features={"ms": 1.7e12})
    letter = decoder.decode_log(tight)
    assert letter.reason == "out_of_range" and "models.tight.max_abs_feature" in letter.detail
    assert decoder.decode_log(wide).features == {"ms": 1.7e12}
    assert decoder.decode_log(with_(LOG, model="tight", features={"ms": 9.5})).features == {"ms": 9.5}
    assert decoder.decode_log(with_(LOG, model="wide", features={"ms": 2e15})).reason == "out_of_range"
    assert decoder.decode_example(with_(EXAMPLE, model="tight", features={"x": -11})).reason == "out_of_range"


def test_unknown_model_wins_over_a_feature_out_of_range(decoder):
    assert decoder.decode_log(with_(LOG, model="nope", features={"x": 1e300})).reason == "unknown_model"


@pytest.mark.parametrize("ts", [-1e300, -1, 1e300, 4102444800, 4102444800.5, "9999-12-31T00:00:00Z",
                                "1969-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "2100-01-01T00:00:00Z",
                                "not a date", True, [1], {"s": 1}])
def test_event_times_that_cannot_be_real_are_schema_errors(decoder, ts):
    for decode, event in ((decoder.decode_log, LOG), (decoder.decode_feedback, FEEDBACK),
                          (decoder.decode_example, EXAMPLE)):
        letter = decode(with_(event, ts=ts))
        assert isinstance(letter, DeadLetter), (ts, letter)
        assert letter.reason == "schema", letter.detail
        assert "ts" in letter.detail


@pytest.mark.parametrize("ts, seconds", [(0, 0.0), (5, 5.0), (978307200, 978307200.0),   # 2001: backfills work
                                         (4102444799.5, 4102444799.5), ("2001-01-01T00:00:00Z", 978307200.0)])
def test_old_and_small_event_times_are_fine(decoder, ts, seconds):
    assert decoder.decode_feedback(with_(FEEDBACK, ts=ts)).ts == seconds


def test_the_range_rule_is_named_in_the_detail(decoder):
    detail = decoder.decode_log(with_(LOG, ts=-1e300)).detail
    assert "[0, 4102444800)" in detail and "1970-01-01" in detail


def test_event_time_far_ahead_of_the_broker_timestamp_is_refused():
    decoder = EventDecoder(models={"default"}, max_future_seconds=3600)
    assert decoder.ahead_of_broker(1000.0 + 3600, 1000.0) is None
    assert decoder.ahead_of_broker(5.0, 1e9) is None                  # old events are backfills, not errors
    letter = decoder.ahead_of_broker(1000.0 + 3601, 1000.0)
    assert letter.reason == "schema" and "intake.max_future_seconds" in letter.detail


@pytest.mark.parametrize("raw", [
    with_(LOG, request_id="r\u0000-1"),
    with_(LOG, request_id="r\n1"),
    with_(LOG, features={"x\u0001": 1.0}),
    with_(LOG, features={"ok": 1.0, "\u001f": 1.0}),
])
def test_control_characters_in_ids_and_feature_names_are_schema_errors(decoder, raw):
    letter = decoder.decode_log(raw)
    assert letter.reason == "schema" and "control characters" in letter.detail


def test_escapes_elsewhere_and_unicode_names_are_fine(decoder):
    log = decoder.decode_log(with_(LOG, request_id="r-é-\u2603", features={"naïve": 1, "note": "a\nb\u0000c"}))
    assert log.request_id == "r-é-\u2603" and log.features == {"naïve": 1.0, "note": "a\nb\u0000c"}
    assert decoder.decode_example(with_(EXAMPLE, id="e\tx")).reason == "schema"
    assert decoder.decode_feedback(with_(FEEDBACK, request_id="\u0007")).reason == "schema"
