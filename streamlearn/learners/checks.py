"""Checks every learner must pass, whatever its kind: one generic suite, in the spirit of River's `check_estimator`.

Each check takes a learner factory (a callable that returns a fresh learner, built with the same seed every
time) and a small deterministic stream (`make_stream`), and raises `AssertionError` saying what broke. The
checks use only what the contract (`contract.Learner`) shows: `learn_batch`, `flush`, `predict_many`,
`snapshot`/`restore`, and the `evaluation` (scores, counters, `probe_accuracy`).
`yield_checks` lists them; `check_learner` runs them all. Where a property holds for a kind only under a
condition (learners that queue micro-batches), the check compares under that condition and says so, rather
than skipping the kind.

>>> from streamlearn.config import ModelConfig
>>> from streamlearn.learners.river_learner import RiverLearner
>>> check_learner(lambda: RiverLearner("m", ModelConfig(model="logreg")), make_stream("classification", 40))
"""

from __future__ import annotations

import copyreg
import hashlib
import logging
import math
import pickle
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import msgspec
import numpy as np

from streamlearn.learners.contract import Learner
from streamlearn.records import Example, Exchange, Turn

Factory = Callable[[], Learner]
Check = Callable[[Factory, list[Example]], None]

NOW = 1e9                  # the wall time passed to `learn_batch` (latency metrics only; never what is learned)
PIECES = (1, 7)            # the piece sizes (besides all at once) a stream is cut into by the intake
WEIGHT = 4.0               # the feedback weight of every third example in the weights check
SCORE_TOLERANCE = 1e-9     # relative: a sum of log losses depends on how it was grouped (batch sizes)
# Histograms of wall-clock durations: they differ from run to run by nature, and say nothing of what was learned.
WALL_CLOCK = frozenset({"update_seconds", "loop_latency", "processing"})
# Attributes that hold a random generator seeded from the OS, which nothing that learns or predicts draws from:
# River's Gaussian (in tree leaves and splitters, naive Bayes) draws from it only in `sample()`. Left out of the
# digest, or two identical runs would never compare equal.
UNSEEDED = {"river.proba.gaussian.Gaussian": "_rng"}
NO_WEIGHTS = "no sample weights"   # what a learner logs when built if its model cannot take feedback weights


def make_stream(task: str, n: int = 120, seed: int = 0, model: str = "m") -> list[Example]:
    """`n` labeled examples in event-time order: three numeric features, a linear concept with noise.

    Event times advance by 0.25 s with a 10 s lull after every 40 examples, so that learners that queue
    micro-batches also learn partial ones (by event time, before an example too late for them).
    """
    rng, out, ts = random.Random(seed), [], 1000.0
    if task == "generation":
        return _conversations(n, rng, model, seed)
    for i in range(n):
        x = {f"x{j}": round(rng.gauss(0.0, 1.0), 6) for j in range(3)}
        signal = x["x0"] - 0.5 * x["x1"] + rng.gauss(0.0, 0.3)
        label: Any = signal > 0 if task == "classification" else round(2.0 * signal + 1.0, 6)
        ts += 10.0 if i and i % 40 == 0 else 0.25
        out.append(Example(f"{model}-{seed}-{i}", model, x, label, 1.0, ts, ts))
    return out


def _conversations(n: int, rng: random.Random, model: str, seed: int) -> list[Example]:
    """A language model's stream: questions about a few made-up items, rated answers and corrections."""
    out, ts = [], 1000.0
    for i in range(n):
        item = rng.randrange(6)
        code = f"{(item * 37) % 100:02d}"
        answer = code if rng.random() < 0.7 else f"{rng.randrange(100):02d}"
        correction = None if answer == code or rng.random() < 0.3 else code
        rating = 1 if correction is None else -1
        text = Exchange([Turn("user", f"Code of item {item}?")], answer, rating, correction)
        ts += 10.0 if i and i % 40 == 0 else 0.25
        out.append(Example(f"{model}-{seed}-{i}", model, {}, text.target or "", 1.0, ts, ts, text=text))
    return out


