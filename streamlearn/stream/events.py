"""Typed records of the event contract (see DESIGN.md, "Event contract").

These are the shapes decoded straight from the wire with msgspec; the checks that
msgspec cannot express (id length and characters, RFC 3339 times, per-model feature
bounds) live in `streamlearn.stream.decode`. A numeric event time must lie in
[0, `MAX_EVENT_TIME`): 1970-01-01 up to 2100-01-01.

>>> import msgspec
>>> raw = b'{"request_id": "r-1", "ts": 1.5, "label": 1}'
>>> msgspec.json.decode(raw, type=Feedback).source
'explicit'
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

MAX_EVENT_TIME = 4102444800.0   # 2100-01-01T00:00:00Z: no real event is stamped later (or before 1970)

FeatureValue = Union[float, str, bool, None]
Label = Union[bool, float, str]
EventTime = Union[Annotated[float, msgspec.Meta(ge=0, lt=MAX_EVENT_TIME)], str]

INFERENCE_TOPIC = "inference-logs"
FEEDBACK_TOPIC = "feedback"
EXAMPLES_TOPIC = "examples"


class InferenceLog(msgspec.Struct):
    """What the serving system logged for one prediction."""

    request_id: str
    ts: EventTime
    features: dict[str, FeatureValue]
    model: str = "default"
    model_version: Union[str, int, None] = None
    prediction: Union[Label, None] = None
    proba: Union[dict[str, float], None] = None


class Feedback(msgspec.Struct):
    """The label that arrived later for one request."""

    request_id: str
    ts: EventTime
    label: Label
    source: Literal["explicit", "implicit", "hitl"] = "explicit"
    weight: float = 1.0


class LabeledExample(msgspec.Struct):
    """An example joined upstream: features and label in one message."""

    id: str
    ts: EventTime
    features: dict[str, FeatureValue]
    label: Label
    model: str = "default"
    weight: float = 1.0


def with_feature_bound(event: type[msgspec.Struct], max_abs: float) -> type[msgspec.Struct]:
    """`event` (a type with `features`) whose numeric feature values msgspec refuses beyond ±`max_abs`.

    The bound is checked inside msgspec's C decoder: no Python loop over the values.
    """
    value = Union[Annotated[float, msgspec.Meta(ge=-max_abs, le=max_abs)], str, bool, None]
    return msgspec.defstruct(f"Bounded{event.__name__}", [("features", dict[str, value])], bases=(event,))
