"""Decodes and validates raw messages against the event contract.

Every message becomes either a typed record or a `DeadLetter` with a reason code;
decoding never raises. Reason codes (`REASONS`):

- `too_large`: longer than `intake.max_message_bytes`;
- `invalid_json`: not JSON (invalid UTF-8, a byte-order mark, truncated, trailing bytes);
- `not_object`: JSON, but not an object;
- `schema`: a missing or mistyped field; an id that is empty, over 256 characters or holds
  control characters; a feature name with control characters; a `weight` <= 0; nesting
  deeper than the contract's shapes; a `ts` that cannot be a real event time (before 1970,
  from 2100 on, or, where the source gives a broker timestamp, more than
  `intake.max_future_seconds` after it: `ahead_of_broker`); feedback with none of `label`,
  `rating` (-1, 0 or 1), `correction`. For a language model (`lm_models`): `messages` or
  `answer` missing, `features` not empty, a role other than system / user / assistant, no
  message or over `MAX_MESSAGES`, a content, answer or correction over `MAX_CONTENT_CHARS`
  (or an empty correction), a control character other than tab, newline and carriage return
  in them, a last message that is not the user's, over `MAX_CONVERSATION_CHARS` in all; for
  any other model, `messages`, `answer`, `rating` or `correction` (they are a language model's);
- `non_finite`: NaN, Infinity, or a number beyond the range of a float (1e400, 10**400);
- `unknown_model`: a model that is not configured;
- `out_of_range`: a numeric feature value beyond its model's `models.NAME.max_abs_feature`;
- `undecodable`: decoding, validating or joining the message raised (the intake's safety net).

>>> d = EventDecoder(models={"default"})
>>> d.decode_log(b'{"request_id": "r-1", "ts": 5, "features": {"a": 1, "b": null}}').features
{'a': 1.0}
>>> d.decode_feedback(b'[1, 2]').reason
'not_object'
>>> d.decode_log(b'{"request_id": "r-2", "ts": 5, "features": {"a": 1e300}}').reason
'out_of_range'

A language model's log carries the conversation it answered instead of features:

>>> d = EventDecoder(models={"chat"}, lm_models={"chat"})
>>> log = b'{"request_id": "r-3", "ts": 5, "model": "chat", "messages": [{"role": "user", "content": "Hi?"}]'
>>> d.decode_log(log + b', "answer": "Hello."}').text
Exchange(messages=[Turn(role='user', content='Hi?')], answer='Hello.', rating=None, correction=None)
>>> print(d.decode_log(log + b'}').detail)
Object missing required field `answer` (model 'chat' has kind = "lm")
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Mapping, Union

import msgspec
from msgspec import UNSET

from streamlearn.records import Example, Exchange, Features, Turn
from streamlearn.stream.events import (MAX_CONVERSATION_CHARS, MAX_EVENT_TIME, Feedback, InferenceLog,
                                       LabeledExample, with_feature_bound)

REASONS = ("too_large", "invalid_json", "not_object", "schema", "non_finite", "unknown_model", "out_of_range",
           "undecodable")
DEFAULT_MAX_ABS_FEATURE = 1e9   # ModelConfig.max_abs_feature's default
_CONTROL = re.compile(r"[\x00-\x1f]")   # C0 controls: never part of an id or a feature name
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")   # ... nor of a conversation, but tab, LF, CR
_LOG_LM_FIELDS = ("messages", "answer")   # the fields only a language model's events may have
_EXAMPLE_LM_FIELDS = ("messages", "answer", "rating", "correction")
_BOUND_ERRORS = ("Expected `float` >=", "Expected `float` <")   # msgspec's words for a Meta(ge/le/lt) miss


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
    partition: int = msgspec.field(default=-1, name="p")   # its Kafka partition number (-1: a file), set by the intake
    # A language model's conversation and answer (features {}). Short names: every waiting log is kept packed.
    text: Union[Exchange, None] = msgspec.field(default=None, name="t")


class LabelEntry(msgspec.Struct):
    """A validated feedback event: a label, or a language model's rating and/or correction (one at least)."""

    request_id: str
    ts: float
    label: Union[bool, float, str, None]   # None: not given (a language model's feedback)
    weight: float
    partition: int = msgspec.field(default=-1, name="p")   # its Kafka partition number (-1: a file), set by the intake
    rating: Union[int, None] = msgspec.field(default=None, name="r")        # -1, 0 or 1; None: not rated
    correction: Union[str, None] = msgspec.field(default=None, name="c")    # the answer it should have given


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.letter = DeadLetter(reason, detail)


