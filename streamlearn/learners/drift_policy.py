"""A classifier's drift policy: which drift a detection was, decided from the stream, and what was done.

A detection opens a case. Every example scored after it is judged against a
reference copy of the model taken before it (the learner keeps two copies,
`reference_every` examples apart, and judges with the older): its label agrees
with the reference, contradicts it (a known class, another prediction), belongs
to a class first seen lately, or none of these (a learner may also judge a row
unknown when its inputs are new ground: the torch learner does, `encoder.beyond_sample`). Contradictions count above the
reference's error rate before the case (the model's rolling error at the
detection). After `judge_examples`:
- many labels of new classes, or few contradictions: new classes or shifted
  inputs, old labels still true (`new_classes`: keep; a torch model keeps the
  consolidation made at the detection, as without a policy);
- contradictions early that stopped: a `burst` that ended (nothing done);
- contradictions throughout: a suspected change; the learner becomes plastic
  (what it does is undone if the case ends as a burst). The change is confirmed
  once contradictions held for `confirm_examples` and `confirm_seconds` of event
  time since the detection (a `ConceptChange`); it is a `burst` if their rise
  over the last `judge_examples` falls below half the bound before that.
Only example counts and event times decide, so a replay decides alike; the state
is plain data, pickled with the learner (the reference copies go with the model).

>>> from streamlearn.config import PolicyConfig
>>> policy = DriftPolicy(PolicyConfig(judge_examples=10, confirm_examples=20, confirm_seconds=0.0))
>>> policy.saw([0, 1], first_position=1)
>>> policy.open(position=5000, ts=50.0, detector="adwin", error=0.05)
True
>>> flags = Judged(agree=[False] * 30, known=[True] * 30, labels=[1] * 30)
>>> [(t.kind, t.position) for t in policy.judge(flags, np.arange(5001, 5031), np.arange(50.0, 80.0))]
[('suspect', 5010), ('change', 5020)]
>>> policy.last_change.position, policy.stage
(5000, 'idle')
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Iterable, Optional, Sequence

import msgspec
import numpy as np

from streamlearn.config import PolicyConfig
from streamlearn.learners.plasticity import KINDS, ConceptChange, PolicyAction

KEPT = 20            # confirmed changes kept in `changes` (newest last)
PENDING = 100        # actions kept for the history recorder when nobody drains them
MAX_LABELS = 1000    # labels whose first position is kept; later ones count as established

AGREE, CONTRADICT, NEW, UNSURE = 0, 1, 2, 3


class Judged(msgspec.Struct):
    """What a learner saw of the examples scored after a detection, one entry per example, in stream order.

    agree: the reference predicted the label; known: the label is a class the reference knows; labels: the
    labels themselves (hashable).
    """

    agree: Sequence[bool]
    known: Sequence[bool]
    labels: Sequence[Hashable]


class Case(msgspec.Struct):
    """An open drift case: where it began and the evidence so far."""

    position: int
    ts: float
    detector: str
    error: float = 0.0    # the model's rolling error rate at the detection: contradictions count above it
    judged: int = 0
    new: int = 0
    contradicted: int = 0
    early: int = 0                               # contradictions among the first half of the judged examples
    recent: list[int] = msgspec.field(default_factory=list)   # codes of the last `judge_examples` judged


class Transition(msgspec.Struct, frozen=True):
    """A decision the learner acts on: "suspect", or a kind of KINDS that closes the case."""

    kind: str
    position: int
    ts: float
    suspected: bool = False   # the case had been a suspected change (the learner undoes what that did)


class DriftPolicy:
    """One model's drift cases, decisions, confirmed changes and counted actions."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.stage = "idle"                       # "idle", "judging" (a case is open) or "suspected"
        self.case: Optional[Case] = None
        self.changes: list[ConceptChange] = []    # confirmed changes, newest last (bounded)
        self.actions: list[PolicyAction] = []     # not yet drained by the history recorder (bounded)
        self.counts: Counter[tuple[str, str]] = Counter()   # (kind, action) -> times: drift_actions_total
        self.first_seen: dict = {}                # label -> position of its first example
        self.boost_until = 0                      # the learning rate is raised up to this position (torch)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def last_change(self) -> Optional[ConceptChange]:
        """The newest confirmed real change, or None."""
        return self.changes[-1] if self.changes else None

    @property
    def suspected(self) -> bool:
        return self.stage == "suspected"

    @property
    def case_open(self) -> bool:
        """A detection is being judged or a change is suspected: the gate promotes nothing meanwhile."""
        return self.case is not None

    def saw(self, labels: Iterable[Hashable], first_position: int) -> None:
        """Notes the first position of each label not seen before (`labels` in stream order from `first_position`)."""
        first_seen = self.first_seen
        labels = list(labels)
        fresh = set(labels) - first_seen.keys()
        for label in fresh:
            if len(first_seen) >= MAX_LABELS:
                return
            first_seen[label] = first_position + labels.index(label)

    def open(self, position: int, ts: float, detector: str, error: float = 0.0) -> bool:
        """Opens a case at a detection (`error`: the rolling error rate then); False if one is open already."""
        if not self.enabled or self.case is not None:
            return False
        self.case = Case(position, ts, detector, error if error == error else 0.0)   # NaN: nothing scored yet
        self.stage = "judging"
        return True

    def judging_from(self, first_position: int, n: int) -> Optional[int]:
        """Index into `n` examples scored from `first_position` of the first one to judge; None if none."""
        if self.case is None:
            return None
        start = max(0, self.case.position + 1 - first_position)
        return start if start < n else None

    def judge(self, judged: Judged, positions: np.ndarray, ts: np.ndarray) -> list[Transition]:
        """Adds the evidence of examples scored after the detection; returns the decisions they led to."""
        out: list[Transition] = []
        codes = self._codes(judged, positions)
        for code, position, t in zip(codes.tolist(), positions.tolist(), ts.tolist()):
            if self.case is None:
                break
            decided = self._one(code, int(position), float(t))
            if decided is not None:
                out.append(decided)
        return out

    def _codes(self, judged: Judged, positions: np.ndarray) -> np.ndarray:
        agree, known = (np.asarray(a, dtype=bool) for a in (judged.agree, judged.known))
        window = self.config.new_class_examples
        first = np.fromiter((self.first_seen.get(label, -window) for label in judged.labels), np.int64, len(agree))
        new = first > positions - window
        codes = np.full(len(agree), UNSURE, dtype=np.int64)
        codes[agree] = AGREE
        codes[~agree & known] = CONTRADICT
        codes[new] = NEW
        return codes

    def _one(self, code: int, position: int, ts: float) -> Optional[Transition]:
        case, cfg = self.case, self.config
        case.judged += 1
        case.new += code == NEW
        case.contradicted += code == CONTRADICT
        if case.judged <= cfg.judge_examples // 2:
            case.early += code == CONTRADICT
        case.recent.append(code)
        if len(case.recent) > cfg.judge_examples:
            del case.recent[0]
        if self.stage == "judging":
            return self._classify(position, ts) if case.judged >= cfg.judge_examples else None
        share = case.recent.count(CONTRADICT) / len(case.recent)
        if share < case.error + cfg.contradiction / 2:
            return self._close("burst", position, ts)
        if position - case.position >= cfg.confirm_examples and ts - case.ts >= cfg.confirm_seconds:
            return self._confirm(position, ts)
        return None

    def _classify(self, position: int, ts: float) -> Transition:
        """The decision after `judge_examples`: new classes, a burst that ended, or a suspected change."""
        case, cfg = self.case, self.config
        first, second = cfg.judge_examples // 2, cfg.judge_examples - cfg.judge_examples // 2
        late = case.contradicted - case.early
        ended = late < (case.error + cfg.contradiction / 2) * second   # the second half is back to normal
        if case.new >= cfg.new_class_share * case.judged:
            return self._close("new_classes", position, ts)
        if case.contradicted >= (case.error + cfg.contradiction) * case.judged:
            if ended:
                return self._close("burst", position, ts)
            self.stage = "suspected"
            return Transition("suspect", position, ts)
        if case.early >= (case.error + cfg.contradiction) * first and ended:
            return self._close("burst", position, ts)
        return self._close("new_classes", position, ts)

    def _confirm(self, position: int, ts: float) -> Transition:
        case = self.case
        self.changes.append(ConceptChange(case.position, case.ts, position, ts, case.detector))
        del self.changes[:-KEPT]
        return self._close("change", position, ts)

    def _close(self, kind: str, position: int, ts: float) -> Transition:
        suspected = self.stage == "suspected"
        self.case = None
        self.stage = "idle"
        return Transition(kind, position, ts, suspected)

    def act(self, kind: str, action: str, position: int, ts: float) -> None:
        """Records one action (kind: one of KINDS) for the history and drift_actions_total."""
        assert kind in KINDS, kind
        self.actions.append(PolicyAction(position, ts, kind, action))
        del self.actions[:-PENDING]   # drained by the history; bounded when nobody records it
        self.counts[(kind, action)] += 1

    def boosted(self, position: int) -> bool:
        """Whether the learning rate is raised at this position (a suspected or recent change)."""
        return position < self.boost_until
