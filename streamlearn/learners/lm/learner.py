"""`LmLearner`: a language model that learns from rated and corrected answers, through LoRA adapters.

Each example is a served conversation with its feedback (`Example.text`). What
it teaches is its target: the correction, else the answer if it was rated good;
an answer rated bad without a correction teaches nothing (counted as
`nothing_to_learn`). Targets queue until `lm.batch_size` of them (or
`lm.token_budget` tokens, or `lm.max_wait` seconds of event time) are waiting;
then one step: the new conversations first, then replayed ones (`lm.replay_ratio`
of the step, drawn across topics) while the token budget lasts, gradients
accumulated over micro-batches of `lm.micro_batch`, the loss the mean over the
answers' tokens (`chat`: the prompt's tokens are never learned), optionally EWC's
penalty on the adapter weights. Test then train: each new conversation is scored
before the step that learns it (its whole answer predicted token by token, under
teacher forcing, counts as correct; the probability of the answer as the
likelihood), so the service's prequential accuracy and drift detection apply.

The base model stays frozen and out of the snapshot (its digest is checked on
restore); the adapters, AdamW's moments, EWC, the replay buffer and its
generator, and the queue are in it: a restored learner steps exactly as the
uninterrupted one would.

>>> from streamlearn.config import LmConfig, ModelConfig
>>> from streamlearn.records import Example, Exchange, Turn
>>> config = ModelConfig(kind="lm", lm=LmConfig(base="streamlearn.learners.lm.tiny:tiny_llama", batch_size=2))
>>> learner = LmLearner("assistant", config)
>>> talk = Exchange([Turn("user", "Colour of the sky?")], "Green.", rating=-1, correction="Blue.")
>>> learner.learn_batch([Example(f"r-{i}", "assistant", {}, "Blue.", 1.0, i, i, text=talk) for i in range(4)])
>>> learner.steps, learner.evaluation.learned, learner.tokens_learned > 0
(2, 4, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import msgspec
import numpy as np
import torch

from streamlearn.config import DriftConfig, EvalConfig, ModelConfig
from streamlearn.learners.averaging import Averaging
from streamlearn.learners.base import LearnerBase
from streamlearn.learners.contract import ExportedModel, LearnerMetrics
from streamlearn.learners.drift import finite_or_none
from streamlearn.learners.ewc import OnlineEWC
from streamlearn.learners.lm.base import load_base, with_adapters
from streamlearn.learners.lm.capabilities import load_conversations, score
from streamlearn.learners.lm.chat import IGNORE, Tokens, TooLong, collate, encode
from streamlearn.learners.lm.replay import TopicReplay
from streamlearn.learners.lm.topics import topic_of
from streamlearn.records import Example


@dataclass
class Pending:
    """A queued example, its tokens and topic; `scored` once its test-then-train score was reported."""

    example: Example
    tokens: Tokens
    topic: int
    scored: bool = False


class CapabilityScore(msgspec.Struct):
    """One capability's scores: at the first evaluation (before learning), the best so far, the latest."""

    first: float
    best: float
    last: float
    at: int = 0   # examples learned at the latest evaluation

    @property
    def forgetting(self) -> float:
        """How far the latest score lies below the best so far (0: nothing forgotten)."""
        return round(self.best - self.last, 6)