class EventDecoder:
    """Turns raw bytes of each topic kind into validated records or dead letters.

    `max_abs_feature` is one bound for every model or a bound per model (models not in it get
    `DEFAULT_MAX_ABS_FEATURE`). msgspec checks the widest bound while it decodes; only a model
    whose bound is tighter than that is checked again in Python. `lm_models`: the language models
    (`kind = "lm"`), logged with `messages` and `answer` instead of `features`.
    """

    def __init__(self, models: set[str] | frozenset[str], max_message_bytes: int = 1 << 20,
                 max_abs_feature: float | Mapping[str, float] = DEFAULT_MAX_ABS_FEATURE,
                 max_future_seconds: float = 3600.0, lm_models: set[str] | frozenset[str] = frozenset()) -> None:
        self.models = frozenset(models)
        self.lm_models = frozenset(lm_models)
        self.max_message_bytes = max_message_bytes
        self.max_future_seconds = max_future_seconds
        if isinstance(max_abs_feature, (int, float)):
            self.bounds = {m: float(max_abs_feature) for m in self.models}
        else:
            self.bounds = {m: float(max_abs_feature.get(m, DEFAULT_MAX_ABS_FEATURE)) for m in self.models}
        widest = max(self.bounds.values(), default=DEFAULT_MAX_ABS_FEATURE)
        self._tighter = {m: b for m, b in self.bounds.items() if b < widest}
        self._log = msgspec.json.Decoder(with_feature_bound(InferenceLog, widest))
        self._feedback = msgspec.json.Decoder(Feedback)
        self._example = msgspec.json.Decoder(with_feature_bound(LabeledExample, widest))
        # Unbounded twins, for the error path only: they find which feature broke the bound.
        self._unbounded = {id(self._log): msgspec.json.Decoder(InferenceLog),
                           id(self._example): msgspec.json.Decoder(LabeledExample)}

    def decode_log(self, raw: bytes) -> LogEntry | DeadLetter:
        try:
            e = self._parse(self._log, raw)
            _check_id(e.request_id, "request_id")
            self._check_model(e.model)
            escaped = raw.find(92) >= 0   # a backslash: JSON carries a control character only as an escape
            text = self._exchange(e, _LOG_LM_FIELDS, escaped)
            features = self._features(e.model, e.features, text, e.request_id, "request_id", escaped)
            return LogEntry(e.request_id, _event_time(e.ts), e.model, features, _version(e.model_version),
                            _served(e.prediction, e.proba), text=text)
        except _Invalid as bad:
            return bad.letter

    def decode_feedback(self, raw: bytes) -> LabelEntry | DeadLetter:
        try:
            e = self._parse(self._feedback, raw)
            _check_id(e.request_id, "request_id")
            escaped = raw.find(92) >= 0
            if escaped:
                _check_text(e.request_id, {})
            label, rating, correction = _feedback(e, escaped)
            return LabelEntry(e.request_id, _event_time(e.ts), label, _check_weight(e.weight),
                              rating=rating, correction=correction)
        except _Invalid as bad:
            return bad.letter

    def decode_example(self, raw: bytes) -> Example | DeadLetter:
        try:
            e = self._parse(self._example, raw)
            _check_id(e.id, "id")
            self._check_model(e.model)
            escaped = raw.find(92) >= 0
            text = self._exchange(e, _EXAMPLE_LM_FIELDS, escaped)
            features = self._features(e.model, e.features, text, e.id, "id", escaped)
            ts, weight = _event_time(e.ts), _check_weight(e.weight)
            if text is None:
                if e.label is UNSET:
                    raise _Invalid("schema", "Object missing required field `label`")
                return Example(e.id, e.model, features, e.label, weight, ts, ts)
            # As for a pair, one without rating and correction reaches the join and ends there as `invalid_label`.
            _, rating, correction = _feedback(e, escaped)
            text = msgspec.structs.replace(text, rating=rating, correction=correction)
            return Example(e.id, e.model, features, text.target or "", weight, ts, ts, text=text)
        except _Invalid as bad:
            return bad.letter

    def ahead_of_broker(self, ts: float, broker_ts: float) -> DeadLetter | None:
        """A `schema` letter when event time `ts` is more than `max_future_seconds` after the broker's timestamp.

        One such `ts` would carry its partition's watermark into the future and expire every pending join.
        Broker timestamps are stored with the message, so a replay decides the same.
        """
        if not ts - broker_ts > self.max_future_seconds:   # a message without a broker timestamp (NaN) passes
            return None
        return DeadLetter("schema", f"ts {ts:.3f} is {ts - broker_ts:.0f} s after the message's broker timestamp "
                                    f"{broker_ts:.3f}; at most intake.max_future_seconds = "
                                    f"{self.max_future_seconds:g} is allowed")

    def _parse(self, decoder: msgspec.json.Decoder, raw: bytes):
        if len(raw) > self.max_message_bytes:
            raise _Invalid("too_large", f"{len(raw)} bytes > max_message_bytes {self.max_message_bytes}")
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError as err:
            message = str(err)
            if message.startswith(_BOUND_ERRORS) and message.endswith("at `$.features[...]`"):
                raise self._out_of_range(decoder, raw) from None
            raise _classify_validation(raw, message) from None
        except msgspec.DecodeError as err:
            raise _classify_malformed(raw, str(err)) from None
        except RecursionError:
            # msgspec follows nesting as deep as Python's stack allows; the contract's shapes are two deep.
            raise _Invalid("schema", "JSON nested deeper than the event contract allows "
                                     "(no field of it holds more than one level of objects)") from None

    def _out_of_range(self, decoder: msgspec.json.Decoder, raw: bytes) -> _Invalid:
        """The error path of a feature beyond the widest bound: which model, which feature, which key to raise."""
        try:
            event = self._unbounded[id(decoder)].decode(raw)
        except msgspec.ValidationError as err:   # something else is wrong as well: name that
            return _classify_validation(raw, str(err))
        try:
            self._check_model(event.model)
            if event.model in self.lm_models:
                raise _features_of_lm(event.model)
            self._check_bound(event.model, event.features)
        except _Invalid as bad:
            return bad
        return _Invalid("out_of_range", "a feature value is beyond max_abs_feature")   # not reached

    def _exchange(self, event, lm_fields: tuple[str, ...], escaped: bool) -> Exchange | None:
        """A language model's conversation and answer, checked; None for any other model (which must not send them).

        `lm_fields`: the event's fields that only a language model's events may have.
        """
        model = event.model
        if model not in self.lm_models:
            for name in lm_fields:
                if getattr(event, name) is not UNSET:
                    raise _Invalid("schema", f"`{name}` is only for models with kind = \"lm\"; model {model!r} "
                                             "is not one")
            return None
        for name in ("messages", "answer"):
            if getattr(event, name) is UNSET:
                raise _Invalid("schema", f"Object missing required field `{name}` (model {model!r} has kind = \"lm\")")
        messages, answer = event.messages, event.answer
        if messages[-1].role != "user":
            raise _Invalid("schema", f"the last of `messages` is the {messages[-1].role}'s; it must be the user's, "
                                     "which the answer answers")
        if escaped:
            for i, message in enumerate(messages):
                _check_content(message.content, f"messages[{i}].content")
            _check_content(answer, "answer")
        total = sum(len(message.content) for message in messages) + len(answer)
        if total > MAX_CONVERSATION_CHARS:
            raise _Invalid("schema", f"`messages` and `answer` hold {total} characters; at most "
                                     f"{MAX_CONVERSATION_CHARS} (MAX_CONVERSATION_CHARS) are allowed in all")
        return Exchange([Turn(message.role, message.content) for message in messages], answer)

    def _features(self, model: str, features, text: Exchange | None, rid: str, field: str,
                  escaped: bool) -> Features:
        """The checked features (nulls dropped): required for a model that learns from them, absent or empty for
        a language model (`text`)."""
        if text is not None:
            if features:   # UNSET is false too
                raise _features_of_lm(model)
            features = {}
        elif features is UNSET:
            raise _Invalid("schema", "Object missing required field `features`")
        if escaped:
            _check_text(rid, features, field)
        if model in self._tighter:
            self._check_bound(model, features)
        return _clean_features(features)

    def _check_model(self, model: str) -> None:
        if model not in self.models:
            raise _Invalid("unknown_model", f"model {model[:64]!r} is not configured")

    def _check_bound(self, model: str, features: dict) -> None:
        bound = self.bounds[model]
        for name, value in features.items():
            if type(value) is float and not -bound <= value <= bound:
                raise _Invalid("out_of_range", f"feature {name[:64]!r} = {value:g} is beyond ±{bound:g}, the bound "
                                               f"of model {model!r}; raise models.{model}.max_abs_feature if such "
                                               "values are real")


