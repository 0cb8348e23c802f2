"""Classification losses of the torch learner: plain cross-entropy and ER-ACE's asymmetric cross-entropy.

ER-ACE (Caccia et al. 2022, "New Insights on Reducing Abrupt Representation
Change in Online Continual Learning"): in a class-incremental stream, plain
cross-entropy on the incoming rows pushes every older class's logit down as soon
as a new class arrives, which overwrites what replay is trying to keep. ER-ACE
computes the incoming rows' cross-entropy over the classes present in the
incoming rows only (the other logits are left out of their softmax), and the
replayed rows' over every class seen. When every class is present among the
incoming rows, the two losses are the same.

Both are means over the rows, weighted by feedback weights when given, so that
`replay.ratio` keeps deciding the replayed rows' share of the loss.

>>> logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
>>> targets = torch.tensor([0, 1, 2])
>>> float(er_ace(logits, targets, incoming=3)) == float(cross_entropy(logits, targets))
True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def uses_er_ace(setting: str, task: str, replays: bool) -> bool:
    """Whether `train.loss = setting` means ER-ACE for a model of `task`, with replay on or off ("auto": a
    classifier with replay; without replayed rows nothing would learn to tell apart classes that never arrive
    together)."""
    return task == "classification" and (setting == "er_ace" or (setting == "auto" and replays))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy over the rows, weighted by `weights` when given."""
    if weights is None:
        return F.cross_entropy(logits, targets)
    return _weighted_mean(F.cross_entropy(logits, targets, reduction="none"), weights)


def er_ace(logits: torch.Tensor, targets: torch.Tensor, incoming: int,
           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ER-ACE: the first `incoming` rows' cross-entropy over the classes present among them, the rest (replayed
    rows) over every column of `logits`; the mean over all rows, weighted by `weights` when given.

    `logits` holds only the classes seen so far (one column each); `targets` are column indices.
    """
    if not 0 <= incoming <= len(targets):
        raise ValueError(f"incoming = {incoming} rows of a batch of {len(targets)}")
    masked = logits.masked_fill(incoming_mask(targets, incoming, logits.shape[1]), float("-inf"))
    return cross_entropy(masked, targets, weights)


def incoming_mask(targets: torch.Tensor, incoming: int, classes: int) -> torch.Tensor:
    """True where a logit is left out: in the first `incoming` rows, the columns of classes absent from them."""
    absent = torch.ones(classes, dtype=torch.bool)
    absent[targets[:incoming]] = False
    rows = torch.zeros(len(targets), 1, dtype=torch.bool)
    rows[:incoming] = True
    return rows & absent[None, :]


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (losses * weights).sum() / weights.sum()
