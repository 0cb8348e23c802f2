"""Typed records of the event contract (see DESIGN.md, "Event contract").

These are the shapes decoded straight from the wire with msgspec; the checks that
msgspec cannot express (id length, finite numbers, RFC 3339 times) live in
`streamlearn.stream.decode`.

>>> import msgspec
>>> raw = b'{"request_id": "r-1", "ts": 1.5, "label": 1}'
>>> msgspec.json.decode(raw, type=Feedback).source
'explicit'
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

FeatureValue = Union[float, str, bool, None]
Label = Union[bool, float, str]
EventTime = Union[float, str]

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
