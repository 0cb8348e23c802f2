"""Torch networks by name: the built-in `mlp`, or "package.module:factory" returning an `nn.Module`.

A factory is called with `in_features`, `out_features` and the model's `params`;
its module maps a float32 batch (batch, in_features) to (batch, out_features).

>>> import torch
>>> net = build_network("mlp", 4, 3, {"hidden": [8]}, torch.Generator().manual_seed(0))
>>> net(torch.zeros(2, 4)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from streamlearn.learners.models import ModelError, import_factory

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def mlp(in_features: int, out_features: int, hidden: Sequence[int] = (128, 128), dropout: float = 0.0,
        activation: str = "relu") -> nn.Module:
    """Fully connected layers with `activation` (and dropout) between them."""
    if activation not in ACTIVATIONS:
        raise ModelError(f"activation {activation!r}: one of {', '.join(ACTIVATIONS)}", key="params")
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, int(size)), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(float(dropout)))
        width = int(size)
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def build_network(name: str, in_features: int, out_features: int, params: dict,
                  generator: torch.Generator) -> nn.Module:
    """A fresh network, initialized from `generator` (so a seed gives the same weights)."""
    factory = mlp if name == "mlp" else import_factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        try:
            net = factory(in_features=in_features, out_features=out_features, **params)
        except TypeError as err:
            raise ModelError(f"{name}: {err}", key="params") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"{name}: {type(net).__name__} is not a torch nn.Module")
    return net
