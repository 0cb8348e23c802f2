"""The torch learner: EWC maths, the non-finite guard, save/restore, class-incremental heads (no broker)."""

from __future__ import annotations


import msgspec
import numpy as np
import pytest
import torch

from streamlearn.checkpoints.content import ServiceFigures, pack, unpack
from streamlearn.checkpoints.store import Manifest, Snapshot
from streamlearn.config import ModelConfig, parse_config
from streamlearn.learners.ewc import OnlineEWC
from streamlearn.learners.flat import FlatParameters
from streamlearn.learners.torch_learner import TorchLearner
from streamlearn.records import Example
from tests.conftest import http_get


def model_config(**sections) -> ModelConfig:
    table = {"model": "mlp", "params": {"hidden": [16], "dropout": 0.1}}
    table.update(sections)
    return parse_config({"models": {"m": table}}, env={}).models["m"]


def examples(n: int, start: int = 0, classes: int = 3, seed: int = 0, rate: float = 100.0) -> list[Example]:
    """`n` examples, `rate` per second of event time (at 100/s a micro-batch of 32 fills within `max_wait`)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        label = i % classes
        x = {"a": float(label + rng.normal(0, 0.3)), "b": float(rng.normal()), "colour": "red" if label else "blue"}
        out.append(Example(f"e-{i}", "m", x, label, 1.0, i / rate, i / rate))
    return out


def test_ewc_penalty_value_and_gradient_match_autograd_on_a_tiny_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    flat = FlatParameters(net)
    ewc = OnlineEWC(flat.param.numel(), lam=3.0, gamma=0.5)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    for _ in range(2):                                   # two batches of gradients -> the Fisher
        flat.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        ewc.observe(flat.param.grad, batch_size=8)
    fisher = ewc.recent / 2
    ewc.consolidate(flat.param)
    assert torch.allclose(ewc.fisher, fisher)
    with torch.no_grad():
        flat.param.add_(torch.randn_like(flat.param) * 0.1)  # move away from the anchor
    theta = flat.param.detach().clone().requires_grad_(True)
    reference = 3.0 / 2 * (fisher * (theta - ewc.anchor) ** 2).sum()
    reference.backward()
    assert ewc.penalty(flat.param) == pytest.approx(float(reference.detach()), rel=1e-6)
    grad = ewc.penalty_grad(flat.param, torch.zeros_like(flat.param))
    assert torch.allclose(grad, theta.grad, atol=1e-7)
    # A second consolidation decays the old Fisher by gamma.
    flat.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    new = flat.param.grad.clone() ** 2 * 8
    ewc.observe(flat.param.grad, batch_size=8)
    ewc.consolidate(flat.param)
    assert torch.allclose(ewc.fisher, 0.5 * fisher + new)


def test_the_layers_gradients_stay_views_of_the_flat_gradient():
    learner = TorchLearner("m", model_config(), seed=1)
    learner.learn_batch(examples(64))
    learner.flat.check_views()
    assert learner.flat.param.grad.abs().sum() > 0


def test_a_non_finite_loss_changes_nothing_and_is_counted():
    learner = TorchLearner("m", model_config(), seed=1)
    learner.learn_batch(examples(64))
    before = learner.flat.param.detach().clone()
    moments = [t.clone() for t in learner._optimizer_tensors()]
    xs = torch.full((4, learner.encoder.width), float("nan"))
    learner._step(xs, torch.zeros(4, dtype=torch.long), None)
    assert learner.metrics().rolled_back == 1
    assert torch.equal(learner.flat.param, before)
    assert all(torch.equal(a, b) for a, b in zip(learner._optimizer_tensors(), moments))


def test_weights_that_overflow_are_rolled_back_to_the_last_good_state():
    config = model_config(train={"optimizer": "sgd", "lr": 1e38})
    learner = TorchLearner("m", config, seed=1)
    learner.learn_batch(examples(32, classes=2))        # one micro-batch (the first step may overflow already)
    good = learner.flat.param.detach().clone()
    assert torch.isfinite(good).all()
    learner.learn_batch(examples(64, start=32, classes=2))
    assert learner.metrics().rolled_back >= 1
    assert torch.isfinite(learner.flat.param).all()     # never left non-finite
    assert learner.evaluation.learned == 96                        # the service keeps going


def roundtrip(learner: TorchLearner) -> TorchLearner:
    """Through the snapshot's own files: pickle for the small state, safetensors for the arrays."""
    files = pack({"m": learner.snapshot()}, b"", ServiceFigures(0, 0.0))
    assert "tensors.safetensors" in files
    content = unpack(Snapshot(Manifest(1, None, 0.0, "", {}, []), files))
    twin = TorchLearner("m", learner.config, seed=999)   # another seed: everything must come from the snapshot
    twin.restore(content.learners["m"])
    return twin


