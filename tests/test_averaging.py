"""The averageable-parameters interface: how replicas' sets combine, round trips, refusals (learners/averaging.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from river import linear_model, neighbors, preprocessing

from streamlearn.learners.averaging import (
    Averageable, Moments, ParameterSet, RiverLinearParameters, TorchParameters, Values, averageable, combine,
)
from streamlearn.learners.flat import FlatParameters
from streamlearn.learners.models import build_model


def _stream(n: int, seed: int, features=("x", "y")) -> list[tuple[dict, bool]]:
    """A separable-ish logistic stream with features on different scales and offsets."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = {f: rng.gauss(3.0 * i + 1.0, 1.0 + 4.0 * i) for i, f in enumerate(features)}
        logit = sum((x[f] - (3.0 * i + 1.0)) / (1.0 + 4.0 * i) * (1.5 if i % 2 == 0 else -1.0)
                    for i, f in enumerate(features))
        rows.append((x, rng.random() < 1.0 / (1.0 + np.exp(-logit))))
    return rows


def _learn(model, rows) -> None:
    for x, y in rows:
        model.learn_one(x, y)


def _scaler(model) -> preprocessing.StandardScaler:
    return model["StandardScaler"]


def _assert_scalers_equal(got: preprocessing.StandardScaler, want: preprocessing.StandardScaler) -> None:
    assert dict(got.counts) == dict(want.counts)
    for k in want.counts:
        assert got.means[k] == pytest.approx(want.means[k], rel=1e-9, abs=1e-12)
        assert got.vars[k] == pytest.approx(want.vars[k], rel=1e-9, abs=1e-12)


def _net(seed: int) -> tuple[torch.nn.Module, FlatParameters]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return net, FlatParameters(net)


def test_combining_one_set_returns_it_unchanged():
    model = build_model("logreg", "classification", {}, seed=1)
    params = averageable(model).parameters
    _learn(model, [({**x, "c": "red" if y else "blue"}, y) for x, y in _stream(200, seed=1)])
    one = params.get(weight=3.0)
    out = combine([one])
    assert out.weight == 3.0 and out.base == one.base
    for name, v in one.values.items():
        assert out.values[name].keys == v.keys and np.array_equal(out.values[name].values, v.values)
    for name, m in one.moments.items():
        got = out.moments[name]
        assert got.keys == m.keys
        assert all(np.array_equal(getattr(got, a), getattr(m, a)) for a in ("count", "mean", "var"))
    _, flat = _net(0)
    lone = TorchParameters(flat).get(weight=0.5)
    assert np.array_equal(combine([lone]).values["flat"].values, lone.values["flat"].values)


def test_merged_scaler_equals_one_scaler_that_saw_both_streams_over_several_syncs():
    """Counts add, means by count, variances by Chan: also after syncs, when both replicas share a base."""
    a, b = (build_model("scaled_logreg", "classification", {}, seed=1) for _ in range(2))
    whole = preprocessing.StandardScaler()
    pa, pb = averageable(a).parameters, averageable(b).parameters
    for sync in range(3):
        left, right = _stream(150, seed=10 + sync), _stream(90 + 40 * sync, seed=20 + sync, features=("x", "y", "z"))
        _learn(a, left)
        _learn(b, right)
        for x, _ in left + right:
            whole.learn_one(x)
        merged = combine([pa.get(len(left)), pb.get(len(right))])
        pa.set(merged)
        pb.set(merged)
        _assert_scalers_equal(_scaler(a), whole)
        _assert_scalers_equal(_scaler(b), whole)
    assert _scaler(a).counts["z"] == 90 + 130 + 170   # only b saw z: a's zero count adds nothing


def test_scalers_of_different_distributions_merge_where_a_naive_mean_would_not():
    """Guards the test above: with streams of different scale, averaging means and variances is visibly wrong."""
    left = [x for x, _ in _stream(150, seed=10)]
    right = [{k: v * 3.0 + 5.0 for k, v in x.items()} for x, _ in _stream(60, seed=20)]
    a, b = (preprocessing.StandardScaler() | linear_model.LinearRegression() for _ in range(2))
    pa, pb = RiverLinearParameters(a), RiverLinearParameters(b)
    for x in left:
        a.learn_one(x, 0.0)
    for x in right:
        b.learn_one(x, 0.0)
    naive_mean = (_scaler(a).means["x"] + _scaler(b).means["x"]) / 2
    naive_var = (_scaler(a).vars["x"] + _scaler(b).vars["x"]) / 2
    pa.set(combine([pa.get(), pb.get()]))
    whole = preprocessing.StandardScaler()
    for x in left + right:
        whole.learn_one(x)
    _assert_scalers_equal(_scaler(a), whole)
    assert abs(naive_mean - whole.means["x"]) > 0.1 * abs(whole.means["x"])
    assert abs(naive_var - whole.vars["x"]) > 0.1 * whole.vars["x"]


