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
        x_all, y_all, _, _ = model._mixed_rows(raw, y, w)
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


# --- logit replay (DER++, `train.distill`) ---------------------------------------------------------------------

def test_logit_distance_compares_only_the_classes_known_when_a_row_was_stored():
    logits = torch.tensor([[1.0, 2.0, 5.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]], requires_grad=True)
    stored = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [9.0, 9.0, 9.0]])
    known = torch.tensor([2, 3, 0])               # the last row knew no class: no target at all
    loss = losses.logit_distance(logits, stored, known)
    assert loss.item() == pytest.approx(((1 + 4) / 2 + (1 + 1 + 1) / 3) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0 and torch.all(logits.grad[2] == 0)   # unknown then: never pulled
    assert logits.grad[0, 1] == pytest.approx(2 * (2.0 - 0.0) / 2 / 2)   # d/dx of mean over 2 columns, 2 rows
    nothing = torch.zeros(2, 3, requires_grad=True)
    zero = losses.logit_distance(nothing, torch.ones(2, 3), torch.tensor([0, 0]))
    zero.backward()
    assert zero.item() == 0.0 and torch.all(nothing.grad == 0)   # no target: zero, with a graph to backpropagate
    assert float(losses.logit_distance(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))) == 0.0


def buffers(logits: int, seed: int = 1):
    """One buffer of each kind, 16 rows of 2 features, keeping `logits` outputs per row."""
    from streamlearn.replay.class_balanced import ClassBalancedBuffer
    from streamlearn.replay.reservoir import ReservoirBuffer
    from streamlearn.replay.time_decayed import TimeDecayedBuffer
    return [ReservoirBuffer(16, 2, seed=seed, logits=logits), ClassBalancedBuffer(16, 2, seed=seed, logits=logits),
            TimeDecayedBuffer(16, 2, half_life=8, seed=seed, logits=logits)]


def test_every_buffer_keeps_each_rows_logits_with_it_through_eviction_expiry_and_a_snapshot():
    from streamlearn.replay.store import Logits

    for buffer, twin in zip(buffers(logits=3), buffers(logits=3, seed=9)):
        for start in range(0, 200, 25):           # far more rows than fit: rows are overwritten in place
            n = np.arange(start, start + 25, dtype=np.float32)
            x = np.stack([n, -n], axis=1)
            # the logits of row n are (n, 2n, 3n): a misplaced one shows
            logits = Logits((n[:, None] * np.array([1, 2, 3], np.float32)), n.astype(np.int64) % 3 + 1)
            buffer.add(x, (n % 4).astype(np.float32), n.astype(float), logits)
        store = buffer.store
        assert store.size == 16
        ids = store.x[:store.size, 0]
        assert np.array_equal(store.logits[:store.size], ids[:, None] * np.array([1, 2, 3], np.float32))
        assert np.array_equal(store.known[:store.size], ids.astype(np.int64) % 3 + 1)
        assert buffer.expire(190.0) > 0   # every kind holds rows older than that
        twin.load({k: v.copy() for k, v in buffer.arrays().items()})
        for b in (buffer, twin):
            ids = b.store.x[:b.store.size, 0]
            assert np.array_equal(b.store.logits[:b.store.size], ids[:, None] * np.array([1, 2, 3], np.float32))
        assert np.array_equal(buffer.sample(8), twin.sample(8))   # the generator came back too


def test_a_buffer_without_logits_keeps_its_snapshot_keys_and_reads_an_older_snapshot_with_logits_on():
    plain = buffers(logits=0)
    for buffer in plain:
        buffer.add(np.ones((4, 2), np.float32), np.zeros(4, np.float32), np.arange(4.0))
        assert not any(k.endswith((".logits", ".known")) for k in buffer.arrays())
    for old, new in zip(plain, buffers(logits=5)):   # a snapshot from before `train.distill` was turned on
        new.load(old.arrays())
        assert new.store.size == 4 and new.store.logits.shape == (16, 5) and not new.store.known.any()


def distill_learner(distill: float, loss: str = "er_ace") -> TorchLearner:
    config = parse_config({"models": {"m": {"model": "mlp", "params": {"hidden": [8]},
                                            "train": {"loss": loss, "max_classes": 4, "distill": distill},
                                            "replay": {"kind": "class_balanced", "capacity": 64, "ratio": 0.5}}}},
                          env={}).models["m"]
    return TorchLearner("m", config, seed=0)


def test_the_learner_adds_distill_times_the_replayed_rows_logit_distance():
    model = distill_learner(0.7)
    model.learn_batch(task([0, 1], 64, 0))
    store = model.replay.store
    assert store.size == 64 and set(store.known[:64].tolist()) == {2}   # stored after classes 0 and 1 were known
    assert np.abs(store.logits[:64, :2]).sum() > 0
    model.learn_batch(task([2], 3, 64))
    raw, y, w = (model.queue.columns[i] for i in (0, 1, 2))
    x_all, y_all, _, rows = model._mixed_rows(raw, y, w)
    stored = model._stored_logits(rows)
    with torch.no_grad():
        out = model.net(torch.from_numpy(model.encoder.scale(x_all)))
    ys = torch.from_numpy(y_all).long()
    got = model._loss(out, ys, None, incoming=3, stored=stored)
    by_hand = ((out[3:, :2] - torch.from_numpy(store.logits[rows, :2])) ** 2).mean(dim=1).mean()
    assert float(got) == pytest.approx(float(losses.er_ace(out[:, :3], ys, 3) + 0.7 * by_hand), rel=1e-6)
    assert distill_learner(0.0)._stored_logits(rows) is None and distill_learner(0.0).replay.store.logits.shape[1] == 0


def test_a_restored_learner_with_logit_replay_continues_bit_for_bit():
    from streamlearn.checkpoints.content import ServiceFigures, pack, unpack
    from streamlearn.checkpoints.store import Manifest, Snapshot

    original = distill_learner(0.3)
    original.learn_batch(task([0, 1], 70, 0))          # leaves a partial micro-batch queued
    files = pack({"m": original.snapshot()}, b"", ServiceFigures(0, 0.0))
    twin = TorchLearner("m", original.config, seed=999)
    twin.restore(unpack(Snapshot(Manifest(1, None, 0.0, "", {}, []), files)).learners["m"])
    assert np.array_equal(twin.replay.store.logits, original.replay.store.logits)
    for learner in (original, twin):
        learner.learn_batch(task([2, 3], 90, 70))
        learner.flush()
    assert torch.equal(original.flat.param, twin.flat.param)
    assert np.array_equal(original.replay.store.logits, twin.replay.store.logits)


def test_config_refuses_distill_without_a_classifier_or_replay_in_one_line():
    def parsed(table):
        return parse_config({"models": {"m": {"model": "mlp", **table}}}, env={})
    with pytest.raises(ConfigError, match=r'^config error: models\.m\.train\.distill: needs task = "classification"$'):
        parsed({"task": "regression", "train": {"distill": 0.1}})
    with pytest.raises(ConfigError, match=r"^config error: models\.m\.train\.distill: needs replay"):
        parsed({"train": {"distill": 0.1}, "replay": {"kind": "none"}})
    with pytest.raises(ConfigError, match=r"^config error: models\.m\.train\.distill: Expected `float` >= 0"):
        parsed({"train": {"distill": -1.0}})
    assert parsed({}).models["m"].train.distill == 0.0 and parsed({"task": "regression"}).models["m"]
