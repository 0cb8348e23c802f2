"""Typed records of the event contract (see DESIGN.md, "Event contract").

These are the shapes decoded straight from the wire with msgspec; the checks that
msgspec cannot express (id length and characters, RFC 3339 times, per-model feature
bounds, which fields a model's kind needs) live in `streamlearn.stream.decode`. A
numeric event time must lie in [0, `MAX_EVENT_TIME`): 1970-01-01 up to 2100-01-01.

A language model (`kind = "lm"`) is logged with the conversation it answered
(`messages`) and its `answer` instead of `features`; its feedback is a `rating`
and/or a `correction` instead of a `label`. Fields a message may leave out are
`UNSET`, so that a missing field can be told from an empty one.

>>> import msgspec
>>> raw = b'{"request_id": "r-1", "ts": 1.5, "label": 1}'
>>> msgspec.json.decode(raw, type=Feedback).source
'explicit'
>>> raw = (b'{"request_id": "r-2", "ts": 2, "model": "chat", '
...        b'"messages": [{"role": "user", "content": "Hi?"}], "answer": "Hello."}')
>>> log = msgspec.json.decode(raw, type=InferenceLog)
>>> log.messages[0].role, log.features is msgspec.UNSET
('user', True)
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import UNSET, UnsetType

MAX_EVENT_TIME = 4102444800.0   # 2100-01-01T00:00:00Z: no real event is stamped later (or before 1970)
# A language model's conversation, bounded so that one message cannot hold the join or a training step hostage:
MAX_MESSAGES = 64                # messages in one conversation (the answer aside)
MAX_CONTENT_CHARS = 8000         # characters in one message's content, an answer or a correction
MAX_CONVERSATION_CHARS = 32000   # characters in all the messages' contents and the answer together

FeatureValue = Union[float, str, bool, None]
Label = Union[bool, float, str]
EventTime = Union[Annotated[float, msgspec.Meta(ge=0, lt=MAX_EVENT_TIME)], str]
Content = Annotated[str, msgspec.Meta(max_length=MAX_CONTENT_CHARS)]
# An empty correction would read as "nothing to learn" downstream (an example's label "")
Correction = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CONTENT_CHARS)]
Rating = Literal[-1, 0, 1]   # bad, neutral, good

INFERENCE_TOPIC = "inference-logs"
FEEDBACK_TOPIC = "feedback"
EXAMPLES_TOPIC = "examples"


class ChatMessage(msgspec.Struct):
    """One message of a conversation a language model answered."""

    role: Literal["system", "user", "assistant"]
    content: Content


Messages = Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]


class InferenceLog(msgspec.Struct):
    """What the serving system logged for one prediction: features, or a language model's conversation and answer."""

    request_id: str
    ts: EventTime
    features: Union[dict[str, FeatureValue], UnsetType] = UNSET   # required unless the model has kind = "lm"
    model: str = "default"
    model_version: Union[str, int, None] = None
    prediction: Union[Label, None] = None
    proba: Union[dict[str, float], None] = None
    messages: Union[Messages, UnsetType] = UNSET   # kind = "lm" only (required there): the last is the user's
    answer: Union[Content, UnsetType] = UNSET      # kind = "lm" only (required there): what the model answered


class Feedback(msgspec.Struct):
    """What arrived later for one request: a label, or a language model's rating and/or correction (one at least)."""

    request_id: str
    ts: EventTime
    label: Union[Label, UnsetType] = UNSET
    source: Literal["explicit", "implicit", "hitl"] = "explicit"
    weight: float = 1.0
    rating: Union[Rating, UnsetType] = UNSET           # of a language model's answer
    correction: Union[Correction, UnsetType] = UNSET   # the answer a language model should have given


class LabeledExample(msgspec.Struct):
    """An example joined upstream: features and label in one message (a language model: conversation and feedback)."""

    id: str
    ts: EventTime
    features: Union[dict[str, FeatureValue], UnsetType] = UNSET   # required unless the model has kind = "lm"
    label: Union[Label, UnsetType] = UNSET                        # required unless the model has kind = "lm"
    model: str = "default"
    weight: float = 1.0
    messages: Union[Messages, UnsetType] = UNSET        # kind = "lm" only, as in `InferenceLog`
    answer: Union[Content, UnsetType] = UNSET
    rating: Union[Rating, UnsetType] = UNSET            # kind = "lm" only, as in `Feedback` (a label is ignored)
    correction: Union[Correction, UnsetType] = UNSET


def with_feature_bound(event: type[msgspec.Struct], max_abs: float) -> type[msgspec.Struct]:
    """`event` (a type with an optional `features`) whose numeric feature values msgspec refuses beyond ±`max_abs`.

    The bound is checked inside msgspec's C decoder: no Python loop over the values.
    """
    value = Union[Annotated[float, msgspec.Meta(ge=-max_abs, le=max_abs)], str, bool, None]
    bounded = ("features", Union[dict[str, value], UnsetType], UNSET)
    return msgspec.defstruct(f"Bounded{event.__name__}", [bounded], bases=(event,))