@pytest.mark.parametrize("replay", ["reservoir", "class_balanced", "time_decayed"])
def test_a_restored_learner_continues_bit_for_bit(replay):
    config = model_config(replay={"kind": replay, "capacity": 64}, ewc={"consolidate": {"every_examples": 100}})
    original = TorchLearner("m", config, seed=5)
    original.learn_batch(examples(250))                 # leaves a partial micro-batch queued
    assert len(original.queue) and original.ewc.consolidations
    twin = roundtrip(original)
    for learner in (original, twin):
        learner.learn_batch(examples(300, start=250, seed=1))
        learner.flush()
    assert torch.equal(original.flat.param, twin.flat.param)
    moments, restored = (l.optimizer.state_dict()["state"][0] for l in (original, twin))
    assert moments.keys() == restored.keys() and all(torch.equal(moments[k], restored[k]) for k in moments)
    assert torch.equal(original.ewc.fisher, twin.ewc.fisher)
    assert original.evaluation.scores.values() == twin.evaluation.scores.values()
    assert original.evaluation.learned == twin.evaluation.learned == 550


def test_classes_appear_as_the_stream_brings_them():
    learner = TorchLearner("m", model_config(train={"max_classes": 3}), seed=2)
    learner.learn_batch(examples(96, classes=2))
    assert learner.classes == [0, 1]
    learner.learn_batch(examples(96, start=96, classes=3))
    assert learner.classes == [0, 1, 2]
    learner.learn_batch([Example("x", "m", {"a": 1.0}, 7, 1.0, 1.0, 1.0)])  # a 4th class does not fit
    assert learner.evaluation.errors == 1


def test_regression_learns_a_linear_target():
    learner = TorchLearner("m", model_config(task="regression", train={"lr": 0.01}), seed=3)
    rng = np.random.default_rng(0)
    batch = [Example(f"r-{i}", "m", {"x": float(v)}, float(3 * v + 100), 1.0, i, i)
             for i, v in enumerate(rng.normal(size=4000))]
    learner.learn_batch(batch)
    assert learner.evaluation.scores.value("mae", rolling=True) < 1.0   # the target's spread is 3


def test_the_service_learns_a_torch_model_and_resumes_it_from_a_snapshot(tmp_path):
    import orjson

    from streamlearn.checkpoints.store import SnapshotStore
    from streamlearn.service import Service

    path = tmp_path / "examples.jsonl"
    rows = examples(900)
    path.write_bytes(b"".join(orjson.dumps({"id": e.id, "ts": e.ts, "model": "m", "features": e.features,
                                            "label": e.label}) + b"\n" for e in rows))

    def config(state: str):
        return parse_config({"source": f"file:{path}", "state_dir": str(tmp_path / state),
                             "intake": {"mode": "inline"}, "metrics": {"port": 0, "host": "127.0.0.1"},
                             "eval": {"segment_size": 300, "probe_size": 10, "every": 300},
                             "models": {"m": {"model": "mlp", "params": {"hidden": [16]},
                                              "replay": {"capacity": 100}}}}, env={})

    first = Service(config("a"))
    summary = first.run()
    model = summary["models"]["m"]
    assert summary["learned"] == 870 and model["held_out"] == 30 and model["replay_size"] == 100
    assert sorted(model["probe_accuracy"]) == ["0", "1", "2"]
    metrics = http_get(first.metrics.port, "/metrics")[1]
    first.close()
    assert 'streamlearn_replay_buffer_size{model="m"} 100.0' in metrics
    assert 'streamlearn_update_rollbacks_total{model="m"} 0.0' in metrics
    assert 'streamlearn_drift_detected_total{detector="adwin",model="m"}' in metrics
    assert 'streamlearn_update_seconds_count{model="m"} 28.0' in metrics   # 27 micro-batches of 32 + the rest
    assert 'streamlearn_probe_accuracy{model="m",segment="2"}' in metrics
    assert f'streamlearn_forgetting{{model="m"}} {model["forgetting"]}' in metrics
    snapshot = SnapshotStore(tmp_path / "a" / "snapshots").load(1)
    assert "tensors.safetensors" in snapshot.files
    resumed = Service(config("a"))            # restores snapshot 1; the file is already read to its end
    learner = resumed.learners["m"]
    assert torch.equal(learner.flat.param, first.learners["m"].flat.param)
    assert learner.replay.store.size == 100 and learner.evaluation.learned == 870
    assert learner.evaluation.probes.accuracies() == first.learners["m"].evaluation.probes.accuracies()


