"""The classification losses: ER-ACE's masking by hand, weights, gradients, and how the torch learner uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamlearn.config import ConfigError, parse_config
from streamlearn.learners import losses
from streamlearn.learners.torch_learner import TorchLearner
from streamlearn.records import Example

# Two incoming rows (targets 0 and 2: class 1 is absent from them) and one replayed row (target 1).
LOGITS = [[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]]
TARGETS = [0, 2, 1]


def by_hand() -> list[float]:
    """Each row's loss, written out: the incoming rows' softmax over classes 0 and 2, the replayed row's over all."""
    return [-math.log(math.exp(2) / (math.exp(2) + math.exp(1))),
            -math.log(math.exp(3) / (math.exp(0) + math.exp(3))),
            -math.log(math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(0)))]


def test_er_ace_leaves_absent_classes_out_of_the_incoming_rows_softmax_only():
    loss = losses.er_ace(torch.tensor(LOGITS), torch.tensor(TARGETS), incoming=2)
    assert float(loss) == pytest.approx(sum(by_hand()) / 3, rel=1e-6)
    # Plain cross-entropy keeps class 1 in every row's softmax: a larger loss here.
    assert float(losses.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS))) > float(loss) + 0.05


def test_weights_are_honoured_as_a_weighted_mean():
    weights = torch.tensor([1.0, 0.0, 3.0])
    rows = by_hand()
    loss = losses.er_ace(torch.tensor(LOGITS), torch.tensor(TARGETS), incoming=2, weights=weights)
    assert float(loss) == pytest.approx((rows[0] + 3 * rows[2]) / 4, rel=1e-6)
    plain = F.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), reduction="none")
    assert float(losses.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), weights)) == pytest.approx(
        float((plain[0] + 3 * plain[2]) / 4), rel=1e-6)


def test_absent_classes_logits_get_no_gradient_from_incoming_rows():
    logits = torch.tensor(LOGITS, requires_grad=True)
    losses.er_ace(logits, torch.tensor(TARGETS), incoming=2).backward()
    grad = logits.grad
    assert torch.all(grad[:2, 1] == 0)            # class 1 is not among the incoming rows' targets
    assert torch.all(grad[:2, [0, 2]] != 0)
    assert torch.all(grad[2] != 0)                # the replayed row pushes on every class seen
    assert torch.isfinite(grad).all()


def test_equals_plain_cross_entropy_when_every_class_is_present():
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([3, 0, 1, 2, 2, 0, 1, 3])
    for incoming in (4, 5, 8):                     # the first four rows already hold every class
        a = torch.randn(8, 4, generator=generator, requires_grad=True)
        b = a.detach().clone().requires_grad_(True)
        weights = torch.rand(8, generator=generator)
        ace, plain = losses.er_ace(a, targets, incoming, weights), losses.cross_entropy(b, targets, weights)
        ace.backward()
        plain.backward()
        assert ace.item() == pytest.approx(plain.item(), rel=1e-6)
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
    # No incoming row at all: every row replayed, the full loss.
    assert float(losses.er_ace(torch.tensor(LOGITS), torch.tensor(TARGETS), 0)) == pytest.approx(
        float(F.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS))), rel=1e-6)


def test_an_incoming_count_outside_the_batch_is_refused():
    with pytest.raises(ValueError, match="incoming = 4 rows of a batch of 3"):
        losses.er_ace(torch.tensor(LOGITS), torch.tensor(TARGETS), incoming=4)


def test_auto_means_er_ace_for_a_classifier_with_replay_only():
    assert losses.uses_er_ace("auto", "classification", replays=True)
    assert not losses.uses_er_ace("auto", "classification", replays=False)
    assert losses.uses_er_ace("er_ace", "classification", replays=False)
    assert not losses.uses_er_ace("cross_entropy", "classification", replays=True)
    assert not losses.uses_er_ace("auto", "regression", replays=True)


def test_config_refuses_er_ace_for_regression_in_one_line():
    table = {"model": "mlp", "task": "regression", "train": {"loss": "er_ace"}}
    with pytest.raises(ConfigError, match=r'^config error: models\.m\.train\.loss: "er_ace" needs task = '
                                          r'"classification"$'):
        parse_config({"models": {"m": table}}, env={})
    with pytest.raises(ConfigError, match=r"^config error: models\.m\.train\.loss: Invalid enum value 'hinge'$"):
        parse_config({"models": {"m": {"model": "mlp", "train": {"loss": "hinge"}}}}, env={})
    auto = parse_config({"models": {"m": {**table, "train": {}}}}, env={}).models["m"]
    assert auto.train.loss == "auto"


def learner(loss: str) -> TorchLearner:
    config = parse_config({"models": {"m": {"model": "mlp", "params": {"hidden": [8]},
                                            "train": {"loss": loss, "max_classes": 4},
                                            "replay": {"kind": "class_balanced", "capacity": 64, "ratio": 0.5}}}},
                          env={}).models["m"]
    return TorchLearner("m", config, seed=0)


def task(labels: list[int], n: int, start: int) -> list[Example]:
    rng = np.random.default_rng(start)
    return [Example(f"e-{i}", "m", {"a": float(labels[i % len(labels)] + rng.normal(0, 0.2))},
                    labels[i % len(labels)], 1.0, i / 100, i / 100) for i in range(start, start + n)]


def test_the_learner_tells_replayed_rows_from_incoming_ones():
    """After a task of classes 0 and 1, a batch of class 2 alone: only its own class in its rows' softmax."""
    for loss in ("er_ace", "cross_entropy"):
        model = learner(loss)
        model.learn_batch(task([0, 1], 64, 0))
        model.learn_batch(task([2], 3, 64))       # class 2 appears; 3 rows wait in the queue
        raw, y, w = (model.queue.columns[i] for i in (0, 1, 2))
        x_all, y_all, _ = model._mixed(raw, y, w)
        assert len(y) == 3 and len(y_all) == 6 and set(y_all[3:].tolist()) <= {0.0, 1.0}   # incoming rows first
        with torch.no_grad():
            out = model.net(torch.from_numpy(model.encoder.scale(x_all)))
        ys = torch.from_numpy(y_all).long()
        got = model._loss(out, ys, None, incoming=len(y))
        logits = out[:, :3]
        expected = (losses.er_ace(logits, ys, 3) if loss == "er_ace" else F.cross_entropy(logits, ys))
        assert float(got) == pytest.approx(float(expected), rel=1e-6)
    # With ER-ACE the incoming rows (one class among them) add nothing: the loss is the replayed half's.
    replayed = F.cross_entropy(logits[3:], ys[3:], reduction="sum") / 6
    assert float(losses.er_ace(logits, ys, 3)) == pytest.approx(float(replayed), rel=1e-6)