def test_weighted_mean_of_torch_flat_parameters_written_through_to_the_layers():
    (net_a, flat_a), (_, flat_b) = _net(1), _net(2)
    pa, pb = averageable(flat_a).parameters, averageable(flat_b).parameters
    assert isinstance(pa, TorchParameters) and isinstance(pa, Averageable)
    a, b = flat_a.param.detach().clone(), flat_b.param.detach().clone()
    merged = combine([pa.get(weight=1.0), pb.get(weight=3.0)])
    pa.set(merged)
    want = (1.0 * a.double() + 3.0 * b.double()) / 4.0
    assert torch.allclose(flat_a.param.detach().double(), want, atol=1e-6)
    assert flat_a.param.dtype == torch.float32
    # the layers are views of the flat tensor: the network computes with the averaged weights
    first = net_a[0]
    assert torch.equal(first.weight.detach().reshape(-1), flat_a.param.detach()[: first.weight.numel()])
    assert flat_a.param.data_ptr() == first.weight.data_ptr()


def test_zero_total_weight_counts_every_replica_equally():
    sets = [ParameterSet(weight=0.0, values={"w": Values(np.array([1.0, 2.0]))}),
            ParameterSet(weight=0.0, values={"w": Values(np.array([3.0, 6.0]))})]
    assert combine(sets).values["w"].values.tolist() == [2.0, 4.0]


def test_get_set_round_trip_leaves_predictions_identical():
    rows = _stream(300, seed=3)
    probes = [x for x, _ in _stream(50, seed=4)]
    source = build_model("scaled_logreg", "classification", {}, seed=1)
    params = averageable(source).parameters
    _learn(source, rows)
    target = build_model("scaled_logreg", "classification", {}, seed=1)
    averageable(target).parameters.set(params.get())
    assert [target.predict_proba_one(x) for x in probes] == [source.predict_proba_one(x) for x in probes]
    assert target["LogisticRegression"].weights != {}
    (net_a, flat_a), (net_b, flat_b) = _net(5), _net(6)
    TorchParameters(flat_b).set(TorchParameters(flat_a).get())
    inputs = torch.randn(8, 3)
    assert torch.equal(net_a(inputs), net_b(inputs))


def test_union_of_feature_names_a_replica_that_never_saw_a_feature_has_no_say_in_its_weight():
    a, b = (linear_model.LinearRegression() for _ in range(2))
    pa, pb = RiverLinearParameters(a), RiverLinearParameters(b)
    _learn(a, [({"x": 1.0, "only_a": 2.0}, 3.0)] * 5)
    _learn(b, [({"x": -1.0, "only_b": 1.0}, 1.0)] * 5)
    sa, sb = pa.get(weight=1.0), pb.get(weight=4.0)
    merged = combine([sa, sb])
    weights = merged.values["LinearRegression.weights"]
    assert weights.keys == ("x", "only_a", "only_b")
    wa, wb = a.weights, b.weights
    got = dict(zip(weights.keys, weights.values))
    assert got["x"] == pytest.approx((1.0 * wa["x"] + 4.0 * wb["x"]) / 5.0, rel=1e-12)
    assert got["only_a"] == wa["only_a"] and got["only_b"] == wb["only_b"]
    pa.set(merged)
    assert a.weights == got
    ia, ib = (s.values["LinearRegression.intercept"].values[0] for s in (sa, sb))
    assert ia != ib and a.intercept == pytest.approx(0.2 * ia + 0.8 * ib, rel=1e-12)


@pytest.mark.parametrize("name, task, words", [
    ("hoeffding_tree", "classification", "a tree's structure cannot be averaged"),
    ("hoeffding_adaptive_tree", "classification", "a tree's structure cannot be averaged"),
    ("arf", "classification", "a tree's structure cannot be averaged"),
    ("arf_regressor", "regression", "a tree's structure cannot be averaged"),
    ("naive_bayes", "classification", "no averaging rule"),
    ("softmax", "classification", "no averaging rule"),
])
def test_models_without_a_rule_are_refused_with_the_reason(name, task, words):
    found = averageable(build_model(name, task, {}, seed=1))
    assert found.parameters is None
    assert words in found.reason and "\n" not in found.reason


def test_other_refusals_name_the_part_at_fault():
    knn = averageable(neighbors.KNNClassifier())
    assert knn.parameters is None and knn.reason.startswith("KNNClassifier: a neighbours model")
    windowed = averageable(preprocessing.StandardScaler(window_size=10) | linear_model.LogisticRegression())
    assert windowed.parameters is None and "windowed scaler" in windowed.reason
    assert "neither a River model" in averageable(object()).reason


@pytest.mark.parametrize("name, task", [("logreg", "classification"), ("scaled_logreg", "classification"),
                                        ("linreg", "regression")])
