"""Capabilities: named held-out sets of conversations, each scored by exact match or by per-token loss.

A set is a JSONL file, one `{"messages": [{"role": "user", "content": ...}], "answer": ...}`
per line. `exact_match` generates each answer greedily (at most `max_new_tokens`)
and counts those equal to the expected one, case, runs of white space and a
final full stop aside: the share in [0, 1]; `contains` counts those that mention
the expected answer (a key fact: "Paris", "24") as whole words, however worded.
`token_loss` is minus the mean loss
per token of the expected answers (teacher forcing): cheaper, and higher is
better as for every score the gate reads. The learner scores its model on
every set now and then (forgetting: the best score so far minus the current),
and the gate scores a candidate and production on each.

>>> from streamlearn.learners.lm.tiny import tiny_llama
>>> from streamlearn.records import Turn
>>> model, tokenizer = tiny_llama()
>>> items = [Conversation((Turn("user", "Say hi"),), "hi")]
>>> score(model, tokenizer, items, "exact_match", max_new_tokens=4)
0.0
>>> mentions("There are 24 hours in a day.", "24"), mentions("It is 24.", "4")
(True, False)
>>> score(model, tokenizer, items, "token_loss") < -3   # a random model: about ln(258) nats a token
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import msgspec
import torch

from streamlearn.learners.lm.chat import collate, encode, prompt_ids
from streamlearn.records import Turn

BATCH = 16   # conversations per forward pass or generation


@dataclass(frozen=True)
class Conversation:
    """A held-out question (the messages before the answer) and the expected answer."""

    messages: tuple[Turn, ...]
    answer: str


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[_Message]
    answer: str


class CapabilityFileError(ValueError):
    """A capability file that cannot be read, said in one line (the line number and the problem)."""


def load_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a capability file (see the module docstring)."""
    decoder = msgspec.json.Decoder(_Line)
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = decoder.decode(line)
        except msgspec.MsgspecError as err:
            raise CapabilityFileError(f"{path}:{number}: {err}") from None
        if not item.messages or item.messages[-1].role != "user":
            raise CapabilityFileError(f"{path}:{number}: the last message must be the user's")
        items.append(Conversation(tuple(Turn(m.role, m.content) for m in item.messages), item.answer))
    if not items:
        raise CapabilityFileError(f"{path}: no conversations")
    return items


def normalise(text: str) -> str:
    """`text` as exact match compares it: case-folded, white space runs as one space, no final full stop."""
    return re.sub(r"\s+", " ", text).strip().casefold().rstrip(".").rstrip()


def score(model: Any, tokenizer: Any, items: Sequence[Conversation], metric: str, max_new_tokens: int = 48,
          max_tokens: int = 1024) -> float:
    """The score of `model` on `items` by `metric` ("exact_match", "contains" or "token_loss"), higher is better."""
    if metric in ("exact_match", "contains"):
        answers = generate(model, tokenizer, [item.messages for item in items], max_new_tokens)
        hit = _equal if metric == "exact_match" else mentions
        return round(sum(hit(got, item.answer) for got, item in zip(answers, items)) / len(items), 6)
    return round(-answer_loss(model, tokenizer, items, max_tokens), 6)


def _equal(got: str, expected: str) -> bool:
    return normalise(got) == normalise(expected)


def mentions(got: str, expected: str) -> bool:
    """`expected` appears in `got` as whole words (case and white space aside): "4" is not in "24"."""
    return re.search(rf"(?<!\w){re.escape(normalise(expected))}(?!\w)", normalise(got)) is not None


@torch.no_grad()
def answer_loss(model: Any, tokenizer: Any, items: Sequence[Conversation], max_tokens: int = 1024) -> float:
    """Mean loss per token of the expected answers (and the end of the turn), teacher-forced."""
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(items), BATCH):
        chunk = [encode(tokenizer, item.messages, item.answer, max_tokens) for item in items[start:start + BATCH]]
        batch = collate(chunk, tokenizer.pad_token_id)
        logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1]
        labels = batch.labels[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
        tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / max(tokens, 1)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, conversations: Sequence[Sequence[Turn]], max_new_tokens: int) -> list[str]:
    """The greedy answer to each conversation (left-padded batches; the text up to the end of the turn)."""
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(conversations), BATCH):
        prompts = [prompt_ids(tokenizer, messages) for messages in conversations[start:start + BATCH]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    model.train(was_training)
    return answers
