"""Conversations to token ids, with the tokens to learn marked: supervised fine-tuning on the answer alone.

The prompt (every message, laid out by the tokenizer's chat template, then the
assistant's turn opened) and the answer are tokenized apart and joined, so the
boundary is exact: the model learns the answer's tokens and the end of its turn,
never the system's or the user's words, nor earlier assistant turns (served
answers nobody rated). A conversation longer than `max_tokens` loses its oldest
messages (the last user message always stays); an answer that cannot fit at all
raises `TooLong`.

>>> from streamlearn.learners.lm.tiny import byte_tokenizer
>>> from streamlearn.records import Turn
>>> tokenizer = byte_tokenizer()
>>> seq = encode(tokenizer, [Turn("user", "2+2?")], "4", max_tokens=64)
>>> tokenizer.decode(seq.ids[seq.start:])
'4<|im_end|>'
>>> batch = collate([seq, encode(tokenizer, [Turn("user", "hi")], "hello", 64)], tokenizer.pad_token_id)
>>> batch.ids.shape == batch.labels.shape, int((batch.labels[0] != -100).sum())
(True, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from streamlearn.records import Turn

IGNORE = -100   # the label torch's cross-entropy skips


class TooLong(ValueError):
    """An answer that does not fit in `lm.max_tokens` beside the last user message."""


@dataclass(frozen=True)
class Tokens:
    """One conversation as token ids; the tokens from `start` on are the answer (learned), the rest its prompt."""

    ids: np.ndarray   # int32
    start: int

    @property
    def learned(self) -> int:
        return len(self.ids) - self.start


@dataclass(frozen=True)
class Padded:
    """Sequences padded on the right to one length: ids, attention mask, labels (IGNORE but on answers)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


def prompt_ids(tokenizer: Any, messages: Sequence[Turn]) -> list[int]:
    """The ids of `messages` laid out by the chat template, with the assistant's turn opened."""
    chat = [{"role": m.role, "content": m.content} for m in messages]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode(tokenizer: Any, messages: Sequence[Turn], answer: str, max_tokens: int) -> Tokens:
    """`messages` and `answer` as one sequence, the answer (and the end of its turn) marked to learn."""
    reply = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    messages = list(messages)
    prompt = prompt_ids(tokenizer, messages)
    while len(prompt) + len(reply) > max_tokens and len(messages) > 1:
        messages = messages[1:]   # the oldest message goes first: the question stays
        prompt = prompt_ids(tokenizer, messages)
    if len(prompt) + len(reply) > max_tokens:
        raise TooLong(f"{len(prompt) + len(reply)} tokens with the last question alone; lm.max_tokens is {max_tokens}")
    return Tokens(np.asarray(prompt + reply, dtype=np.int32), len(prompt))


def collate(sequences: Sequence[Tokens], pad_id: int) -> Padded:
    """Right-padded tensors of `sequences` (a step's micro-batch)."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens = torch.from_numpy(seq.ids.astype(np.int64))
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
        labels[row, seq.start:len(tokens)] = tokens[seq.start:]
    return Padded(ids, mask, labels)
