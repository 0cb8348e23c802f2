"""Test-then-train over a torch network: micro-batches mixed with replay, under online EWC.

Each arriving example is queued, to be scored by the network as it is before it
learns that example; every `train.batch_size` queued examples become a micro-batch,
mixed with replayed ones so that they make up `replay.ratio` of it, and the network
takes `train.steps_per_batch` gradient steps on it with the EWC penalty's gradient added. An update whose loss, gradient or resulting weights
are not finite is undone (weights and optimizer state) and counted.

Only the sequence of examples decides what is learned when, never the clock or
how the stream was cut into batches: a partial micro-batch is learned when an
example arrives more than `train.max_wait` seconds of event time after the oldest
queued one (before that example), or at the end of the input (`flush`); the
consolidation trigger counts event time too. So a replayed stream gives the same
weights on every run, and a learner restored from a snapshot (its queue included)
continues exactly as an uninterrupted one.

Classes are learned as they appear (class-incremental): the output layer has
`train.max_classes` units, and only those of the classes seen so far take part
in the loss and the prediction.

>>> from streamlearn.config import ModelConfig
>>> from streamlearn.records import Example
>>> config = ModelConfig(model="mlp", params={"hidden": [16]})
>>> learner = TorchLearner("digits", config, seed=1)
>>> batch = [Example(f"r-{i}", "digits", {"x": float(i % 2)}, i % 2, 1.0, i / 100, i / 100) for i in range(2000)]
>>> learner.learn_batch(batch, now=3000.0); learner.flush()   # the last, partial micro-batch too
>>> learner.evaluation.learned, learner.evaluation.scores.value("accuracy", rolling=True) > 0.9
(2000, True)
"""

from __future__ import annotations

import math
import pickle
import time
from operator import attrgetter
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from streamlearn.config import DriftConfig, EvalConfig, ModelConfig
from streamlearn.learners.averaging import Averaging
from streamlearn.learners.base import LearnerBase
from streamlearn.learners.contract import TORCH_ENCODING, TORCH_WEIGHTS, ExportedModel, LearnerMetrics
from streamlearn.learners.drift import DriftMark
from streamlearn.learners.drift_policy import Judged, Transition
from streamlearn.learners.encoder import SAMPLE_ROWS, FeatureEncoder, RunningMoments, beyond_sample, far_from
from streamlearn.learners.ewc import OnlineEWC
from streamlearn.learners import losses
from streamlearn.learners.flat import FlatParameters
from streamlearn.learners.models import ModelError
from streamlearn.learners.networks import build_network
from streamlearn.learners.torch_averaging import torch_learner_parameters
from streamlearn.records import Example, Features
from streamlearn.replay.class_balanced import ClassBalancedBuffer
from streamlearn.replay.reservoir import ReservoirBuffer
from streamlearn.replay.store import Logits, ReplayBuffer
from streamlearn.replay.time_decayed import TimeDecayedBuffer
from streamlearn.triggers import Trigger

STOCHASTIC = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
FEATURES, LABEL, WEIGHT = attrgetter("features"), attrgetter("label"), attrgetter("weight")
TIMES = (attrgetter("ts"), attrgetter("label_ts"), attrgetter("consumed"))   # the Queue's float columns
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
Stored = tuple[torch.Tensor, torch.Tensor]   # replayed rows' outputs as stored, and the classes known then


class Reference(NamedTuple):
    """A copy the drift policy judges a case against: weights, classes known, input scaling (None: not kept),
    and, for the open case's, a sample of the inputs from before it (raw rows of the replay buffer)."""

    weights: torch.Tensor
    classes: int
    scaling: Optional[np.ndarray]
    inputs: Optional[np.ndarray] = None


