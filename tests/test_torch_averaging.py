"""A torch learner's parameters averaged across replicas whose columns and output units lie in different orders.

Two `TorchLearner`s learn disjoint halves of a stream in which feature names and
class labels first appear in different orders, so their encoders and output layers
are laid out differently; their sets are combined locally (`averaging.combine`, as
`ReplicaGroup.average` does across processes) and set on both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamlearn.cluster.group import split_sets
from streamlearn.cluster.wire import decode_header, decode_sets, encode_header, encode_sets
from streamlearn.config import EncoderConfig, ModelConfig, TrainConfig
from streamlearn.learners.averaging import ParameterSet, combine
from streamlearn.learners.torch_averaging import TorchLearnerParameters
from streamlearn.learners.torch_learner import TorchLearner
from streamlearn.records import Example

LABELS_A = ["1", 1, "cat"]     # the string "1" and the number 1 are two classes
LABELS_B = ["dog", "cat", 1]
NETWORKS = {"hidden": {"hidden": [8]}, "no_hidden": {"hidden": []}, "dropout": {"hidden": [8, 4], "dropout": 0.1}}


def config(task: str = "classification", params=None, max_classes: int = 6, numeric_slots: int = 8) -> ModelConfig:
    return ModelConfig(model="mlp", task=task, params=params or {"hidden": [8]},
                       train=TrainConfig(batch_size=8, max_classes=max_classes),
                       encoder=EncoderConfig(numeric_slots=numeric_slots, string_slots=6, hash_buckets=3))


def half(side: str, n: int, start: int = 0, task: str = "classification") -> list[Example]:
    """Side "a": features x, y, colour (red/blue) and labels `LABELS_A`; side "b": z, y, x, colour (green/red) and
    `LABELS_B`, on other scales: names and labels first appear in other orders."""
    rng = np.random.default_rng({"a": 1, "b": 2}[side] * 1000 + start)
    out = []
    for i in range(start, start + n):
        if side == "a":
            x = {"x": float(rng.normal(0, 1)), "y": float(rng.normal(5, 2)), "colour": "red" if i % 2 else "blue"}
            label = LABELS_A[i % 3]
        else:
            x = {"z": float(rng.normal(-3, 1)), "y": float(rng.normal(1, 4)), "x": float(rng.normal(2, 3)),
                 "colour": "green" if i % 2 else "red"}
            label = LABELS_B[i % 3]
        if task == "regression":
            label = 2.0 * x["x"] - x["y"] + (10.0 if side == "b" else 0.0)
        out.append(Example(f"{side}-{i}", "m", x, label, 1.0, i / 100, i / 100))
    return out


def learned(learner: TorchLearner, examples: list[Example]) -> TorchLearner:
    learner.learn_batch(examples, now=1e9)
    learner.flush(now=1e9)
    return learner


def held_out(n: int = 24) -> list[dict]:
    rng = np.random.default_rng(99)
    colours = ["red", "blue", "green", "purple"]
    return [{"x": float(rng.normal(1, 2)), "y": float(rng.normal(3, 3)), "z": float(rng.normal(-3, 1)),
             "colour": colours[i % 4], **({"unseen": 1.0} if i % 5 == 0 else {})} for i in range(n)]


def logits_by_label(learner: TorchLearner, rows: list[dict]) -> dict:
    out = learner._forward(learner.encoder.vectorize(rows, grow=False)).numpy()
    return {label: out[:, i] for i, label in enumerate(learner.classes)}


ADAPTERS: dict[int, TorchLearnerParameters] = {}   # each learner's, built fresh or at its last sync (EpochSync's way)


def replica(model: ModelConfig, seed: int) -> TorchLearner:
    """A fresh learner, its averageable parameters built now: the shared (empty) base."""
    learner = TorchLearner("m", model, seed=seed)
    ADAPTERS[id(learner)] = learner.parameters().parameters
    return learner


def sync(*learners: TorchLearner, weights=None) -> ParameterSet:
    """One sync: each learner's set since its base, combined, set on all (adapters built anew after); the merged set."""
    weights = weights or [1.0] * len(learners)
    merged = combine([ADAPTERS[id(learner)].get(weight=w) for learner, w in zip(learners, weights)])
    for learner in learners:
        ADAPTERS[id(learner)].set(merged)
        ADAPTERS[id(learner)] = learner.parameters().parameters
    return merged


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_replicas_laid_out_differently_predict_alike_after_a_sync(network):
    a = learned(replica(config(params=NETWORKS[network]), seed=1), half("a", 48))
    b = learned(replica(config(params=NETWORKS[network]), seed=2), half("b", 40))
    assert list(a.encoder.numeric)[:2] == ["x", "y"] and list(b.encoder.numeric)[:3] == ["z", "y", "x"]
    rows = held_out()
    sync(a, b, weights=[48, 40])
    assert a.classes == ["1", 1, "cat", "dog"] and b.classes == ["dog", "cat", 1, "1"]
    assert a.encoder.numeric["x"] != b.encoder.numeric["x"]   # the layouts still differ ...
    assert a.predict_many(rows) == b.predict_many(rows)       # ... the functions do not
    la, lb = logits_by_label(a, rows), logits_by_label(b, rows)
    assert set(la) == set(lb)
    for label in la:
        np.testing.assert_allclose(la[label], lb[label], rtol=1e-5, atol=1e-5)
    for learner in (a, b):   # and both go on learning from there
        learned(learner, half("a", 16, start=200) + half("b", 16, start=300))