# --- what two learners that learned alike must share ----------------------------------------------------------

@dataclass(frozen=True)
class Fingerprint:
    """What must match between two learners that learned the same thing: counters, scores, predictions, state."""

    counts: tuple            # learned, errors, errors by class, examples scored
    scores: dict             # `scores.values()`, compared within SCORE_TOLERANCE unless exact (accuracy: exact)
    predictions: tuple       # repr of each probe's predicted label (regression: value)
    state: str               # `state_digest`


def fingerprint(learner: Learner, probes: list[Example]) -> Fingerprint:
    ev = learner.evaluation
    counts = (ev.learned, ev.errors, tuple(sorted(ev.error_counts.items())), ev.scores.count)
    return Fingerprint(counts, ev.scores.values(), tuple(map(repr, _predicted(learner, probes))),
                       state_digest(learner))


def _predicted(learner: Learner, examples: list[Example]) -> list:
    return learner.predict_many([ex.features for ex in examples])


def assert_same(a: Fingerprint, b: Fingerprint, what: str, exact: bool = False) -> None:
    """Raises unless `a` and `b` match (scores within SCORE_TOLERANCE unless `exact`); `what` names the case."""
    assert a.counts == b.counts, f"{what}: counters differ: {a.counts} != {b.counts}"
    assert a.predictions == b.predictions, f"{what}: predictions differ"
    assert a.state == b.state, f"{what}: the learned state differs"
    for name, value in a.scores.items():
        other = b.scores[name]
        same = (value == other or (math.isnan(value) and math.isnan(other)) if exact or name.startswith("accuracy")
                else math.isclose(value, other, rel_tol=SCORE_TOLERANCE, abs_tol=1e-12)
                or (math.isnan(value) and math.isnan(other)))
        assert same, f"{what}: score {name} differs: {value!r} != {other!r}"


def state_digest(learner: Learner) -> str:
    """SHA-256 of what the learner has learned: its snapshot's state (less scores and wall-clock histograms) and
    tensors, taken by value: dicts and sets in sorted order, so that equal states digest alike however built."""
    snapshot = learner.snapshot()
    state = {k: v for k, v in pickle.loads(snapshot.state).items() if k not in WALL_CLOCK and k != "scores"}
    return _Digest().of({"state": state, "tensors": dict(snapshot.tensors)}).hex()


class _Digest:
    """A hash of an object graph by value (objects through their pickle reduction); cycles hash as their depth."""

    def __init__(self) -> None:
        self._stack: dict[int, int] = {}

    def of(self, obj: Any) -> bytes:
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return _hash(type(obj).__name__, repr(obj))
        if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
            return _hash("name", f"{getattr(obj, '__module__', '')}.{obj.__qualname__}")
        if id(obj) in self._stack:
            return _hash("cycle", str(self._stack[id(obj)]))
        self._stack[id(obj)] = len(self._stack)
        try:
            return self._inside(obj)
        finally:
            del self._stack[id(obj)]

    def _inside(self, obj: Any) -> bytes:
        if isinstance(obj, np.ndarray):
            return _hash("array", str(obj.dtype), str(obj.shape), np.ascontiguousarray(obj).tobytes())
        if isinstance(obj, dict):
            items = sorted(self.of(k) + self.of(v) for k, v in obj.items())
            return _hash(type(obj).__name__, *items)
        if isinstance(obj, (set, frozenset)):
            return _hash("set", *sorted(map(self.of, obj)))
        if isinstance(obj, (list, tuple)):
            return _hash(type(obj).__name__, *map(self.of, obj))
        if hasattr(obj, "detach") and hasattr(obj, "numpy"):   # a torch tensor, as the array it holds
            return self._inside(obj.detach().cpu().numpy())
        return self._reduced(obj)

    def _reduced(self, obj: Any) -> bytes:
        reduced = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        if isinstance(reduced, str):   # a global (a singleton)
            return _hash("global", reduced)
        func, args, state, items, pairs = (*reduced, None, None, None)[:5]
        if func is copyreg.__newobj__ and args:   # the usual object: its class and its state
            func, args = args[0], args[1:]
        unseeded = UNSEEDED.get(f"{type(obj).__module__}.{type(obj).__qualname__}")
        if unseeded and isinstance(state, dict) and state.get("seed", 0) is None:
            state = {k: v for k, v in state.items() if k != unseeded}
        parts = [self.of(func), self.of(args), self.of(state)]
        parts.append(self.of(list(items)) if items is not None else b"")
        parts.append(self.of(dict(pairs)) if pairs is not None else b"")
        return _hash("object", *parts)