class Queue:
    """Examples waiting for their micro-batch, as encoded columns.

    Columns: raw rows, targets, weights, event times, label times, consumed times (wall time read), and `known`: the
    classes known when each arrived. The first `scored` rows were scored already; the others are scored
    by the training pass that learns them (the network does not change while they wait).
    """

    def __init__(self, width: int) -> None:
        self.columns: tuple[np.ndarray, ...] = (np.zeros((0, width), dtype=np.float32), np.zeros(0, np.float32),
                                                np.zeros(0, np.float32), np.zeros(0), np.zeros(0), np.zeros(0),
                                                np.zeros(0, np.int64))
        self.scored = 0

    def __len__(self) -> int:
        return len(self.columns[1])

    @property
    def oldest(self) -> float:
        """Event time of the first queued example (the queue is not empty)."""
        return float(self.columns[3][0])

    def push(self, columns: tuple[np.ndarray, ...]) -> None:
        """Appends rows given as columns (in the order above), not scored yet."""
        if not len(self):
            self.columns = columns
        else:
            self.columns = tuple(np.concatenate([old, new]) for old, new in zip(self.columns, columns))

    def pop(self, n: int) -> tuple[tuple[np.ndarray, ...], int]:
        """The first `n` rows' columns, and how many of them were scored already."""
        columns, scored = self.columns, min(n, self.scored)
        self.columns = tuple(a[n:] for a in columns)
        self.scored -= scored
        return tuple(a[:n] for a in columns), scored