def test_a_shared_column_and_output_unit_are_the_weighted_mean():
    a = learned(replica(config(), seed=1), half("a", 48))
    b = learned(replica(config(), seed=2), half("b", 40))
    column = lambda learner, name: learner.net[0].weight.detach()[:, learner.encoder.numeric[name]].clone()  # noqa: E731
    unit = lambda learner, label: learner.net[-1].weight.detach()[learner._class_index[label]].clone()  # noqa: E731
    xa, xb, zb = column(a, "x"), column(b, "x"), column(b, "z")
    cat_a, cat_b, dog_b = unit(a, "cat"), unit(b, "cat"), unit(b, "dog")
    sync(a, b, weights=[3.0, 1.0])
    for learner in (a, b):
        torch.testing.assert_close(column(learner, "x"), (3.0 * xa + xb) / 4.0)
        torch.testing.assert_close(unit(learner, "cat"), (3.0 * cat_a + cat_b) / 4.0)
        assert torch.equal(column(learner, "z"), zb)         # held by one replica: its value as it was
        assert torch.equal(unit(learner, "dog"), dog_b)


def expected_moments(examples: list[Example], name: str) -> tuple[int, float, float]:
    """Count, mean and population variance of feature `name` over `examples`, as the encoder sees it (float32)."""
    values = np.array([ex.features[name] for ex in examples if name in ex.features], dtype=np.float32)
    values = values.astype(np.float64)
    return len(values), values.mean(), values.var()


def test_scaling_statistics_equal_one_encoder_that_saw_both_halves_over_several_syncs():
    a, b = replica(config(), seed=1), replica(config(), seed=2)
    seen: list[Example] = []
    for round_ in range(3):
        left, right = half("a", 40, start=100 * round_), half("b", 24 + 8 * round_, start=100 * round_)
        learned(a, left)
        learned(b, right)
        seen += left + right
        sync(a, b, weights=[len(left), len(right)])
        for learner in (a, b):
            moments = learner.encoder.moments
            for name in ("x", "y", "z"):
                slot = learner.encoder.numeric[name]
                count, mean, var = expected_moments(seen, name)
                assert moments.count[slot] == count
                assert moments.mean[slot] == pytest.approx(mean, rel=1e-9, abs=1e-12)
                assert moments.m2[slot] / count == pytest.approx(var, rel=1e-9)
    assert a.encoder.moments.count[a.encoder.numeric["z"]] == 24 + 32 + 40   # only b saw z


def test_a_set_travels_through_the_wire_keys_and_types_kept():
    for params in (NETWORKS["hidden"], NETWORKS["no_hidden"]):
        learner = learned(replica(config(params=params), seed=1), half("a", 48))
        mine = ADAPTERS[id(learner)].get(weight=48)
        back = decode_sets(encode_sets({"m": mine}))["m"]
        assert (back.weight, back.base) == (mine.weight, mine.base)
        for name, v in mine.values.items():
            assert back.values[name].keys == v.keys and np.array_equal(back.values[name].values, v.values)
            assert back.values[name].values.dtype == v.values.dtype
            assert [type(k) for k in back.values[name].keys or ()] == [type(k) for k in v.keys or ()]
        for name, m in mine.moments.items():
            assert back.moments[name].keys == m.keys and np.array_equal(back.moments[name].var, m.var)
        keyed, positional = split_sets({"m": mine})
        header, layouts = decode_header(encode_header(keyed, positional))
        assert layouts["m"] == {"rest": (np.dtype(np.float32).str, mine.values["rest"].values.shape)}
        assert header["m"].values.keys() == mine.values.keys() - {"rest"}
    labels = mine.values["0.bias:classes"].keys   # no hidden layer: the output layer is the input layer
    assert labels == (1, "1", "cat") and [type(k) for k in labels] == [int, str, str]   # sorted: type name, then key
    assert ("x", "1") in mine.values["0.weight:numeric"].keys and ("x", 1) in mine.values["0.weight:numeric"].keys