def test_scoring_from_the_training_pass_equals_scoring_separately():
    """Queued examples are scored by their micro-batch's first training forward pass, which sees the network
    they arrived to: the same scores and weights as scoring each chunk on arrival, however chunks fall."""
    config = model_config(params={"hidden": [16]}, replay={"capacity": 64})   # no dropout: one pass applies
    one_pass, separate = TorchLearner("m", config, seed=4), TorchLearner("m", config, seed=4)
    assert one_pass._one_pass
    separate._one_pass = False   # a forward pass of its own for each chunk, as it arrives
    stream = examples(640)
    for start in range(0, 640, 7):
        one_pass.learn_batch(stream[start:start + 7])
    for start in range(0, 640, 32):
        separate.learn_batch(stream[start:start + 32])
    assert one_pass.evaluation.scores.values() == pytest.approx(separate.evaluation.scores.values(), rel=1e-6)
    assert torch.equal(one_pass.flat.param, separate.flat.param)


def test_a_score_read_mid_batch_scores_the_queued_examples_first():
    """A score mark between micro-batches sees every example up to it, though they wait to be learned."""
    config = model_config(params={"hidden": [16]}, train={"batch_size": 64})
    learner = TorchLearner("m", config, seed=2)
    stream = examples(100)
    learner.evaluation.mark_score_at(stream[39].ts)
    learner.learn_batch(stream)
    assert learner.evaluation.scores.count == 100 - 36   # the last 36 wait, unscored, for their micro-batch
    reference = TorchLearner("m", config, seed=2)
    reference._one_pass = False
    reference.learn_batch(stream[:40])
    reference.evaluation.settle()   # a forward pass of its own, in eval mode, over the 40 waiting examples
    expected = reference.evaluation.scores.value("accuracy", rolling=True)
    assert learner.evaluation.score_at(stream[39].ts) == pytest.approx(expected)


def bursty(n: int, seed: int = 0) -> list[Example]:
    """Examples 100 per second of event time, with a 2 s lull after every 45: partial micro-batches."""
    stream = examples(n, seed=seed)
    return [msgspec.structs.replace(ex, ts=ex.ts + 2.0 * (i // 45), label_ts=ex.ts + 2.0 * (i // 45))
            for i, ex in enumerate(stream)]


def learn_in_pieces(learner: TorchLearner, stream: list[Example], sizes: list[int]) -> None:
    """Feeds `stream` in consecutive batches of the given sizes, cycling, as an intake might cut it."""
    start, turn = 0, 0
    while start < len(stream):
        size = sizes[turn % len(sizes)]
        learner.learn_batch(stream[start:start + size])
        start, turn = start + size, turn + 1


def same_state(a: TorchLearner, b: TorchLearner) -> None:
    assert np.array_equal(a.snapshot().tensors["flat"], b.snapshot().tensors["flat"])
    assert a.evaluation.scores.values() == b.evaluation.scores.values()
    assert a.evaluation.learned == b.evaluation.learned and a.consolidation.fired == b.consolidation.fired


CONFIGS = {
    "one_pass": {"params": {"hidden": [16]}, "replay": {"capacity": 64}},
    "dropout": {"replay": {"capacity": 64, "kind": "class_balanced"}},
    "seconds": {"replay": {"capacity": 64}, "ewc": {"consolidate": {"every_seconds": 2.5, "on_drift": True}}},
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_how_the_stream_is_cut_into_batches_changes_nothing(kind):
    """Partial micro-batches are learned by event time: any batch splitting gives the same weights and scores."""
    config = model_config(**CONFIGS[kind])
    stream = bursty(700)
    learners = [TorchLearner("m", config, seed=6) for _ in range(3)]
    for learner, sizes in zip(learners, ([700], [1, 7, 50], [13, 200, 3, 31])):
        learn_in_pieces(learner, stream, sizes)
    assert 0 < len(learners[0].queue) < 32   # the last partial micro-batch waits for more input
    for learner in learners:
        learner.flush()
    for other in learners[1:]:
        same_state(learners[0], other)
    assert learners[0].evaluation.learned == 700
    assert learners[0].evaluation.update_seconds.count == 2 * 15 + 1   # 15 bursts of 45 (32 + 13), then the last 25
    if kind == "seconds":   # every 2.5 s of event time (the bursts span 20.7 s), however fast the run was
        assert learners[0].consolidation.fired["seconds"] >= 6


def test_a_restored_learner_continues_a_partial_micro_batch_exactly():
    """A snapshot taken with a partial micro-batch queued (a stop) resumes it as if never stopped."""
    config = model_config(replay={"capacity": 64}, ewc={"consolidate": {"every_seconds": 2.0}})
    stream = bursty(500, seed=2)
    uninterrupted = TorchLearner("m", config, seed=8)
    learn_in_pieces(uninterrupted, stream, [64])
    stopped = TorchLearner("m", config, seed=8)
    learn_in_pieces(stopped, stream[:250], [9, 40])
    assert 0 < len(stopped.queue) < 32
    resumed = roundtrip(stopped)
    learn_in_pieces(resumed, stream[250:], [17])
    for learner in (uninterrupted, resumed):
        learner.flush()
    same_state(uninterrupted, resumed)