class TorchLearner(LearnerBase):
    """One named torch network with its encoder, optimizer, replay buffer and EWC state; its evaluation composed."""

    kind = "torch"   # the artifact format (deploy/model_files.py) and the learner kind, declared
    OWN_STATE = ("encoder", "targets", "classes", "queue", "rolled_back", "consolidation", "_reference_due")

    def __init__(self, name: str, config: ModelConfig, seed: int = 42, *, drift: Optional[DriftConfig] = None,
                 evaluation: Optional[EvalConfig] = None, threads: int = 0) -> None:
        super().__init__(name, config, seed, drift=drift, evaluation=evaluation)
        if threads:
            torch.set_num_threads(threads)   # process-wide: the service passes its one torch_threads setting
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        e = config.encoder
        self.encoder = FeatureEncoder(e.numeric_slots, e.string_slots, e.hash_buckets)
        self.targets = RunningMoments(1)                 # regression targets are learned standardized
        self.classes: list = []                          # label of each output unit, in order of appearance
        outputs = config.train.max_classes if config.task == "classification" else 1
        self.net = build_network(config.model, self.encoder.width, outputs, dict(config.params), self.generator)
        self.flat = FlatParameters(self.net)
        t = config.train
        self.optimizer = OPTIMIZERS[t.optimizer]([self.flat.param], lr=t.lr, weight_decay=t.weight_decay)
        self.ewc = OnlineEWC(self.flat.param.numel(), config.ewc.lam, config.ewc.gamma)
        self.replay = _replay_buffer(config, self.encoder.width, seed)
        self.queue = Queue(self.encoder.width)
        self.rolled_back = 0
        # Its clock is event time and starts with the first micro-batch (`_consolidation_due`).
        self.consolidation = Trigger("consolidate", config.ewc.consolidate, 0.0)
        self._class_index: dict = {}
        # The drift policy's references: weights and classes known, copied every `reference_every` examples (the
        # older of the two judges a case), and the one the open case is judged against.
        self._references: list[Reference] = []
        self._reference: Optional[Reference] = None
        self._reference_due = self.evaluation.policy.config.reference_every
        self._names = [name for name, p in self.net.named_parameters() if p.requires_grad]
        self._good: list[torch.Tensor] = []      # the last good weights and optimizer state ...
        self._guarded: list[torch.Tensor] = []   # ... of these tensors
        # Dropout and batch norm behave differently in training: only then switch modes and random streams.
        self._stochastic = any(isinstance(m, STOCHASTIC) for m in self.net.modules())
        # Scoring from the training forward pass needs the same output in both modes (and, for regression,
        # target statistics as of before the batch): classification with a deterministic network.
        self._one_pass = self.task == "classification" and not self._stochastic

    # --- test, then queue --------------------------------------------------------------------------------

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        now = time.time() if now is None else now   # wall time: latency metrics only
        y, known = self._targets(examples)
        keep = ~np.isnan(y)
        if not keep.all():
            examples, y, known = [ex for ex, k in zip(examples, keep) if k], y[keep], known[keep]
        if not examples:
            return
        n = len(examples)
        raw = self.encoder.vectorize(list(map(FEATURES, examples)))
        w = np.fromiter(map(WEIGHT, examples), np.float32, n)
        columns = (raw, y, w, *(np.fromiter(map(get, examples), float, n) for get in TIMES), known)
        ts, size = columns[3], self.config.train.batch_size
        start = 0
        while start < n:
            if len(self.queue) and self._too_late(ts[start]):   # the partial micro-batch waited long enough
                self._learn_queued(len(self.queue), now)
            part = slice(start, self._part_end(ts, start, n, size))
            self.queue.push(tuple(c[part] for c in columns))
            if len(self.queue) >= size:
                self._learn_queued(size, now)
            start = part.stop

    def _too_late(self, ts: float) -> bool:
        """Whether an example at event time `ts` comes more than `train.max_wait` after the oldest queued one."""
        return ts - self.queue.oldest > self.config.train.max_wait

    def _part_end(self, ts: np.ndarray, start: int, n: int, size: int) -> int:
        """Where the rows from `start` that join the queue end: it is full, or the next one is too late for it."""
        end = min(n, start + size - len(self.queue))
        oldest = self.queue.oldest if len(self.queue) else ts[start]
        late = np.flatnonzero(ts[start:end] - oldest > self.config.train.max_wait)
        return start + int(late[0]) if len(late) else end

    def _settle(self) -> None:
        """Scores the queued examples that wait for their training pass (for a score read mid-batch)."""
        unscored = slice(self.queue.scored, None)
        if len(self.queue) > self.queue.scored:
            raw, y, ts, known = (self.queue.columns[i][unscored] for i in (0, 1, 3, 6))
            self._score(self._forward(raw), y, known, ts, raw)
            self.queue.scored = len(self.queue)

    def _forward(self, raw: np.ndarray) -> torch.Tensor:
        """The network's output for raw rows, in eval mode (no dropout), without gradients."""
        with torch.no_grad():
            if self._stochastic:
                self.net.eval()
            out = self.net(torch.from_numpy(self.encoder.scale(raw)))
            if self._stochastic:
                self.net.train()
        return out

    def _targets(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        """Class indices (a new class gets the next unit) or numeric targets, NaN for one that cannot be
        learned; and how many classes were known before each example (what it can be scored against)."""
        if self.task == "classification":
            index = list(map(self._class_index.get, map(LABEL, examples)))
            if None not in index:   # the usual case: no new class in this batch
                return np.array(index, dtype=np.float32), np.full(len(examples), len(self.classes))
        y = np.empty(len(examples), dtype=np.float32)
        before = np.empty(len(examples), dtype=np.int64)
        for i, ex in enumerate(examples):
            before[i] = len(self.classes)
            try:
                y[i] = self._class_of(ex.label) if self.task == "classification" else _finite_target(ex.label)
            except (ModelError, TypeError, ValueError) as err:
                self.evaluation.count_error(ex, err)
                y[i] = np.nan
        return y, before

    def _class_of(self, label) -> int:
        index = self._class_index.get(label)
        if index is None:
            if len(self.classes) >= self.config.train.max_classes:
                raise ModelError(f"label {label!r} would be class {len(self.classes) + 1} of "
                                 f"train.max_classes = {self.config.train.max_classes}")
            index = self._class_index[label] = len(self.classes)
            self.classes.append(label)
        return index

    def _score(self, out: torch.Tensor, y: np.ndarray, known: np.ndarray, ts: np.ndarray, raw: np.ndarray) -> None:
        """Prequential scores of rows; row i is scored over the `known[i]` classes seen before it.

        `ts`: the rows' event times, which date a drift detected among them (`on_drift`); `raw`: the rows, which
        an open drift case judges against its reference weights.
        """
        if self.task == "regression":
            guess = out[:, 0].double().numpy() * self.targets.std()[0] + self.targets.mean[0]
            self._scored_regression(y.astype(float), guess, ts)
            return
        n, top = len(y), int(known[-1])   # classes only ever grow: the last row knows the most
        if top == 0:  # knows no class yet: every guess is a miss
            self._scored_classification(np.zeros(n, dtype=bool), np.zeros(n), ts)
            self._judge_scored(y.astype(np.int64).tolist(), ts, lambda i: self._judged(raw[i:], y[i:]))
            return
        logits = out[:, :top]
        if known[0] < top:  # a class first seen within these rows
            logits = logits.masked_fill(torch.from_numpy(np.arange(top)[None, :] >= known[:, None]), float("-inf"))
        proba = torch.softmax(logits, dim=1).numpy()   # a row that knows no class: NaN, a miss below
        classes = y.astype(np.intp)
        seen = classes < known
        p_true = proba[np.arange(n), np.minimum(classes, top - 1)]
        p_true[~seen] = 0.0
        with np.errstate(invalid="ignore"):
            correct = seen & (p_true >= proba.max(axis=1)) & (p_true * known > 1.0)
        self._scored_classification(correct, p_true, ts)
        self._judge_scored(classes.tolist(), ts, lambda i: self._judged(raw[i:], y[i:]))

    def predict_many(self, rows: list[Features]) -> list:
        """The most likely label of each feature dict (regression: the value); learns nothing."""
        out = self._forward(self.encoder.vectorize(rows, grow=False))
        if self.task == "regression":
            return (out[:, 0].double().numpy() * self.targets.std()[0] + self.targets.mean[0]).tolist()
        if not self.classes:
            return [None] * len(rows)
        return [self.classes[i] for i in out[:, :len(self.classes)].argmax(dim=1).tolist()]

    # --- train ---------------------------------------------------------------------------------------------

    def flush(self, now: Optional[float] = None) -> None:
        if len(self.queue):
            self._learn_queued(len(self.queue), time.time() if now is None else now)

    def _learn_queued(self, n: int, now: float) -> None:
        if not self._one_pass:   # scored in eval mode by the network they arrived to, which has not changed
            self._settle()
        columns, scored = self.queue.pop(n)
        self._train(*columns, scored, now)

    def _train(self, raw, y, w, ts, label_ts, consumed, known, scored: int, now: float) -> None:
        """Steps on the micro-batch mixed with replay, scoring in its first pass the rows after the first
        `scored` (by `settle`)."""
        started = time.perf_counter()
        if self.task == "regression":
            self.targets.update(y.reshape(-1, 1).astype(np.float64))
        self._set_lr()
        x_all, y_all, w_all, rows = self._mixed_rows(raw, y, w)
        stored = self._stored_logits(rows)
        xs = torch.from_numpy(self.encoder.scale(x_all))   # scaled as it was scored: statistics learn after
        ys = torch.from_numpy(y_all)
        if self.task == "regression":
            ys = torch.from_numpy(self.targets.standardize(y_all.reshape(-1, 1))[:, 0])
        if self.task == "classification":
            ys = ys.long()
        ws = None if (w_all == 1.0).all() else torch.from_numpy(w_all)   # feedback weights, when any differ
        for step in range(self.config.train.steps_per_batch):
            out = self._step(xs, ys, ws, incoming=len(y), stored=stored)
            if step == 0 and scored < len(y):
                self._score(out[scored:len(y)], y[scored:], known[scored:], ts[scored:], raw[scored:])
        self.encoder.learn(raw)
        if self.replay is not None:
            self.replay.add(raw, y, ts, self._logits_to_keep(out[:len(y)]))
        self.evaluation.learned += len(y)
        if self._consolidation_due(ts) and not self._holding_ewc():
            self.consolidate()
        self._keep_reference()
        self.evaluation.observe_update(time.perf_counter() - started, label_ts, consumed, now)

    def _consolidation_due(self, ts: np.ndarray) -> bool:
        """The consolidation trigger's check after learning a micro-batch of event times `ts`.

        Its `every_seconds` counts event time from the first example learned, so that a replay decides alike.
        """
        evaluation = self.evaluation
        if evaluation.learned == len(ts) and not self.consolidation.fired:   # the first micro-batch: start the clock
            self.consolidation = Trigger("consolidate", self.config.ewc.consolidate, float(ts.min()),
                                         self.consolidation.state())
        return self.consolidation.check(evaluation.learned, float(ts.max()), score=lambda: evaluation.watched_score)

    def _mixed_rows(self, raw, y, w) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The new examples (first, as they came) plus replayed ones, `replay.ratio` of the whole; and the buffer
        rows replayed."""
        if self.replay is None:
            return raw, y, w, np.empty(0, dtype=np.int64)
        ratio = self.config.replay.ratio
        policy = self.evaluation.policy
        since = policy.case.ts if policy.suspected and policy.config.expire_replay else None   # the new concept's rows
        rows = self.replay.sample(int(round(len(y) * ratio / (1 - ratio))), since)
        store = self.replay.store
        return (np.concatenate([raw, store.x[rows]]), np.concatenate([y, store.y[rows]]),
                np.concatenate([w, np.ones(len(rows), dtype=np.float32)]), rows)

    def _stored_logits(self, rows: np.ndarray) -> Optional[Stored]:
        """With `train.distill`: the replayed rows' outputs as they were stored, and the classes known then."""
        if not self.config.train.distill or self.replay is None or not len(rows):
            return None
        store = self.replay.store
        return torch.from_numpy(store.logits[rows]), torch.from_numpy(store.known[rows])

    def _logits_to_keep(self, out: torch.Tensor) -> Optional[Logits]:
        """With `train.distill`: the incoming rows' outputs of the last step's forward pass, for the buffer; a row
        with a non-finite output keeps none (zero classes known: never a target)."""
        if not self.config.train.distill:
            return None
        values = out.numpy()
        finite = np.isfinite(values).all(axis=1)
        known = np.where(finite, len(self.classes), 0).astype(np.int64)
        return Logits(np.where(finite[:, None], values, 0.0).astype(np.float32), known)

    def _step(self, xs: torch.Tensor, ys: torch.Tensor, ws: Optional[torch.Tensor],
              incoming: Optional[int] = None, stored: Optional[Stored] = None) -> torch.Tensor:
        """One gradient step; undone (and counted) if the gradient or the new weights are not finite.

        A non-finite loss shows as a non-finite gradient, so the gradient check covers it. Returns the
        forward pass's output (before the step), detached.
        """
        self.flat.zero_grad()
        if self._stochastic:
            with torch.random.fork_rng(devices=[]):   # dropout draws from this learner's own generator
                torch.set_rng_state(self.generator.get_state())
                out = self.net(xs)
                self.generator.set_state(torch.get_rng_state())
        else:
            out = self.net(xs)
        self._loss(out, ys, ws, incoming, stored).backward()
        grad = self.flat.param.grad
        if not _finite(grad):
            self.rolled_back += 1
            return out.detach()
        self.ewc.observe(grad, len(ys))
        if not self._holding_ewc():
            self.ewc.penalty_grad(self.flat.param, grad)
        self._keep_good()
        self.optimizer.step()
        if not _finite(self.flat.param):
            self._roll_back()
        return out.detach()

    def _loss(self, out: torch.Tensor, ys: torch.Tensor, ws: Optional[torch.Tensor],
              incoming: Optional[int] = None, stored: Optional[Stored] = None) -> torch.Tensor:
        """Mean loss over the mixed batch, weighted by feedback weights when given; classes not seen yet left out.

        With ER-ACE (`train.loss`) the incoming rows (the first `incoming`; None: all) are scored against the classes
        present among them only, the replayed ones against every class seen. With `stored` (the replayed rows'
        outputs when they were stored, and the classes known then), `train.distill` times their squared distance
        to the replayed rows' outputs now is added (DER++).
        """
        if self.task == "classification":
            logits = out if len(self.classes) == out.shape[1] else out[:, :len(self.classes)]
            incoming = len(ys) if incoming is None else incoming
            if losses.uses_er_ace(self.config.train.loss, self.task, self.replay is not None):
                loss = losses.er_ace(logits, ys, incoming, ws)
            else:
                loss = losses.cross_entropy(logits, ys, ws)
            if stored is not None:
                loss = loss + self.config.train.distill * losses.logit_distance(out[incoming:], *stored)
            return loss
        if ws is None:
            return F.mse_loss(out[:, 0], ys)
        return ((out[:, 0] - ys) ** 2 * ws).sum() / ws.sum()

    def _on_drift(self, event: DriftMark) -> None:
        """Opens a policy case and consolidates, as without a policy; a detection within an open case does nothing
        (the weights by then may hold what the case is about)."""
        evaluation = self.evaluation
        if evaluation.policy.enabled and not self._open_case(event):
            return
        if self.consolidation.config.on_drift:   # what was learned before the change becomes what to keep
            # dated by the event time of the example it was detected at
            self.consolidation.fire("drift", evaluation.learned, evaluation.event_time(event))
            self.consolidate()

    # --- the drift policy's side -------------------------------------------------------------------------

    def _keep_reference(self) -> None:
        """Copies the weights every `reference_every` examples while no case is open; the last two are kept."""
        policy, learned = self.evaluation.policy, self.evaluation.learned
        if policy.enabled and policy.case is None and learned >= self._reference_due:
            self._references = [*self._references, self._reference_now()][-2:]
            self._reference_due = learned + policy.config.reference_every

    def _case_opened(self) -> None:
        """The case is judged against the older kept copy (from before the change), or the weights now."""
        reference = self._references[0] if self._references else self._reference_now()
        self._reference = reference._replace(inputs=self._input_sample())

    def _input_sample(self) -> Optional[np.ndarray]:
        """Up to `SAMPLE_ROWS` raw rows of the replay buffer, evenly spread (None without replay)."""
        if self.replay is None or self.replay.store.size == 0:
            return None
        size = self.replay.store.size
        return self.replay.store.x[np.linspace(0, size - 1, min(size, SAMPLE_ROWS)).astype(np.int64)].copy()

    def _reference_now(self) -> "Reference":
        return Reference(self.flat.param.detach().clone(), len(self.classes), self.encoder.scaling())

    def _judged(self, raw: np.ndarray, y: np.ndarray) -> Judged:
        """The reference weights' verdict on rows `raw` with class indices `y`.

        A row far outside the inputs the reference knew (`far_from` its scaling, or `beyond_sample` of the
        inputs from before the case: new ground, e.g. a new pixel permutation) is not held against it: its
        label is judged unknown, as a new class's would be.
        """
        weights, top, scaling, inputs = self._reference
        labels = y.astype(np.int64)
        if top == 0:
            none = np.zeros(len(labels), dtype=bool)
            return Judged(none, none, labels.tolist())
        params, offset = {}, 0
        for name, p in zip(self._names, self.flat._params):
            params[name] = weights[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        with torch.no_grad():
            if self._stochastic:
                self.net.eval()
            out = torch.func.functional_call(self.net, params, (torch.from_numpy(self.encoder.scale(raw)),))
            if self._stochastic:
                self.net.train()
        proba = torch.softmax(out[:, :top], dim=1)
        predicted = proba.argmax(dim=1).numpy()
        known = labels < top
        if scaling is not None:
            known &= ~far_from(raw, scaling)
        if inputs is not None:
            known &= ~beyond_sample(self.encoder.scale(raw), self.encoder.scale(inputs))
        return Judged(predicted == labels, known, labels.tolist())

    def _holding_ewc(self) -> bool:
        """No EWC penalty and no consolidation while a change is suspected or its learning rate is raised."""
        policy = self.evaluation.policy
        return policy.config.release_ewc and (policy.suspected or policy.boosted(self.evaluation.drift.position))

    def _set_lr(self) -> None:
        lr = self.config.train.lr
        policy = self.evaluation.policy
        if policy.boosted(self.evaluation.drift.position):
            lr *= policy.config.lr_boost
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _decided(self, decision: Transition) -> None:
        """Makes the network plastic on a suspected change, keeps that on a confirmed one, undoes it on a burst."""
        super()._decided(decision)
        policy = self.evaluation.policy
        cfg = policy.config
        act = lambda kind, action: policy.act(kind, action, decision.position, decision.ts)  # noqa: E731
        if decision.kind == "suspect":
            if cfg.release_ewc and self.ewc.active:
                act("change", "suspend_ewc")
            if cfg.expire_replay and self.replay is not None:
                act("change", "mask_replay")
            if cfg.reset_optimizer:
                self.optimizer.state.clear()
                self._good = []   # the optimizer makes new state tensors at its next step
                act("change", "reset_optimizer")
            if cfg.lr_boost > 1 and cfg.boost_examples:
                policy.boost_until = decision.position + cfg.boost_examples
                act("change", "raise_lr")
            return
        if decision.kind == "change":
            if cfg.release_ewc:
                self.ewc.release(self.flat.param)
                act("change", "release_ewc")
            if cfg.expire_replay and self.replay is not None:
                self.replay.expire(policy.last_change.ts)
                act("change", "expire_replay")
        elif decision.kind == "burst" and decision.suspected:
            # Back to the weights from before the burst (the reference), its learning rate, EWC penalty and replay.
            with torch.no_grad():
                self.flat.param.copy_(self._reference.weights)
            self.optimizer.state.clear()
            self._good = []
            policy.boost_until = 0
            act("burst", "restore")
        elif decision.kind == "new_classes" and self.consolidation.config.on_drift:
            act("new_classes", "consolidate")   # the consolidation at the detection stays
        self._reference, self._references = None, []   # the next case is judged against weights from after this one
        self._reference_due = self.evaluation.learned + cfg.reference_every

    def consolidate(self) -> None:
        """Makes the weights as they are now the EWC anchor (when `ewc.consolidate` fires, or when called)."""
        self.ewc.consolidate(self.flat.param)

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]

    def _keep_good(self) -> None:
        """Copies the weights and optimizer state into buffers kept for undoing the coming step."""
        if not self._good:  # the optimizer's state tensors exist after its first step, updated in place since
            self._guarded = [self.flat.param.data, *self._optimizer_tensors()]
            self._good = [t.clone() for t in self._guarded]
            return
        torch._foreach_copy_(self._good, self._guarded)

    def _roll_back(self) -> None:
        torch._foreach_copy_(self._guarded, self._good)
        self.rolled_back += 1

    # --- snapshot ------------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, np.ndarray]:
        """Weights, optimizer moments, EWC state, replay buffer, generators: arrays for safetensors (no pickle)."""
        arrays = {"flat": self.flat.param.detach().numpy(),
                  "rng": self.generator.get_state().numpy()}
        for key, value in self.optimizer.state_dict()["state"].get(0, {}).items():
            if torch.is_tensor(value):
                arrays[f"optimizer.{key}"] = value.detach().reshape(-1).numpy()
        arrays.update({k: v.numpy() for k, v in self.ewc.tensors().items()})
        if self.replay is not None:
            arrays.update(self.replay.arrays())
        arrays.update(self._reference_arrays())
        return arrays

    def _reference_arrays(self) -> dict[str, np.ndarray]:
        """The policy's reference weights: the kept copies, then the open case's (if any), with their class counts."""
        kept = [*self._references, *([self._reference] if self._reference is not None else [])]
        size = self.flat.param.numel()
        arrays = {"policy.references": (torch.stack([r.weights for r in kept]).numpy() if kept
                                        else np.zeros((0, size), dtype=np.float32)),
                  "policy.classes": np.array([r.classes for r in kept] + [int(self._reference is not None)],
                                             dtype=np.int64)}
        if all(r.scaling is not None for r in kept):   # none from a snapshot older than the input check
            arrays["policy.scalings"] = (np.stack([r.scaling for r in kept]) if kept
                                         else np.zeros((0, 2, self.encoder.numeric_slots), dtype=np.float32))
        if self._reference is not None and self._reference.inputs is not None:
            arrays["policy.case_inputs"] = self._reference.inputs
        return arrays

    def _restore_tensors(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            self.flat.param.copy_(torch.from_numpy(arrays["flat"]))
        self.generator.set_state(torch.from_numpy(arrays["rng"].copy()))
        moments = {k[len("optimizer."):]: torch.from_numpy(v.copy()) for k, v in arrays.items()
                   if k.startswith("optimizer.")}
        if moments:
            state = self.optimizer.state_dict()
            shapes = {k: v.reshape(self.flat.param.shape) if v.numel() == self.flat.param.numel() else v.reshape(())
                      for k, v in moments.items()}
            state["state"] = {0: shapes}
            self.optimizer.load_state_dict(state)
            self._good = []   # the optimizer holds new state tensors now
        self.ewc.load({k: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("ewc.")})
        if self.replay is not None:
            self.replay.load(arrays)
        self._load_references(arrays)

    def _load_references(self, arrays: dict[str, np.ndarray]) -> None:
        if "policy.references" not in arrays:   # a snapshot from before the drift policy
            self._references, self._reference = [], None
            return
        weights, classes = arrays["policy.references"], arrays["policy.classes"]
        scalings = arrays.get("policy.scalings")
        kept = [Reference(torch.from_numpy(weights[i].copy()), int(classes[i]),
                          scalings[i].copy() if scalings is not None else None) for i in range(len(weights))]
        inputs = arrays.get("policy.case_inputs")
        inputs = inputs.copy() if inputs is not None else None
        self._reference = kept.pop()._replace(inputs=inputs) if classes[-1] else None
        self._references = kept

    def _own_state(self) -> dict:
        return {name: getattr(self, name) for name in self.OWN_STATE}

    def _restore_own(self, state: dict) -> None:
        if "_reference_due" not in state:   # a snapshot from before the drift policy
            state = {**state, "_reference_due": state["learned"] + self.evaluation.policy.config.reference_every}
        for name in self.OWN_STATE:
            setattr(self, name, state[name])
        self._class_index = {label: i for i, label in enumerate(self.classes)}

    # --- what the rest of the code reads --------------------------------------------------------------------

    def export(self) -> ExportedModel:
        """`weights.safetensors` (the network's state dict, no pickle) and `encoding.pkl` (encoder, target
        scaling, class labels): the network alone, never the optimizer, replay or scores."""
        import safetensors.torch

        # The layers' weights are views of one flat tensor: copies, so that safetensors sees no shared memory.
        weights = {name: t.detach().clone().contiguous() for name, t in self.net.state_dict().items()}
        encoding = {"encoder": self.encoder, "targets": self.targets, "classes": list(self.classes)}
        return ExportedModel("torch", {TORCH_WEIGHTS: safetensors.torch.save(weights),
                                       TORCH_ENCODING: pickle.dumps(encoding, protocol=pickle.HIGHEST_PROTOCOL)})

    def parameters(self) -> Averaging:
        """The network's weights keyed by input column and class, and the encoder's and targets' statistics
        (`torch_averaging`), or why the network's weights cannot be keyed."""
        return torch_learner_parameters(self)

    def metrics(self) -> LearnerMetrics:
        replay = self.replay.store.size if self.replay is not None else None
        fired = tuple((self.consolidation.action, reason, n) for reason, n in self.consolidation.fired.items())
        return LearnerMetrics(self.evaluation.model_label, self.rolled_back, replay, fired,
                              {"rolled_back": self.rolled_back, "classes": len(self.classes),
                               "replay_size": replay or 0})


def exported_predictor(name: str, config: ModelConfig, files: dict[str, bytes]) -> tuple[torch.nn.Module, TorchLearner]:
    """An exported model's network, and a torch learner of its shape holding it and its encoding (for its
    `predict_many`).

    Only for files of a verified artifact (`encoding.pkl` is unpickled). Torch's threads are left as they are.
    """
    import safetensors.torch

    learner = TorchLearner(name, config, seed=0)
    learner.net.load_state_dict(safetensors.torch.load(files[TORCH_WEIGHTS]))
    encoding = pickle.loads(files[TORCH_ENCODING])
    learner.encoder, learner.targets, learner.classes = encoding["encoder"], encoding["targets"], encoding["classes"]
    learner.net.eval()
    return learner.net, learner


def _finite(t: torch.Tensor) -> bool:
    """False when any element is NaN or infinite (one reduction: NaN and inf survive a sum; so does overflow)."""
    return math.isfinite(float(t.detach().sum()))


def _replay_buffer(config: ModelConfig, width: int, seed: int) -> Optional[ReplayBuffer]:
    r = config.replay
    if r.kind == "none" or r.ratio == 0:
        return None
    if r.kind == "class_balanced" and config.task != "classification":
        raise ModelError("class_balanced replay needs a classification task", key="replay.kind")
    if r.kind == "time_decayed":
        return TimeDecayedBuffer(r.capacity, width, r.half_life, seed, logits=_logit_width(config))
    kind = ClassBalancedBuffer if r.kind == "class_balanced" else ReservoirBuffer
    return kind(r.capacity, width, seed, logits=_logit_width(config))


def _logit_width(config: ModelConfig) -> int:
    """Output units whose values a replay buffer keeps per row: all of them with `train.distill`, else none."""
    return config.train.max_classes if config.train.distill and config.task == "classification" else 0


def _finite_target(label) -> float:
    """A regression target: an infinite one would turn the running target statistics, and every prediction, NaN."""
    target = float(label)
    if target - target != 0.0:
        raise ValueError(f"label {label!r} is not a finite number")
    return target
