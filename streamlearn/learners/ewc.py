"""Online Elastic Weight Consolidation on flat parameters.

EWC (Kirkpatrick et al., 2017) adds `lambda/2 · Σ F (θ − θ*)²` to the loss: a
weight that mattered for what was learned before (large Fisher information F)
is held near its anchor θ*. The online variant (Schwarz et al., 2018) keeps one
Fisher estimate, decayed by `gamma` at each consolidation, instead of one per
task, so it suits a stream without task boundaries. F is the empirical diagonal
Fisher from the squared gradients of recent batches. The penalty's gradient,
`lambda · F (θ − θ*)`, is added to the flat gradient in one fused op, never
through autograd over a sum of per-layer terms.

>>> import torch
>>> ewc = OnlineEWC(size=2, lam=2.0, gamma=1.0)
>>> theta = torch.tensor([1.0, 1.0])
>>> ewc.observe(torch.tensor([1.0, 0.0]), batch_size=1); ewc.consolidate(theta)
>>> moved = torch.tensor([3.0, 3.0])
>>> ewc.penalty(moved), ewc.penalty_grad(moved, torch.zeros(2)).tolist()
(4.0, [4.0, 0.0])
"""

from __future__ import annotations

import torch


class OnlineEWC:
    """Diagonal Fisher (decayed), anchor weights, and the quadratic penalty around them."""

    def __init__(self, size: int, lam: float, gamma: float) -> None:
        self.lam = lam
        self.gamma = gamma
        self.fisher = torch.zeros(size)
        self.anchor = torch.zeros(size)
        self.recent = torch.zeros(size)     # sum of squared gradients since the last consolidation
        self.recent_batches = 0
        self.consolidations = 0

    @property
    def active(self) -> bool:
        return self.consolidations > 0 and self.lam > 0

    def observe(self, grad: torch.Tensor, batch_size: int) -> None:
        """Adds one batch's loss gradient: batch_size · ḡ² estimates the mean per-example squared gradient."""
        self.recent.addcmul_(grad, grad, value=float(batch_size))
        self.recent_batches += 1

    def consolidate(self, theta: torch.Tensor) -> None:
        """F ← gamma·F + (recent Fisher); θ* ← θ. The weights as they are now become what to keep."""
        if self.recent_batches:
            self.fisher.mul_(self.gamma).add_(self.recent, alpha=1.0 / self.recent_batches)
        self.anchor.copy_(theta.detach())
        self.recent.zero_()
        self.recent_batches = 0
        self.consolidations += 1

    def release(self, theta: torch.Tensor) -> None:
        """Forgets what was consolidated (a confirmed concept change): no penalty until the next consolidation."""
        self.fisher.zero_()
        self.recent.zero_()
        self.anchor.copy_(theta.detach())
        self.recent_batches = 0
        self.consolidations = 0

    def penalty_grad(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Adds lambda · F (θ − θ*) to `grad` in place and returns it."""
        if self.active:
            grad.addcmul_(self.fisher, theta.detach() - self.anchor, value=self.lam)
        return grad

    def penalty(self, theta: torch.Tensor) -> float:
        if not self.active:
            return 0.0
        return float(self.lam / 2 * torch.dot(self.fisher, (theta.detach() - self.anchor) ** 2))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ewc.fisher": self.fisher, "ewc.anchor": self.anchor, "ewc.recent": self.recent,
                "ewc.counts": torch.tensor([self.recent_batches, self.consolidations], dtype=torch.int64)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fisher, self.anchor, self.recent = (tensors[f"ewc.{k}"].clone() for k in ("fisher", "anchor", "recent"))
        self.recent_batches, self.consolidations = (int(v) for v in tensors["ewc.counts"])
