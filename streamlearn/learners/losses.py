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

Logit replay (`train.distill`, the "dark knowledge" term of DER++, Buzzega et al.
2020, "Dark Experience for General Continual Learning"): the replay buffer also
keeps the network's outputs for a row as they were when the row was learned, and
a replayed row's current outputs are pulled toward them by a squared error. A
label says only which class wins; the stored outputs say how the old network
ranked every class it knew, which holds the old decision boundaries in place
better than the labels alone. Only the classes known when a row was stored are
compared (the other units had not learned anything yet).

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


def logit_distance(logits: torch.Tensor, stored: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean squared difference between `logits` and `stored`, over each row's first
    `known[i]` columns (the classes known when it was stored); rows that knew none are left out (0 if none is left)."""
    width = min(logits.shape[1], stored.shape[1])
    valid = torch.arange(width)[None, :] < known[:, None]
    counts = valid.sum(dim=1)
    rows = counts > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0   # keeps the graph: a backward pass through it gives zero gradients
    squared = torch.where(valid, (logits[:, :width] - stored[:, :width]) ** 2, 0.0)
    return (squared[rows].sum(dim=1) / counts[rows]).mean()
