"""An LM learner's adapter as artifact files, and such files back as a model ready to answer.

A candidate is its adapter alone: `adapter.safetensors` (the LoRA weights, no
pickle) and `adapter.json` (the base it belongs to, by reference and weights
digest, and the LoRA shape). Production is the base plus that adapter;
`base_alone` is what the gate compares a first candidate with.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional, Sequence

import torch

from streamlearn.learners.lm.base import BaseModelError, load_base, with_adapters
from streamlearn.learners.lm.capabilities import Conversation, generate, score
from streamlearn.records import Turn

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


def adapter_files(learner: Any) -> dict[str, bytes]:
    """The learner's adapter as artifact files."""
    import safetensors.torch
    from peft import get_peft_model_state_dict

    weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(learner.model).items()}
    lm = learner.lm
    described = {"base": lm.base, "base_digest": learner.base.digest, "rank": lm.lora_rank, "alpha": lm.lora_alpha,
                 "targets": list(lm.lora_targets), "max_new_tokens": lm.max_new_tokens, "max_tokens": lm.max_tokens}
    return {ADAPTER_WEIGHTS: safetensors.torch.save(weights), ADAPTER_CONFIG: json.dumps(described).encode()}


class ServedLm:
    """A base model with an adapter (or none), in eval mode: answers conversations and scores capability sets."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 48, max_tokens: int = 1024) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_tokens = max_tokens
        model.eval()

    def reply_many(self, conversations: Sequence[Sequence[Turn]], max_new_tokens: Optional[int] = None) -> list[str]:
        """The greedy answer to each conversation."""
        return generate(self.model, self.tokenizer, conversations, max_new_tokens or self.max_new_tokens)

    def score(self, items: Sequence[Conversation], metric: str) -> float:
        """The score on a capability set (`capabilities.score`)."""
        return score(self.model, self.tokenizer, items, metric, self.max_new_tokens, self.max_tokens)


def served_lm(files: dict[str, bytes], template: Any = None) -> ServedLm:
    """The model of verified adapter files: their base, loaded and checked against the digest they name, with the
    adapter on it. `template`: a learner whose model (that base, adapters of that shape) is copied instead of loading
    the base again."""
    import safetensors.torch
    from peft import set_peft_model_state_dict

    described = json.loads(files[ADAPTER_CONFIG])
    shape = (described["rank"], described["alpha"], described["targets"])
    if template is not None and template.base.digest == described["base_digest"] and _shape(template.lm) == shape:
        model, tokenizer = copy.deepcopy(template.model), template.tokenizer
    else:
        base = load_base(described["base"])
        if base.digest != described["base_digest"]:
            raise BaseModelError(f"the adapter was trained on base {described['base']} with weights digest "
                                 f"{described['base_digest']}; that base's digest is now {base.digest}")
        model, tokenizer = with_adapters(base.model, *shape, seed=0), base.tokenizer
    set_peft_model_state_dict(model, safetensors.torch.load(files[ADAPTER_WEIGHTS]))
    return ServedLm(model, tokenizer, described["max_new_tokens"], described["max_tokens"])


def base_alone(learner: Any) -> ServedLm:
    """The learner's base as it answers without adapters (what the gate compares a first candidate with)."""
    model = copy.deepcopy(learner.model)
    _zero_adapters(model)
    return ServedLm(model, learner.tokenizer, learner.lm.max_new_tokens, learner.lm.max_tokens)


def _shape(lm: Any) -> tuple:
    return (lm.lora_rank, lm.lora_alpha, list(lm.lora_targets))


@torch.no_grad()
def _zero_adapters(model: Any) -> None:
    """LoRA's B matrices to zero: the copied adapters add nothing, the model answers as its base."""
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.zero_()
