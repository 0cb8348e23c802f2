"""Decodes and validates raw messages against the event contract.

Every message becomes either a typed record or a `DeadLetter` with a reason code;
decoding never raises. Reason codes: `too_large`, `invalid_json`, `not_object`,
`schema`, `non_finite`, `unknown_model`.

>>> d = EventDecoder(models={"default"})
>>> d.decode_log(b'{"request_id": "r-1", "ts": 5, "features": {"a": 1, "b": null}}').features
{'a': 1.0}
>>> d.decode_feedback(b'[1, 2]').reason
'not_object'
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Union

import msgspec

from streamlearn.records import Example, Features
from streamlearn.stream.events import Feedback, InferenceLog, LabeledExample

REASONS = ("too_large", "invalid_json", "not_object", "schema", "non_finite", "unknown_model")


class DeadLetter(msgspec.Struct):
    """Why a message was refused; the raw bytes travel beside it to the dead-letter sink."""

    reason: str
    detail: str


class LogEntry(msgspec.Struct):
    """A validated inference log, as the joiner keeps it while it waits for its feedback."""

    request_id: str
    ts: float
    model: str
    features: Features
    model_version: str = ""                         # the serving version that predicted ("": not logged)
    served: Union[bool, float, str, None] = None    # its prediction, for scores by version


class LabelEntry(msgspec.Struct):
    """A validated feedback event."""

    request_id: str
    ts: float
    label: Union[bool, float, str]
    weight: float


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.letter = DeadLetter(reason, detail)


class EventDecoder:
    """Turns raw bytes of each topic kind into validated records or dead letters."""

    def __init__(self, models: set[str] | frozenset[str], max_message_bytes: int = 1 << 20) -> None:
        self.models = frozenset(models)
        self.max_message_bytes = max_message_bytes
        self._log = msgspec.json.Decoder(InferenceLog)
        self._feedback = msgspec.json.Decoder(Feedback)
        self._example = msgspec.json.Decoder(LabeledExample)

    def decode_log(self, raw: bytes) -> LogEntry | DeadLetter:
        try:
            e = self._parse(self._log, raw)
            _check_id(e.request_id, "request_id")
            self._check_model(e.model)
            return LogEntry(e.request_id, _event_time(e.ts), e.model, _clean_features(e.features),
                            _version(e.model_version), _served(e.prediction, e.proba))
        except _Invalid as bad:
            return bad.letter

    def decode_feedback(self, raw: bytes) -> LabelEntry | DeadLetter:
        try:
            e = self._parse(self._feedback, raw)
            _check_id(e.request_id, "request_id")
            return LabelEntry(e.request_id, _event_time(e.ts), e.label, _check_weight(e.weight))
        except _Invalid as bad:
            return bad.letter

    def decode_example(self, raw: bytes) -> Example | DeadLetter:
        try:
            e = self._parse(self._example, raw)
            _check_id(e.id, "id")
            self._check_model(e.model)
            ts = _event_time(e.ts)
            return Example(e.id, e.model, _clean_features(e.features), e.label, _check_weight(e.weight), ts, ts)
        except _Invalid as bad:
            return bad.letter

    def _parse(self, decoder: msgspec.json.Decoder, raw: bytes):
        if len(raw) > self.max_message_bytes:
            raise _Invalid("too_large", f"{len(raw)} bytes > max_message_bytes {self.max_message_bytes}")
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError as err:
            raise _classify_validation(str(err)) from None
        except msgspec.DecodeError as err:
            raise _classify_malformed(raw, str(err)) from None

    def _check_model(self, model: str) -> None:
        if model not in self.models:
            raise _Invalid("unknown_model", f"model {model[:64]!r} is not configured")


def _classify_validation(message: str) -> _Invalid:
    if message.startswith("Number out of range"):
        return _Invalid("non_finite", message)
    if message.startswith("Expected `object`") and " - at " not in message:
        return _Invalid("not_object", message)
    return _Invalid("schema", message)


def _classify_malformed(raw: bytes, message: str) -> _Invalid:
    # Python's json writes NaN/Infinity literals, which strict JSON parsers refuse:
    # tell the producer the real problem, a non-finite number, not "bad JSON".
    try:
        json.loads(raw, parse_constant=_refuse_constant)
    except _Invalid as bad:
        return bad
    except (ValueError, RecursionError):
        pass
    return _Invalid("invalid_json", message)


def _refuse_constant(name: str) -> float:
    raise _Invalid("non_finite", f"{name} is not a finite number")


def _check_id(value: str, field: str) -> None:
    if not 1 <= len(value) <= 256:
        raise _Invalid("schema", f"{field} must have 1 to 256 characters, has {len(value)}")


def _check_weight(weight: float) -> float:
    if weight <= 0:
        raise _Invalid("schema", f"weight must be > 0, is {weight}")
    return weight


def _event_time(ts: float | str) -> float:
    if isinstance(ts, str):
        try:
            when = datetime.fromisoformat(ts)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:  # RFC 3339 always carries an offset
            raise _Invalid("schema", f"ts {ts[:40]!r} is neither unix seconds nor RFC 3339")
        return when.timestamp()
    return ts


def _version(version: Union[str, int, None]) -> str:
    """The serving version as a short string: it becomes a (bounded) metric label."""
    return "" if version is None else str(version)[:64]


def _served(prediction, proba: Union[dict[str, float], None]):
    """What serving predicted: the logged prediction, else the class it gave the highest probability."""
    if prediction is not None or not proba:
        return prediction
    return max(proba, key=proba.__getitem__)


def _clean_features(features: dict) -> Features:
    """Drops missing values (null). Numbers are finite already: msgspec refuses 1e999 and NaN."""
    if None in features.values():
        return {name: value for name, value in features.items() if value is not None}
    return features
