"""Triggers: when to snapshot, consolidate or publish, and why each firing happened.

A `Trigger` combines the conditions of a `TriggerConfig` (every N examples,
every T seconds, on drift, on the rolling prequential score falling below a
bound); whichever holds first fires it, the counters restart, and the firing is
counted under its reason (`triggers_fired_total{action,reason}`). Drift comes in
as the running total of detections (a firing takes those so far into account),
the score as a number or as a function called only when a bound is configured;
`state()` is what a snapshot keeps (the clock restarts with the process). A score
bound fires once per fall: it re-arms when the score is back at or above the bound,
so a model that stays bad is not consolidated or snapshotted on every batch.

>>> from streamlearn.config import TriggerConfig
>>> trigger = Trigger("snapshot", TriggerConfig(every_examples=100, score_below=0.8), now=0.0)
>>> trigger.check(examples=50, now=1.0, score=0.9), trigger.check(examples=120, now=2.0, score=0.9)
(None, 'examples')
>>> trigger.check(examples=130, now=3.0, score=0.7), trigger.check(examples=140, now=4.0, score=lambda: 0.6)
('score', None)
>>> dict(trigger.fired)
{'examples': 1, 'score': 1}
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional, Union

import msgspec

from streamlearn.config import TriggerConfig

Score = Union[float, Callable[[], float]]


class TriggerState(msgspec.Struct):
    """What survives a restart: firings by reason, and the example and drift counts at the last firing."""

    fired: dict[str, int] = {}
    examples: int = 0
    drifts: int = 0
    below: bool = False


class Trigger:
    """Decides when one action is due, from the conditions of its config."""

    def __init__(self, action: str, config: TriggerConfig, now: float, state: Optional[TriggerState] = None) -> None:
        self.action = action
        self.config = config
        state = state or TriggerState()
        self.fired: Counter[str] = Counter(state.fired)
        self._examples = state.examples   # the example count, drift count and time of the last firing
        self._drifts = state.drifts
        self._time = now
        self._below = state.below         # the score is under its bound and has fired for this fall

    def check(self, examples: int, now: float, drifts: int = 0, score: Score = math.nan) -> Optional[str]:
        """The reason the action is due now (and counts it), or None; `examples` and `drifts` are running totals."""
        reason = self._reason(examples, now, drifts, score)
        if reason is not None:
            self.fire(reason, examples, now, drifts)
        return reason

    def fire(self, reason: str, examples: int, now: float, drifts: Optional[int] = None) -> None:
        """Records a firing decided elsewhere too (e.g. at shutdown); the intervals restart from here."""
        self.fired[reason] += 1
        self._examples, self._time = examples, now
        if drifts is not None:
            self._drifts = drifts

    def state(self) -> TriggerState:
        return TriggerState(dict(self.fired), self._examples, self._drifts, self._below)

    def _reason(self, examples: int, now: float, drifts: int, score: Score) -> Optional[str]:
        c = self.config
        if c.on_drift and drifts > self._drifts:
            return "drift"
        if c.score_below is not None:
            value = score() if callable(score) else score
            if not math.isnan(value):
                fell = value < c.score_below
                if fell and not self._below:
                    self._below = True
                    return "score"
                self._below = fell
        if c.every_examples and examples - self._examples >= c.every_examples:
            return "examples"
        if c.every_seconds and now - self._time >= c.every_seconds:
            return "seconds"
        return None
