"""Concept-drift detectors on a model's prequential error stream (River's ADWIN and Page-Hinkley).

Each scored example adds its error (1 − correct, or the absolute error) to every
detector. Only a rise in error is drift: ADWIN also notices the error falling
while a model learns, which is no reason to consolidate or to alarm, so such a
change is dropped; Page-Hinkley runs in its "up" mode.

>>> import numpy as np
>>> from streamlearn.config import DriftConfig
>>> monitor = DriftMonitor(DriftConfig(detectors=["adwin"]))
>>> rng = np.random.default_rng(0)
>>> monitor.update(rng.random(3000) < 0.05)                # stationary: 5% errors
[]
>>> [(e.detector, e.position > 3000) for e in monitor.update(rng.random(1000) < 0.5)][:1]   # errors jump
[('adwin', True)]
"""

from __future__ import annotations

from collections import Counter

import msgspec
import numpy as np
from river import drift

from streamlearn.config import DriftConfig


class DriftEvent(msgspec.Struct):
    detector: str
    position: int      # examples scored by the model when it fired


class DriftMonitor:
    """The configured detectors of one model, how often each fired, and where."""

    def __init__(self, settings: DriftConfig) -> None:
        self.detectors = {name: _detector(name, settings) for name in settings.detectors}
        self.detected: Counter[str] = Counter({name: 0 for name in self.detectors})
        self.position = 0
        self.last: list[DriftEvent] = []   # the most recent events, newest last (bounded)

    def update(self, errors) -> list[DriftEvent]:
        """Feeds a batch of errors in order; returns the drifts detected in it."""
        events = []
        for error in np.asarray(errors, dtype=float).tolist():
            self.position += 1
            for name, detector in self.detectors.items():
                before = getattr(detector, "estimation", None)
                detector.update(error)
                if detector.drift_detected and (before is None or detector.estimation > before):
                    events.append(DriftEvent(name, self.position))
        for event in events:
            self.detected[event.detector] += 1
        self.last = (self.last + events)[-20:]
        return events


def _detector(name: str, settings: DriftConfig):
    if name == "adwin":
        return drift.ADWIN(delta=settings.adwin_delta, grace_period=settings.grace)
    return drift.PageHinkley(min_instances=settings.grace, delta=settings.page_hinkley_delta,
                             threshold=settings.page_hinkley_threshold, mode="up")
