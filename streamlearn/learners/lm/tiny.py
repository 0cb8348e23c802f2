"""A small randomly initialised Llama and a byte-level tokenizer, built in-process: the tests' base model.

Nothing is read from disk or downloaded; the same weights on every call. The
tokenizer has the ChatML template SmolLM2 uses, so conversations are laid out
as they are for the real model.

>>> model, tokenizer = tiny_llama()
>>> tokenizer.decode(tokenizer.encode("hello")), model.config.num_hidden_layers
('hello', 2)
"""

from __future__ import annotations

from typing import Any

import torch

SPECIALS = ["<|im_start|>", "<|im_end|>"]
# Weights drawn wider than a real model's 0.02: a frozen head that small keeps every logit near zero, and adapters
# on attention alone could then never make the model sure of an answer (tests could not tell learning apart).
INIT = 0.2
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_tokenizer() -> Any:
    """A tokenizer with one token per byte (256) and the two ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0, init: float = INIT) -> tuple[Any, Any]:
    """(model, tokenizer): a Llama of `layers` layers of width `hidden`, weights drawn from `seed` with standard
    deviation `init`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, initializer_range=init, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