def test_built_in_linear_models_are_averageable(name, task):
    found = averageable(build_model(name, task, {}, seed=1))
    assert isinstance(found.parameters, RiverLinearParameters) and found.reason == ""


def test_two_logregs_on_halves_combine_by_the_defined_arithmetic_and_predict_like_one_on_the_whole():
    rows = _stream(4000, seed=7)
    left, right = rows[0::2], rows[1::2]
    a, b, whole = (build_model("scaled_logreg", "classification", {}, seed=1) for _ in range(3))
    pa, pb = averageable(a).parameters, averageable(b).parameters
    _learn(a, left)
    _learn(b, right)
    _learn(whole, rows)
    wa, wb = a["LogisticRegression"].weights, b["LogisticRegression"].weights
    ia, ib = a["LogisticRegression"].intercept, b["LogisticRegression"].intercept
    merged = combine([pa.get(len(left)), pb.get(len(right))])
    pa.set(merged)
    model = a["LogisticRegression"]
    # exactly the arithmetic of combine: weighted mean of weights and intercept, scaler of both halves
    for k in ("x", "y"):
        assert model.weights[k] == pytest.approx((len(left) * wa[k] + len(right) * wb[k]) / len(rows), rel=1e-12)
    assert model.intercept == pytest.approx((len(left) * ia + len(right) * ib) / len(rows), rel=1e-12)
    data = np.array([[x["x"], x["y"]] for x, _ in rows])
    assert _scaler(a).means["x"] == pytest.approx(data[:, 0].mean(), rel=1e-9)
    assert _scaler(a).vars["y"] == pytest.approx(data[:, 1].var(), rel=1e-9)
    # and close to the model that learned the whole stream on its own
    test = _stream(1000, seed=8)
    p_avg = np.array([a.predict_proba_one(x)[True] for x, _ in test])
    p_one = np.array([whole.predict_proba_one(x)[True] for x, _ in test])
    labels = np.array([y for _, y in test])
    assert np.abs(p_avg - p_one).mean() < 0.05
    assert ((p_avg > 0.5) == labels).mean() >= 0.95 * ((p_one > 0.5) == labels).mean()


def test_sets_that_do_not_fit_together_are_refused_with_a_reason():
    a = build_model("scaled_logreg", "classification", {}, seed=1)
    pa = averageable(a).parameters
    _learn(a, _stream(20, seed=1))
    good = pa.get()
    with pytest.raises(ValueError, match="no parameter sets"):
        combine([])
    with pytest.raises(ValueError, match="weight"):
        combine([good, ParameterSet(-1.0, good.values, good.moments, good.base)])
    with pytest.raises(ValueError, match="base"):
        combine([good, ParameterSet(1.0, good.values, good.moments, "0" * 16)])
    with pytest.raises(ValueError, match="not the same model"):
        combine([good, ParameterSet(1.0, {}, good.moments, good.base)])
    bad = dict(good.values)
    bad["LogisticRegression.intercept"] = Values(np.array([np.nan]))
    with pytest.raises(ValueError, match="non-finite"):
        combine([good, ParameterSet(1.0, bad, good.moments, good.base)])
    with pytest.raises(ValueError, match="shape"):
        combine([TorchParameters(_net(1)[1]).get(),
                 ParameterSet(1.0, {"flat": Values(np.zeros(3, dtype=np.float32))})])
    with pytest.raises(ValueError, match="base"):
        pa.set(ParameterSet(1.0, good.values, good.moments, "0" * 16))
    with pytest.raises(ValueError, match="not a torch network"):
        TorchParameters(_net(1)[1]).set(good)


def test_a_replica_that_set_a_combination_refuses_sets_from_the_old_base():
    a, b = (build_model("scaled_logreg", "classification", {}, seed=1) for _ in range(2))
    pa, pb = averageable(a).parameters, averageable(b).parameters
    _learn(a, _stream(30, seed=1))
    _learn(b, _stream(30, seed=2))
    stale = pb.get()
    pa.set(combine([pa.get(), stale]))
    with pytest.raises(ValueError, match="base"):
        combine([pa.get(), stale])


def test_moments_merge_is_chan_for_counts_that_differ_per_feature():
    a = Moments(("x", "y"), np.array([2.0, 1.0]), np.array([1.0, 4.0]), np.array([0.25, 0.0]))
    b = Moments(("x",), np.array([2.0]), np.array([3.0]), np.array([1.0]))
    merged = combine([ParameterSet(1.0, moments={"s": a}), ParameterSet(1.0, moments={"s": b})]).moments["s"]
    # x: {0.5, 1.5} and {2, 4} together; y: only a saw it, left as a holds it
    assert merged.count.tolist() == [4.0, 1.0]
    assert merged.mean.tolist() == [2.0, 4.0]
    assert merged.var.tolist() == [pytest.approx(np.var([0.5, 1.5, 2.0, 4.0]), rel=1e-12), 0.0]