def _features_of_lm(model: str) -> _Invalid:
    return _Invalid("schema", f"`features` must be absent or empty for model {model!r} (kind = \"lm\"): it learns "
                              "from `messages` and `answer`")


def _classify_validation(raw: bytes, message: str) -> _Invalid:
    if message.startswith("Number out of range"):
        return _Invalid("non_finite", message)
    # msgspec validates as it parses: a field can be missing before trailing garbage is seen. Bad JSON first.
    malformed = _json_error(raw)
    if malformed is not None:
        return _classify_malformed(raw, malformed)
    if message.startswith("Expected `object`") and " - at " not in message:
        return _Invalid("not_object", message)
    if message.startswith(_BOUND_ERRORS) and message.endswith("at `$.ts`"):
        return _Invalid("schema", f"{message}: ts must be unix seconds in [0, {MAX_EVENT_TIME:.0f}) "
                                  "(1970-01-01 to 2100-01-01)")
    return _Invalid("schema", message)


def _json_error(raw: bytes) -> str | None:
    """Why `raw` is not JSON, or None when it is (as far as can be told: too deep to follow counts as JSON)."""
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as err:
        return str(err)
    except Exception:   # noqa: BLE001 - RecursionError, a number beyond float: a question for the schema
        return None
    return None


def _classify_malformed(raw: bytes, message: str) -> _Invalid:
    # Python's json writes NaN/Infinity literals, which strict JSON parsers refuse:
    # tell the producer the real problem, a non-finite number, not "bad JSON".
    try:
        json.loads(raw, parse_constant=_refuse_constant)
    except _Invalid as bad:
        return bad
    except Exception:   # noqa: BLE001 - anything else (bad bytes, RecursionError): it is not JSON for us
        pass
    return _Invalid("invalid_json", message)


