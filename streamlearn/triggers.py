"""Triggers: when to snapshot, consolidate or publish, and why each firing happened.

A `Trigger` combines the conditions of a `TriggerConfig` (every N examples,
every T seconds, on drift, on the rolling prequential score falling below a
bound); whichever holds first fires it, the counters restart, and the firing is
counted under its reason (`triggers_fired_total{action,reason}`). A score bound
fires once per fall: it re-arms when the score is back at or above the bound,
so a model that stays bad is not consolidated or snapshotted on every batch.

>>> from streamlearn.config import TriggerConfig
>>> trigger = Trigger("snapshot", TriggerConfig(every_examples=100, score_below=0.8), now=0.0)
>>> trigger.check(examples=50, now=1.0, score=0.9), trigger.check(examples=120, now=2.0, score=0.9)
(None, 'examples')
>>> trigger.check(examples=130, now=3.0, score=0.7), trigger.check(examples=140, now=4.0, score=0.6)
('score', None)
>>> dict(trigger.fired)
{'examples': 1, 'score': 1}
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional

from streamlearn.config import TriggerConfig

REASONS = ("examples", "seconds", "drift", "score", "shutdown")


class Trigger:
    """Decides when one action is due, from the conditions of its config."""

    def __init__(self, action: str, config: TriggerConfig, now: float, examples: int = 0) -> None:
        self.action = action
        self.config = config
        self.fired: Counter[str] = Counter()
        self._examples = examples    # the example count and time of the last firing
        self._time = now
        self._below = False          # the score is under its bound and has fired for this fall

    @property
    def watches_score(self) -> bool:
        """Whether a score bound is configured (callers may skip computing the score otherwise)."""
        return self.config.score_below is not None

    def check(self, examples: int, now: float, drifted: bool = False, score: float = math.nan) -> Optional[str]:
        """The reason the action is due now (and counts it), or None; `examples` is a running total."""
        reason = self._reason(examples, now, drifted, score)
        if reason is not None:
            self.fire(reason, examples, now)
        return reason

    def fire(self, reason: str, examples: int, now: float) -> None:
        """Records a firing decided elsewhere too (e.g. at shutdown); the intervals restart from here."""
        self.fired[reason] += 1
        self._examples, self._time = examples, now

    def _reason(self, examples: int, now: float, drifted: bool, score: float) -> Optional[str]:
        c = self.config
        if drifted and c.on_drift:
            return "drift"
        if c.score_below is not None and not math.isnan(score):
            fell = score < c.score_below
            if fell and not self._below:
                self._below = True
                return "score"
            self._below = fell
        if c.every_examples and examples - self._examples >= c.every_examples:
            return "examples"
        if c.every_seconds and now - self._time >= c.every_seconds:
            return "seconds"
        return None