def test_get_after_set_gives_back_the_merged_values():
    a = learned(replica(config(), seed=1), half("a", 48))
    b = learned(replica(config(), seed=2), half("b", 40))
    merged = sync(a, b, weights=[48, 40])
    again = [ADAPTERS[id(learner)].get(weight=0.0) for learner in (a, b)]
    for got in again:
        assert got.weight == 0.0 and got.base == again[0].base
        assert all(len(m.keys) == 0 for m in got.moments.values())   # nothing learned since the sync
        for name, want in merged.values.items():
            have = got.values[name]
            if want.keys is None:
                assert np.array_equal(have.values, want.values)
                continue
            assert set(have.keys) == set(want.keys)   # in this replica's slot order
            order = [have.keys.index(k) for k in want.keys]
            assert np.array_equal(have.values[order], want.values)
    combine(again)   # the same base: the next sync fits
    assert encode_sets({"m": again[0]}) == encode_sets({"m": again[1]})   # one model: the same bytes (digests agree)


@pytest.mark.parametrize("network", ["hidden", "no_hidden"])
def test_regression_merges_the_target_statistics_and_predicts_alike(network):
    a = learned(replica(config("regression", NETWORKS[network]), seed=1), half("a", 48, task="regression"))
    b = learned(replica(config("regression", NETWORKS[network]), seed=2), half("b", 40, task="regression"))
    merged = sync(a, b, weights=[48, 40])
    assert set(merged.moments) == {"scaling", "targets"}
    targets = np.array([ex.label for ex in half("a", 48, task="regression") + half("b", 40, task="regression")],
                       dtype=np.float32).astype(np.float64)
    for learner in (a, b):
        assert learner.targets.count[0] == 88
        assert learner.targets.mean[0] == pytest.approx(targets.mean(), rel=1e-9)
        assert learner.targets.m2[0] / 88 == pytest.approx(targets.var(), rel=1e-9)
    rows = held_out()
    np.testing.assert_allclose(a.predict_many(rows), b.predict_many(rows), rtol=1e-5, atol=1e-5)


def test_keys_that_do_not_fit_are_refused_and_change_nothing():
    a = learned(replica(config(max_classes=3), seed=1), half("a", 48))
    b = learned(replica(config(max_classes=3), seed=2), half("b", 40))
    pa, pb = ADAPTERS[id(a)], ADAPTERS[id(b)]
    merged = combine([pa.get(1.0), pb.get(1.0)])   # four labels in all
    before = a.flat.param.detach().clone(), list(a.classes), dict(a.encoder.numeric), a.encoder.moments.count.copy()
    with pytest.raises(ValueError, match=r"class labels new to this replica .* train.max_classes"):
        pa.set(merged)
    assert torch.equal(a.flat.param.detach(), before[0]) and a.classes == before[1]
    assert a.encoder.numeric == before[2] and np.array_equal(a.encoder.moments.count, before[3])
    narrow = learned(replica(config(numeric_slots=3), seed=1), half("a", 48))
    wide = learned(replica(config(numeric_slots=3), seed=2), half("b", 40))
    with pytest.raises(ValueError, match="encoder.numeric_slots"):
        sync(narrow, wide)


def test_another_models_parameters_are_refused():
    a = learned(replica(config(), seed=1), half("a", 48))
    other = learned(replica(config(params={"hidden": [4]}), seed=1), half("a", 48))
    with pytest.raises(ValueError, match="shape"):
        ADAPTERS[id(a)].set(ADAPTERS[id(other)].get())
    with pytest.raises(ValueError, match="base"):   # built after learning: its base is not the replicas' shared one
        ADAPTERS[id(a)].set(a.parameters().parameters.get())


class Doubled(torch.nn.Module):
    def forward(self, x):
        return 2.0 * x


def doubled_input(in_features: int, out_features: int) -> torch.nn.Module:
    """A network whose first layer sees a transformed input: its columns cannot be found."""
    return torch.nn.Sequential(Doubled(), torch.nn.Linear(in_features, out_features))


def test_a_network_whose_input_columns_cannot_be_found_says_why():
    model = ModelConfig(model="tests.test_torch_averaging:doubled_input", kind="torch", train=TrainConfig(max_classes=3))
    learner = TorchLearner("m", model, seed=1)
    params, reason = learner.parameters()
    assert params is None and "no nn.Linear layer takes the network's input" in reason
    assert isinstance(learned(replica(config(), seed=1), half("a", 8)).parameters().parameters,
                      TorchLearnerParameters)