def _refuse_constant(name: str) -> float:
    raise _Invalid("non_finite", f"{name} is not a finite number")


def _check_id(value: str, field: str) -> None:
    if not 1 <= len(value) <= 256:
        raise _Invalid("schema", f"{field} must have 1 to 256 characters, has {len(value)}")


def _check_text(rid: str, features: dict, field: str = "request_id") -> None:
    """Refuses control characters in the id and the feature names (they break logs, labels and files downstream).

    Only called when the raw message holds a backslash: JSON can carry a control character no other way.
    """
    if _CONTROL.search(rid):
        raise _Invalid("schema", f"{field} {rid[:64]!r} holds control characters")
    for name in features:
        if _CONTROL.search(name):
            raise _Invalid("schema", f"feature name {name[:64]!r} holds control characters")


def _check_content(text: str, field: str) -> None:
    """Refuses control characters other than tab, newline and carriage return in a conversation's text.

    Only called when the raw message holds a backslash, as `_check_text` is. (A lone surrogate escape never gets
    here: msgspec refuses it as malformed JSON, `invalid_json`.)
    """
    found = _CONTROL_IN_TEXT.search(text)
    if found:
        raise _Invalid("schema", f"{field} holds the control character {found.group()!r} at {found.start()} "
                                 "(only tab, newline and carriage return are allowed)")


def _feedback(event, escaped: bool) -> tuple[Union[bool, float, str, None], Union[int, None], Union[str, None]]:
    """(label, rating, correction) of a feedback event, None where not given; one of them at least."""
    if event.label is UNSET and event.rating is UNSET and event.correction is UNSET:
        raise _Invalid("schema", "feedback needs at least one of `label`, `rating` and `correction` (the last two "
                                 "for models with kind = \"lm\")")
    if escaped and event.correction is not UNSET:
        _check_content(event.correction, "correction")
    return tuple(None if value is UNSET else value for value in (event.label, event.rating, event.correction))


def _check_weight(weight: float) -> float:
    if weight <= 0:
        raise _Invalid("schema", f"weight must be > 0, is {weight}")
    return weight


def _event_time(ts: float | str) -> float:
    """Unix seconds; numbers are in range already (msgspec checks `EventTime`), RFC 3339 strings here."""
    if type(ts) is float:
        return ts
    try:
        when = datetime.fromisoformat(ts)
        seconds = when.timestamp() if when.tzinfo is not None else math.nan  # RFC 3339 always has an offset
    except (ValueError, OverflowError):
        seconds = math.nan
    if math.isnan(seconds):
        raise _Invalid("schema", f"ts {ts[:40]!r} is neither unix seconds nor RFC 3339 with an offset")
    if not 0 <= seconds < MAX_EVENT_TIME:
        raise _Invalid("schema", f"ts {ts[:40]!r} is outside 1970-01-01 to 2100-01-01, the event times allowed")
    return seconds


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
