"""A network's parameters as views of one flat tensor, and their gradients of another.

Whole-model arithmetic then costs one fused op instead of a Python loop over
layers: the EWC penalty and its gradient, the finiteness check, the copy kept
for rolling back a bad update. The optimizer gets the single flat parameter, so
its state (Adam's moments) is flat too and as cheap to copy.

>>> import torch
>>> net = torch.nn.Linear(3, 2)
>>> flat = FlatParameters(net)
>>> flat.param.numel(), net.weight.data_ptr() == flat.param.data_ptr()
(8, True)
>>> with torch.no_grad():
...     _ = flat.param.add_(1.0)   # seen by the layer: its weight is a view
>>> bool((net.bias == flat.param[6:]).all())
True
"""

from __future__ import annotations

import torch


class FlatParameters:
    """Rebinds every trainable parameter of `module` to a slice of `self.param` (grads to `self.param.grad`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        dtype = params[0].dtype if params else torch.float32
        data = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0, dtype=dtype)
        self.param = torch.nn.Parameter(data)
        self.param.grad = torch.zeros_like(data)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.param.data[offset:offset + n].view_as(p)
            p.grad = self.param.grad[offset:offset + n].view_as(p)
            offset += n
        self._params = params

    def zero_grad(self) -> None:
        """Zeroes the gradients in place (never `set_to_none`: the layers' grads are views)."""
        self.param.grad.zero_()

    def check_views(self) -> None:
        """Raises if autograd replaced a layer's gradient instead of accumulating into the flat one."""
        base = self.param.grad.data_ptr()
        end = base + self.param.grad.numel() * self.param.grad.element_size()
        for p in self._params:
            if p.grad is None or not base <= p.grad.data_ptr() < end:
                raise RuntimeError("a parameter's gradient is no longer a view of the flat gradient")
