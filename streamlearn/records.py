"""The typed records that cross from intake to the learner.

The intake stage (consume, decode, join) and the learner may run in different
processes, so everything here is a msgspec Struct that travels as msgpack. A
`Batch` carries the source offsets it covers and the intake's counters at that
point, so the learner side always holds one consistent cut of the whole state.

>>> b = Batch(examples=[Example("r-1", "default", {"x": 1.0}, 1, 1.0, 10.0, 10.0)])
>>> decode_batch(encode_batch(b)).examples[0].id
'r-1'
"""

from __future__ import annotations

from typing import Union

import msgspec

from streamlearn.telemetry.histogram import HistogramState

Features = dict[str, Union[float, str, bool]]
Label = Union[bool, float, str]


class Turn(msgspec.Struct, array_like=True, frozen=True):
    """One message of a conversation: who said it ("system", "user" or "assistant") and what."""

    role: str
    content: str


class Exchange(msgspec.Struct, array_like=True, frozen=True):
    """A conversation as it was served, the model's answer, and the feedback on it: what a language model learns.

    >>> Exchange([Turn("user", "Hi?")], "Hello.", rating=1).target, Exchange([], "No.", -1, "Yes.").target
    ('Hello.', 'Yes.')
    """

    messages: list[Turn]                 # the conversation up to the answer, its last message the user's
    answer: str                          # what the model answered
    rating: Union[int, None] = None      # -1 (bad), 0 (neutral), 1 (good); None: not rated
    correction: Union[str, None] = None  # the answer it should have given

    @property
    def target(self) -> Union[str, None]:
        """The answer to learn: the correction, else the served answer if rated good; None: nothing to learn."""
        if self.correction is not None:
            return self.correction
        return self.answer if self.rating is not None and self.rating > 0 else None


class Example(msgspec.Struct, array_like=True):
    """One labeled example, ready to learn from (missing feature values already dropped)."""

    id: str
    model: str
    features: Features
    label: Label
    weight: float
    ts: float        # event time of the example (the later of inference and feedback)
    label_ts: float  # event time the label became known: the start of the feedback loop
    consumed: float = 0.0  # wall time the intake read the message that completed it (0: unknown)
    model_version: str = ""            # the serving version that made the prediction ("": not logged)
    served: Union[Label, None] = None  # what that version predicted (the log's prediction, or its likeliest class)
    partition: int = -1                # the Kafka partition number it came from (-1: a file): rescaling divides by it
    text: Union[Exchange, None] = None # a language model's example: the conversation and its feedback (features {})


class Rejected(msgspec.Struct):
    """An example a model refused (its scoring or learning raised): quarantined as a `learn_error` dead letter."""

    model: str
    example: Example
    error: str    # the exception's class name (a bounded metric label)
    detail: str   # its message, shortened


class IntakeStats(msgspec.Struct):
    """Cumulative counters of the intake stage, shipped with every batch."""

    events: dict[tuple[str, str], int] = {}        # (topic, outcome) -> messages
    dead_letters: dict[tuple[str, str], int] = {}  # (topic, reason) -> messages
    join: dict[str, int] = {}                      # outcome -> count
    join_pending: int = 0
    feedback_delay: Union[HistogramState, None] = None
    consumer_lag: dict[tuple[str, int], int] = {}  # (topic, partition) -> messages behind
    queueing: dict[str, HistogramState] = {}       # topic -> seconds from broker timestamp to consumed
    watermark: float = 0.0                         # event time up to which the join has emitted
    assigned: list[str] = []                       # position keys this intake currently reads
    caught_up: bool = False                        # every partition idle and all input released
    broker: str = ""                               # what keeps the source from reading, in words ("": nothing)
    stages: dict[str, HistogramState] = {}         # intake stages of the feedback loop (kafka, join, batch): seconds
    released_to: float = float("-inf")             # every example before this event time has been handed over
                                                   # (the watermark, or the oldest example the join still holds)


class Batch(msgspec.Struct):
    """Examples in learning order, the source offsets after them, and the intake's counters."""

    examples: list[Example]
    offsets: dict[str, int] = {}   # "topic:partition" (or "file:PATH") -> next offset to read
    stats: Union[IntakeStats, None] = None
    final: bool = False              # the source is exhausted (file) or the intake has stopped
    cut: bool = True                 # offsets describe the state after this batch (False: a piece of a
                                     # larger release, offsets empty; wait for the cut to commit)
    barrier: Union[bytes, None] = None  # on a cut the learner asked for: the intake's own state at this
                                        # point (opaque here), to be snapshotted with the models
    barrier_follows: bool = False    # the barrier travels as the channel's next frame, not inside the batch
                                     # (a backlog's join state is megabytes: one copy of it, not two)
    exhausted: bool = False          # final because the source has no more input (a file at its end), not
                                     # because the intake was stopped: learners flush only then
    sent: float = 0.0                # wall time the intake handed the batch over (stage timing only)
    received: float = 0.0            # wall time the learner's process received it (set there; stage timing only)


def handoff_pieces(examples: list[Example], size: int) -> tuple[list[list[Example]], list[Example]]:
    """`examples` split for the hand-off: full pieces of `size` (not cuts), then the last piece (the cut, may be empty).

    >>> [len(p) for p in handoff_pieces(list(range(5)), 2)[0]], handoff_pieces(list(range(5)), 2)[1]
    ([2, 2], [4])
    """
    cut_at = size * ((len(examples) - 1) // size) if examples else 0
    return [examples[start:start + size] for start in range(0, cut_at, size)], examples[cut_at:]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(batch: Batch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> Batch:
    return _decoder.decode(data)