class LmLearner(LearnerBase):
    """LoRA adapters on a frozen base causal LM, learning targets of rated conversations (module docstring)."""

    kind = "lm"

    def __init__(self, name: str, config: ModelConfig, seed: int = 42, *, drift: Optional[DriftConfig] = None,
                 evaluation: Optional[EvalConfig] = None, threads: int = 0) -> None:
        drift = drift or DriftConfig()   # the drift policy judges class labels against a reference model: not here
        drift = msgspec.structs.replace(drift, policy=msgspec.structs.replace(drift.policy, enabled=False))
        evaluation = msgspec.structs.replace(evaluation or EvalConfig(), probe_size=0)   # capabilities instead
        super().__init__(name, config, seed, drift=drift, evaluation=evaluation)
        self.task = "generation"
        self.lm = lm = config.lm
        if threads:
            torch.set_num_threads(threads)   # process-wide, as for torch learners
        self.base = load_base(lm.base)
        self.tokenizer = self.base.tokenizer
        self.model = with_adapters(self.base.model, lm.lora_rank, lm.lora_alpha, lm.lora_targets, seed)
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=lm.lr, weight_decay=0.0)
        size = sum(p.numel() for _, p in self.trainable)
        self.ewc = OnlineEWC(size, lm.ewc_lambda, lm.ewc_gamma) if lm.ewc_lambda > 0 else None
        self.replay = TopicReplay(lm.replay_size, seed)
        self.capability_sets = [(c, load_conversations(c.path)) for c in lm.capabilities]
        self.capabilities: dict[str, CapabilityScore] = {}
        self.queue: list[Pending] = []
        self.steps = self.tokens_learned = self.tokens_replayed = self.nothing_to_learn = self.rolled_back = 0
        self.loss = float("nan")        # the last step's mean loss per answer token (new and replayed)
        self.lag_seconds = 0.0          # wall seconds from reading the oldest example of the last step to its update
        self._since_consolidation = 0
        self._since_evaluation = 0

    # --- learning -------------------------------------------------------------------------------------------

    def _test_then_train(self, examples: list[Example], now: Optional[float]) -> None:
        now = time.time() if now is None else now   # wall time: latency metrics only
        for ex in examples:
            pending = self._pending(ex)
            if pending is None:
                continue
            if self.queue and ex.ts - self.queue[0].example.ts > self.lm.max_wait:
                self._step(now)
            self.queue.append(pending)
            while len(self.queue) >= self.lm.batch_size or self._queued_tokens() >= self.lm.token_budget:
                self._step(now)

    def _pending(self, ex: Example) -> Optional[Pending]:
        """The example tokenized and filed by topic; None (counted or refused) when it teaches nothing."""
        if ex.text is None:
            self.evaluation.refuse(ex, "NotAConversation", "a language model learns from conversations (messages "
                                   "and answer in the inference log)")
            return None
        target = ex.text.target
        if target is None:
            self.nothing_to_learn += 1
            return None
        try:
            tokens = encode(self.tokenizer, ex.text.messages, target, self.lm.max_tokens)
        except TooLong as err:
            self.evaluation.count_error(ex, err)
            return None
        return Pending(ex, tokens, topic_of(ex.text.messages[-1].content, self.lm.topic_bits))

    def _queued_tokens(self) -> int:
        return sum(len(p.tokens.ids) for p in self.queue)

    def flush(self, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        while self.queue:
            self._step(now)

    def _settle(self) -> None:
        """Scores the queued conversations not scored yet (an evaluation mark falls among them); learns nothing."""
        unscored = [p for p in self.queue if not p.scored]
        if unscored:
            with torch.no_grad():
                _, nll, right = self._forward([p.tokens for p in unscored], [1.0] * len(unscored), backward=False)
            self._report(list(enumerate(unscored)), nll, right)

    def _take(self) -> tuple[list[Pending], list[Tokens]]:
        """The next step's new conversations (in order, within the token budget) and the replayed ones beside them."""
        budget, used, taken = self.lm.token_budget, 0, []
        for pending in self.queue[:self.lm.batch_size]:
            if taken and used + len(pending.tokens.ids) > budget:
                break
            taken.append(pending)
            used += len(pending.tokens.ids)
        del self.queue[:len(taken)]
        ratio = self.lm.replay_ratio
        replayed = []
        for tokens in self.replay.sample(round(len(taken) * ratio / (1 - ratio))):
            if used + len(tokens.ids) <= budget:
                replayed.append(tokens)
                used += len(tokens.ids)
        return taken, replayed

    def _step(self, now: float) -> None:
        started = time.perf_counter()
        if self.lm.evaluate_every and not self.capabilities:
            self.evaluate_capabilities()   # the scores before anything was learned: what forgetting is measured from
        taken, replayed = self._take()
        sequences = [p.tokens for p in taken] + replayed
        weights = [p.example.weight for p in taken] + [1.0] * len(replayed)
        self.optimizer.zero_grad(set_to_none=False)
        self.loss, nll, right = self._forward(sequences, weights, backward=True)
        self._report([(k, p) for k, p in enumerate(taken) if not p.scored], nll, right)
        if not self._apply_gradients(len(sequences)):   # nothing changed: the step's new examples are refused
            self.rolled_back += 1
            for pending in taken:
                self.evaluation.refuse(pending.example, "NonFiniteUpdate", "the step's loss or gradient was not "
                                       "finite; the adapters were left as they were")
            return
        for pending in taken:
            self.replay.add(pending.tokens, pending.topic)
        self._count_step(taken, replayed, started, now)

    def _forward(self, sequences: list[Tokens], weights: list[float],
                 backward: bool) -> tuple[float, list[float], list[bool]]:
        """The weighted mean loss per answer token of `sequences` (gradients accumulated if `backward`), and each
        sequence's mean loss and whether its whole answer was predicted right (teacher forcing)."""
        learned = sum(w * s.learned for w, s in zip(weights, sequences))
        total, nll, right = 0.0, [], []
        size = self.lm.micro_batch
        for start in range(0, len(sequences), size):
            batch = collate(sequences[start:start + size], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1]
            labels = batch.labels[:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            per_sequence = per_token.sum(1)
            loss = (per_sequence * torch.tensor(weights[start:start + size])).sum() / learned
            if backward:
                loss.backward()
            total += float(loss.detach())
            with torch.no_grad():
                nll += (per_sequence / (labels != IGNORE).sum(1)).tolist()
                right += ((logits.argmax(-1) == labels) | (labels == IGNORE)).all(1).tolist()
        return total, nll, right

    def _report(self, rows: list[tuple[int, Pending]], nll: list[float], right: list[bool]) -> None:
        """Reports the scores of the pending conversations at these rows to the evaluation (test then train)."""
        if not rows:
            return
        correct = np.array([right[k] for k, _ in rows], dtype=bool)
        p_true = np.nan_to_num(np.exp(-np.array([nll[k] for k, _ in rows])), nan=0.0)   # a non-finite loss: a miss
        ts = np.array([p.example.ts for _, p in rows])
        for _, pending in rows:
            pending.scored = True
        self._scored_classification(correct, p_true, ts)

    def _flat(self, what: str) -> torch.Tensor:
        return torch.cat([getattr(p, what).reshape(-1) for _, p in self.trainable])

    def _apply_gradients(self, count: int) -> bool:
        """EWC's penalty added to the adapters' gradient (the plain gradient kept for its Fisher), then AdamW's step;
        False, and no step, when the gradient is not finite (one bad step would ruin the adapters for good)."""
        grad = self._flat("grad")
        if not bool(torch.isfinite(grad).all()):
            return False
        if self.ewc is not None:
            self.ewc.observe(grad, count)
            self.ewc.penalty_grad(self._flat("data"), grad)
            offset = 0
            for _, parameter in self.trainable:
                size = parameter.numel()
                parameter.grad.copy_(grad[offset:offset + size].view_as(parameter))
                offset += size
        self.optimizer.step()
        return True

    def _count_step(self, taken: list[Pending], replayed: list[Tokens], started: float, now: float) -> None:
        examples = [p.example for p in taken]
        self.steps += 1
        self.tokens_learned += sum(p.tokens.learned for p in taken)
        self.tokens_replayed += sum(t.learned for t in replayed)
        self.evaluation.learned += len(taken)
        self.evaluation.observe_update(time.perf_counter() - started, np.array([e.label_ts for e in examples]),
                                       np.array([e.consumed for e in examples]), now)
        consumed = [e.consumed for e in examples if e.consumed > 0]
        self.lag_seconds = max(0.0, now - min(consumed)) if consumed else 0.0
        self._since_consolidation += len(taken)
        if self.ewc is not None and self._since_consolidation >= self.lm.consolidate_every:
            self.ewc.consolidate(self._flat("data"))
            self._since_consolidation = 0
        self._since_evaluation += len(taken)
        if self.lm.evaluate_every and self._since_evaluation >= self.lm.evaluate_every:
            self.evaluate_capabilities()

    # --- capabilities ---------------------------------------------------------------------------------------

    def evaluate_capabilities(self) -> dict[str, CapabilityScore]:
        """Scores the model now on every capability set; the first scores are the base's (nothing learned yet)."""
        self._since_evaluation = 0
        for capability, items in self.capability_sets:
            now = score(self.model, self.tokenizer, items, capability.metric, self.lm.max_new_tokens,
                        self.lm.max_tokens)
            known = self.capabilities.get(capability.name)
            best = now if known is None else max(known.best, now)
            self.capabilities[capability.name] = CapabilityScore(known.first if known else now, best, now,
                                                                 self.evaluation.learned)
        return self.capabilities

    # --- snapshot, export, metrics --------------------------------------------------------------------------

    def _own_state(self) -> dict:
        optimizer = self.optimizer.state_dict()
        return {"lm": {"base": self.base.digest, "queue": [p.example for p in self.queue],
                       "scored": [p.scored for p in self.queue], "param_groups": optimizer["param_groups"],
                       "replay_rng": self.replay.rng.bit_generator.state, "capabilities": self.capabilities,
                       "counters": (self.steps, self.tokens_learned, self.tokens_replayed, self.nothing_to_learn,
                                    self.rolled_back, self.loss, self._since_consolidation, self._since_evaluation)}}

    def _restore_own(self, state: dict) -> None:
        own = state["lm"]
        if own["base"] != self.base.digest:
            raise ValueError(f"learner {self.name!r}: the snapshot was taken on another base model (weights digest "
                             f"{own['base']}, this base {self.base.digest}: {self.lm.base})")
        self.queue = []
        for example, scored in zip(own["queue"], own["scored"]):
            pending = self._pending(example)
            pending.scored = scored
            self.queue.append(pending)
        self._restored = own
        self.capabilities = own["capabilities"]
        (self.steps, self.tokens_learned, self.tokens_replayed, self.nothing_to_learn, self.rolled_back, self.loss,
         self._since_consolidation, self._since_evaluation) = own["counters"]

    def _tensors(self) -> dict[str, np.ndarray]:
        arrays = {f"adapter.{name}": p.detach().numpy() for name, p in self.trainable}
        for index, moments in self.optimizer.state_dict()["state"].items():
            arrays.update({f"adam.{index}.{key}": value.numpy() for key, value in moments.items()})
        if self.ewc is not None:
            arrays.update({key: value.numpy() for key, value in self.ewc.tensors().items()})
        arrays.update({f"replay.{key}": value for key, value in self.replay.arrays().items()})
        return arrays

    def _restore_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, parameter in self.trainable:
                parameter.copy_(torch.from_numpy(tensors[f"adapter.{name}"]))
        moments: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                value = value.reshape(()) if name == "step" else value   # a scalar (the store keeps no 0-d arrays)
                moments.setdefault(int(index), {})[name] = torch.from_numpy(value)
        self.optimizer.load_state_dict({"state": moments, "param_groups": self._restored["param_groups"]})
        if self.ewc is not None:
            self.ewc.load({k: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("ewc.")})
        self.replay.load({k[7:]: v for k, v in tensors.items() if k.startswith("replay.")},
                         self._restored["replay_rng"])

    def export(self) -> ExportedModel:
        from streamlearn.learners.lm.served import adapter_files

        return ExportedModel(self.kind, adapter_files(self))

    def predict_many(self, rows: list) -> list:
        """Feature rows mean nothing to a language model: no prediction (`served.ServedLm.reply_many` answers)."""
        return [None] * len(rows)

    def metrics(self) -> LearnerMetrics:
        return LearnerMetrics(self.lm.base, self.rolled_back, len(self.replay), (), {
            "steps": self.steps, "tokens_learned": self.tokens_learned, "tokens_replayed": self.tokens_replayed,
            "nothing_to_learn": self.nothing_to_learn, "pending": len(self.queue),
            "pending_tokens": self._queued_tokens(), "loss": finite_or_none(self.loss),
            "lag_seconds": round(self.lag_seconds, 3),
            "replay_topics": len(self.replay.topics),
            "capabilities": {name: msgspec.structs.asdict(c) | {"forgetting": c.forgetting}
                             for name, c in self.capabilities.items()}})

    def parameters(self) -> Averaging:
        return Averaging(None, "language models do not run in a cluster yet")