def _hash(*parts: Any) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


def _feed(learner: Learner, examples: list[Example], piece: int) -> None:
    """Learns `examples` in pieces of `piece` (as the intake's batches would come), without flushing."""
    for start in range(0, len(examples), piece):
        learner.learn_batch(examples[start:start + piece], now=NOW)


def _learned(factory: Factory, examples: list[Example], piece: int = 7) -> Learner:
    """A fresh learner that learned `examples` to the end of the input (flushed)."""
    learner = factory()
    _feed(learner, examples, piece)
    learner.flush(now=NOW)
    return learner


def _probes(stream: list[Example]) -> list[Example]:
    """Examples to predict on when comparing learners: every sixth of the stream."""
    return stream[::6]


# --- the checks ----------------------------------------------------------------------------------------------

def check_batch_boundaries(factory: Factory, stream: list[Example]) -> None:
    """How the intake cuts the stream (pieces of 1, of 7, all at once) changes nothing learned or scored.

    Condition for learners that queue micro-batches (torch, River "many"): they are compared at the same example
    count, not at micro-batch multiples, because only the sequence of examples decides their micro-batches (by
    count and event time) and the queue is part of the state compared; what waits in the queue is not scored
    yet in any of them. River "one" has no condition. Scores agree within SCORE_TOLERANCE (accuracy exactly):
    a sum of log losses depends on how it was grouped.
    """
    probes, middle = _probes(stream), 7 * (len(stream) // 14)   # a boundary of every cutting
    runs = {}
    for piece in (*PIECES, len(stream)):
        learner = factory()
        _feed(learner, stream[:middle], piece)
        at_middle = fingerprint(learner, probes)
        _feed(learner, stream[middle:], piece)
        learner.flush(now=NOW)
        runs[piece] = (at_middle, fingerprint(learner, probes))
    whole = _learned(factory, stream, len(stream))   # truly all at once
    first = runs[PIECES[0]]
    for piece, (at_middle, at_end) in runs.items():
        assert_same(first[0], at_middle, f"pieces of {piece} vs 1, after {middle} examples")
        assert_same(first[1], at_end, f"pieces of {piece} vs 1, at the end")
    assert_same(first[1], fingerprint(whole, probes), "all at once vs pieces of 1, at the end")


def check_knowing_nothing_scores_a_miss(factory: Factory, stream: list[Example]) -> None:
    """The first example is scored by a model that knows nothing: a miss, whatever the mode.

    Classification (and a language model's answer): accuracy 0 (an empty or uniform proba, or a class never seen,
    is no hit), and the true label had at most even odds. Regression: the error is at least half the target (100 here): scored before learning.
    """
    first = stream[0]
    if not isinstance(first.label, bool) and first.text is None:
        first = msgspec.structs.replace(first, label=100.0)
    learner = factory()
    learner.learn_batch([first], now=NOW)
    learner.flush(now=NOW)
    ev = learner.evaluation
    assert (ev.learned, ev.errors, ev.scores.count) == (1, 0, 1), \
        f"one example: learned {ev.learned}, refused {ev.errors}, scored {ev.scores.count}"
    if learner.task in ("classification", "generation"):   # a language model: its whole answer right, its odds
        assert ev.scores.value("accuracy", rolling=False) == 0.0, "a model that knows nothing scored a hit"
        assert ev.scores.value("log_loss", rolling=False) >= math.log(2) - 1e-9, \
            "a model that knows nothing gave the true label more than even odds"
    else:
        assert ev.scores.value("mae", rolling=False) >= 50.0, "a model that knows nothing predicted the target"


def check_weights_honoured_or_announced(factory: Factory, stream: list[Example]) -> None:
    """Feedback weights change what is learned, or the learner said when built that its model takes none.

    A learner cannot know when built whether the feedback will carry weights, so one whose model takes none is
    not refused: it logs it once, at build (`NO_WEIGHTS`), in every mode alike. Either way, never silently.
    """
    weighted = [msgspec.structs.replace(ex, weight=WEIGHT) if i % 3 == 0 else ex for i, ex in enumerate(stream)]
    announced, plain = _built_with_log(factory)
    _feed(plain, stream, 7)
    plain.flush(now=NOW)
    heavy = _learned(factory, weighted)
    honoured = state_digest(plain) != state_digest(heavy)
    says = any(NO_WEIGHTS in line for line in announced)
    assert honoured != says, ("weights are ignored and the learner did not say so when built" if not honoured
                              else "the learner said it ignores weights, but they changed what it learned")
    assert heavy.evaluation.learned == plain.evaluation.learned == len(stream), "weighted examples were not all learned"


def _built_with_log(factory: Factory) -> tuple[list[str], Learner]:
    """A learner from `factory`, and what it logged (INFO and above) while it was built."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("streamlearn"), Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return lines, factory()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_snapshot_restore_continues(factory: Factory, stream: list[Example]) -> None:
    """A learner restored from a snapshot (the real path: pack, write, verify, load) goes on as if never stopped.

    Stopped after a count that leaves a partial micro-batch queued (for learners that queue one).
    """
    probes, at = _probes(stream), len(stream) // 2 + 3
    straight = _learned(factory, stream)
    first = factory()
    _feed(first, stream[:at], 7)
    restored = _through_snapshot(first, factory)
    assert_same(fingerprint(first, probes), fingerprint(restored, probes), "restored vs before the snapshot",
                exact=True)
    del first
    _feed(restored, stream[at:], 7)
    restored.flush(now=NOW)
    assert_same(fingerprint(straight, probes), fingerprint(restored, probes), "restored vs never stopped")


def _through_snapshot(learner: Learner, factory: Factory) -> Learner:
    """A fresh learner given `learner`'s state through the service's snapshot path (files on disk, verified)."""
    # Imported here: the checkpoints package reads the learners package, not the other way round.
    from streamlearn.checkpoints.content import ServiceFigures, pack, unpack
    from streamlearn.checkpoints.store import SnapshotStore

    name = learner.name
    files = pack({name: learner.snapshot()}, b"", ServiceFigures(learner.evaluation.learned, 0.0))
    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(root)
        content = unpack(store.load(store.write(files, {}, "checks").seq))
    fresh = factory()
    fresh.restore(content.learners[name])
    return fresh


def check_snapshot_pickles_no_torch(factory: Factory, stream: list[Example]) -> None:
    """What is pickled is the state the snapshot path packs, and it holds no torch object: torch weights,
    optimizer moments and generators go to `tensors.safetensors` as plain arrays; and a snapshot whose pickle
    was altered on disk is refused before anything in it is unpickled."""
    from streamlearn.checkpoints.content import LEARNERS, TENSORS, ServiceFigures, pack
    from streamlearn.checkpoints.store import SnapshotError, SnapshotStore

    learner = factory()
    _feed(learner, stream[:len(stream) // 2 + 3], 7)
    name, snapshot = learner.name, learner.snapshot()
    tensors = snapshot.tensors
    assert all(isinstance(a, np.ndarray) for a in tensors.values()), "a snapshot's tensors must be numpy arrays"
    files = pack({name: snapshot}, b"", ServiceFigures(learner.evaluation.learned, 0.0))
    pickled = _pickled_modules(files[LEARNERS]) | _pickled_modules(snapshot.state)
    torch_classes = sorted(m for m in pickled if m.split(".")[0] == "torch")
    assert not torch_classes, f"the learner's pickled state holds torch objects ({', '.join(torch_classes)})"
    assert (TENSORS in files) == bool(tensors), "the learner's tensors must be in tensors.safetensors"
    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(root)
        seq = store.write(files, {}, "checks").seq
        path = next(p for p in store.root.rglob(LEARNERS))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            store.load(seq)
        except SnapshotError:
            return
        raise AssertionError("a snapshot whose learners.pkl was altered was loaded")


def check_snapshot_immutable(factory: Factory, stream: list[Example]) -> None:
    """A snapshot does not change as the learner goes on learning, and its arrays cannot be written to; restored,
    it gives the learner as it was when taken."""
    probes, at = _probes(stream), len(stream) // 2 + 3
    learner = factory()
    _feed(learner, stream[:at], 7)
    snapshot, then = learner.snapshot(), fingerprint(learner, probes)
    copy = (snapshot.state, {k: v.copy() for k, v in snapshot.tensors.items()})
    _feed(learner, stream[at:], 7)
    learner.flush(now=NOW)
    assert snapshot.state == copy[0], "the snapshot's state changed as the learner went on"
    assert all(v.tobytes() == copy[1][k].tobytes() for k, v in snapshot.tensors.items()), \
        "the snapshot's arrays changed as the learner went on"
    assert not any(a.flags.writeable for a in snapshot.tensors.values()), "a snapshot's arrays must be read-only"
    fresh = factory()
    fresh.restore(snapshot)
    assert_same(then, fingerprint(fresh, probes), "restored from a snapshot taken before more was learned",
                exact=True)


def _pickled_modules(data: bytes) -> set[str]:
    """The modules of every class and function a pickle (made here, so trusted) refers to."""
    import io

    modules: set[str] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            modules.add(module)
            return super().find_class(module, name)

    Recording(io.BytesIO(data)).load()
    return modules


def check_probes_learn_nothing(factory: Factory, stream: list[Example]) -> None:
    """Scoring probes and predicting change nothing: the state, scores and counters stay, and the learner then
    learns on exactly as one that was never probed (no random draw, no scaling statistic taken)."""
    probes, half = _probes(stream), len(stream) // 2 + 3
    probed, untouched = factory(), factory()
    for learner in (probed, untouched):
        _feed(learner, stream[:half], 7)
    before = fingerprint(probed, probes)
    for _ in range(2):
        accuracy = probed.evaluation.probe_accuracy(probes)
        assert 0.0 <= accuracy <= 1.0, f"probe accuracy {accuracy}"
        _predicted(probed, stream[half:half + 10])
    assert_same(before, fingerprint(probed, probes), "after scoring probes", exact=True)
    for learner in (probed, untouched):
        _feed(learner, stream[half:], 7)
        learner.flush(now=NOW)
    assert_same(fingerprint(untouched, probes), fingerprint(probed, probes), "probed vs never probed", exact=True)


def check_fixed_seed_identical(factory: Factory, stream: list[Example]) -> None:
    """Two learners built with the same seed and fed the same stream are identical, scores to the last bit."""
    probes = _probes(stream)
    assert_same(fingerprint(_learned(factory, stream), probes), fingerprint(_learned(factory, stream), probes),
                "two runs with one seed", exact=True)


def bad_examples(task: str, at: Example) -> list[Example]:
    """Examples a learner must survive: a string where a number is expected, a NaN, a missing feature
    (for regression, a target that is no number, or not finite; for a language model, no conversation, or one
    too long to learn)."""
    x, replace = at.features, msgspec.structs.replace
    bad = [replace(at, id="bad-string", features={**x, "x0": "oops"}),
           replace(at, id="bad-nan", features={**x, "x1": float("nan")}),
           replace(at, id="bad-missing", features={k: v for k, v in x.items() if k != "x2"})]
    if task == "regression":
        bad += [replace(at, id="bad-label", label="n/a"), replace(at, id="bad-inf", label=float("inf"))]
    if task == "generation":   # no conversation at all, and one far too long to learn
        long = Exchange(at.text.messages, "x" * 100_000, correction="y" * 100_000)
        bad = [replace(at, id="bad-no-text", text=None), replace(at, id="bad-too-long", text=long)]
    return bad


def check_bad_examples_do_not_kill(factory: Factory, stream: list[Example]) -> None:
    """Bad examples are learned or refused (counted, kept for the dead letters), never fatal, and learning goes
    on: every clean example after them is learned, and the model still predicts sound values."""
    learner, at = factory(), len(stream) // 2
    bad = bad_examples(learner.task, stream[at - 1])
    head = [*stream[:at], *bad]
    _feed(learner, head, 7)
    learner.flush(now=NOW)   # ends the micro-batch the bad ones are in (learners that queue one)
    ev = learner.evaluation
    assert ev.learned + ev.errors == len(head), "an example was neither learned nor refused"
    rejected = ev.take_rejected()
    assert len(rejected) == ev.errors == sum(ev.error_counts.values()), \
        "every refused example is counted once and kept for the dead letters"
    if learner.task == "regression":
        refused = {r.example.id for r in rejected}
        assert {"bad-label", "bad-inf"} <= refused, "a target that is no finite number was learned"
    learned, errors = ev.learned, ev.errors
    tail = stream[at:]
    _feed(learner, tail, 7)
    learner.flush(now=NOW)
    later = ev.take_rejected()
    assert not [r.example.id for r in later if not r.example.id.startswith("bad-")
                and r.example.id in {ex.id for ex in tail}], "clean examples after the bad ones were refused"
    assert (ev.learned - learned) + (ev.errors - errors) == len(tail), "tail examples went missing"
    _assert_sound(learner, stream)


def _assert_sound(learner: Learner, stream: list[Example]) -> None:
    """The learner predicts a label of the stream (classification) or a finite value for each probe."""
    if learner.task == "generation":   # it predicts no labels: its weights, as the snapshot holds them, are finite
        arrays = learner.snapshot().tensors.values()
        assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), "non-finite weights"
        return
    predicted = _predicted(learner, _probes(stream))
    if learner.task == "classification":
        labels = {ex.label for ex in stream}
        assert all(p in labels for p in predicted), f"unsound predictions: {sorted(set(map(repr, predicted)))}"
    else:
        assert all(p is not None and math.isfinite(p) for p in predicted), "non-finite predictions"


CHECKS: tuple[Check, ...] = (check_batch_boundaries, check_knowing_nothing_scores_a_miss,
                             check_weights_honoured_or_announced, check_snapshot_restore_continues,
                             check_snapshot_pickles_no_torch, check_snapshot_immutable, check_probes_learn_nothing,
                             check_fixed_seed_identical, check_bad_examples_do_not_kill)


def yield_checks() -> Iterator[Check]:
    """Every check, in order; each applies to every learner kind (conditions are stated inside each)."""
    yield from CHECKS


def check_learner(factory: Factory, stream: Optional[list[Example]] = None) -> None:
    """Runs every check on learners from `factory` (on `make_stream` of its task when no stream is given)."""
    stream = stream if stream is not None else make_stream(factory().task)
    for check in yield_checks():
        check(factory, stream)
