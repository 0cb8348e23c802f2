"""Parameters that replicas of one model can average: get them, set them, and how sets combine.

Each replica learns its own examples; at a sync every replica hands in its
`ParameterSet`, `combine` makes one of them all, and every replica `set`s it.
Two rules, one per kind of number:

- **Values** (a torch network's flat tensor; a River linear model's weights and
  intercept) combine by the mean weighted by each set's `weight` (the examples
  the replica learned since the last sync). Weights are keyed by feature name
  and aligned over the union of names; a replica that never saw a feature has
  no say in its weight (the mean is over the replicas that hold it). A keyed
  value may be an array (a torch input column's weights into every hidden unit):
  the keys run along its first axis.
- **Moments** (a River `StandardScaler`'s per-feature count, mean and variance)
  are running statistics, not estimates to average: counts add, means merge by
  count and variances by Chan et al.'s parallel formula, so the merged scaler
  holds what one scaler that saw every replica's stream would hold. Replicas
  share the statistics of the last sync (the base), so each hands in only what
  it learned since; its `base` fingerprint says which base, and sets over
  different bases are refused rather than counted twice.

Optimizer state (Adam's moments, River's SGD step count) stays local to each
replica: it is not averaged. A model with no rule (trees, kNN, ...) is refused by
`averageable` with the reason.

>>> from river import linear_model, preprocessing, tree
>>> a = preprocessing.StandardScaler() | linear_model.LogisticRegression()
>>> b = preprocessing.StandardScaler() | linear_model.LogisticRegression()
>>> pa, pb = averageable(a).parameters, averageable(b).parameters
>>> for x, y in [({"x": 1.0}, True), ({"x": 3.0}, False)]:
...     a.learn_one(x, y)
>>> b.learn_one({"x": 5.0}, True)
>>> merged = combine([pa.get(weight=2), pb.get(weight=1)])
>>> pa.set(merged); pb.set(merged)
>>> scaler = b["StandardScaler"]   # as if one scaler had seen 1, 3 and 5
>>> scaler.counts["x"], scaler.means["x"], round(scaler.vars["x"], 6)
(3, 3.0, 2.666667)
>>> averageable(tree.HoeffdingTreeClassifier()).reason
"HoeffdingTreeClassifier: a tree's structure cannot be averaged"
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Iterable, Mapping, NamedTuple, Protocol, runtime_checkable

import numpy as np
from river import base as river_base
from river import compose, linear_model, preprocessing, utils

from streamlearn.learners.features import StringOneHot

if TYPE_CHECKING:
    from streamlearn.learners.flat import FlatParameters

Keys = tuple[Hashable, ...]


@dataclass(frozen=True)
class Values:
    """Numbers combined by weighted mean: positional (`keys` None) or one row (first axis) per key in `keys`."""

    values: np.ndarray
    keys: Keys | None = None


@dataclass(frozen=True)
class Moments:
    """Per-feature running count, mean and population variance (ddof 0), as River's StandardScaler holds them."""

    keys: Keys
    count: np.ndarray
    mean: np.ndarray
    var: np.ndarray


@dataclass(frozen=True)
class ParameterSet:
    """One replica's averageable state: `values` to average by `weight`, `moments` learned since the base."""

    weight: float
    values: Mapping[str, Values] = field(default_factory=dict)
    moments: Mapping[str, Moments] = field(default_factory=dict)
    base: str = ""   # fingerprint of the moments at the last sync, shared by every replica


@runtime_checkable
class Averageable(Protocol):
    """A model's averageable parameters; sets from several replicas combine with `combine`."""

    def get(self, weight: float = 1.0) -> ParameterSet:
        """This replica's parameters, counting `weight` (examples learned since the last sync) in means."""
        ...

    def set(self, params: ParameterSet) -> None:
        """Replaces this replica's parameters with `params` (usually the `combine` of every replica's)."""
        ...


class Averaging(NamedTuple):
    """What `averageable` found: the parameters, or None and the one-line reason."""

    parameters: Averageable | None
    reason: str = ""


def combine(sets: list[ParameterSet]) -> ParameterSet:
    """One set of many: values by weighted mean over the union of keys, moments merged (Chan et al.).

    A total weight of 0 (no replica learned since the sync) counts every set equally.
    Raises ValueError for sets that do not fit together (names, shapes, bases) or hold non-finite numbers.
    """
    if not sets:
        raise ValueError("combine: no parameter sets")
    _check_fit(sets)
    weights = np.array([s.weight for s in sets], dtype=np.float64)
    values = {name: _weighted_mean(weights, [s.values[name] for s in sets]) for name in sets[0].values}
    moments = {name: _merge_moments([s.moments[name] for s in sets]) for name in sets[0].moments}
    return ParameterSet(weight=float(weights.sum()), values=values, moments=moments, base=sets[0].base)


def _check_fit(sets: list[ParameterSet]) -> None:
    first = sets[0]
    for i, s in enumerate(sets):
        if not (np.isfinite(s.weight) and s.weight >= 0):
            raise ValueError(f"combine: set {i} has weight {s.weight!r}; a weight is a finite count >= 0")
        if set(s.values) != set(first.values) or set(s.moments) != set(first.moments):
            raise ValueError(f"combine: set {i} holds {sorted(s.values) + sorted(s.moments)}, "
                             f"set 0 holds {sorted(first.values) + sorted(first.moments)}: not the same model")
        if s.base != first.base:
            raise ValueError(f"combine: set {i} was learned from base {s.base}, set 0 from {first.base}: "
                             "the replicas did not set the same parameters at their last sync")
        for name, v in s.values.items():
            if (v.keys is None) != (first.values[name].keys is None):
                raise ValueError(f"combine: {name!r} is keyed in one set and positional in another")
            if v.keys is None and v.values.shape != first.values[name].values.shape:
                raise ValueError(f"combine: {name!r} has shape {v.values.shape} in set {i}, "
                                 f"{first.values[name].values.shape} in set 0")
            if v.keys is not None and (v.values.shape[:1] != (len(v.keys),)
                                       or v.values.shape[1:] != first.values[name].values.shape[1:]):
                raise ValueError(f"combine: {name!r} of set {i} has shape {v.values.shape} for {len(v.keys)} keys, "
                                 f"set 0 {first.values[name].values.shape} for {len(first.values[name].keys)}")
            if not np.isfinite(v.values).all():
                raise ValueError(f"combine: {name!r} of set {i} holds non-finite values")
        for name, m in s.moments.items():
            if not all(np.isfinite(a).all() for a in (m.count, m.mean, m.var)):
                raise ValueError(f"combine: moments {name!r} of set {i} hold non-finite values")


def _weighted_mean(weights: np.ndarray, parts: list[Values]) -> Values:
    """Per column, sum of share x value, shares being the weights of the sets that hold the column, summing to 1."""
    dtype = parts[0].values.dtype
    if parts[0].keys is None:
        keys, rows, present = None, np.stack([p.values.astype(np.float64) for p in parts]), None
    else:
        keys = _union(p.keys for p in parts)
        rows, present = _scatter(keys, [(p.keys, p.values) for p in parts])
    if present is None:
        held = np.ones(rows.shape, dtype=bool)
    else:   # a key's row is held whole, along its trailing axes too
        held = np.broadcast_to(present.reshape(present.shape + (1,) * (rows.ndim - 2)), rows.shape)
    w = np.where(held, weights.reshape((-1,) + (1,) * (rows.ndim - 1)), 0.0)
    unweighted = w.sum(axis=0) == 0   # nobody learned since the sync: the holders count equally
    w = np.where(unweighted, held, w)
    shares = w / w.sum(axis=0)        # exactly 1.0 for a column only one set holds: its value comes back unchanged
    return Values(values=(shares * rows).sum(axis=0).astype(dtype), keys=keys)


def _merge_moments(parts: list[Moments]) -> Moments:
    """Folds the parts pairwise with Chan et al.'s formula; a feature a part never saw has count 0 there."""
    keys = _union(p.keys for p in parts)
    count, mean, var = (_scatter(keys, [(p.keys, getattr(p, a)) for p in parts])[0] for a in ("count", "mean", "var"))
    total = Moments(keys, count[0], mean[0], var[0])
    for i in range(1, len(parts)):
        total = _chan(total, Moments(keys, count[i], mean[i], var[i]))
    return total


def _chan(a: Moments, b: Moments) -> Moments:
    """The statistics of a's and b's observations together (same keys); where one side is empty, the other as is."""
    n = a.count + b.count
    safe = np.where(n > 0, n, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * b.count / safe
    m2 = a.var * a.count + b.var * b.count + delta ** 2 * a.count * b.count / safe
    var = m2 / safe
    mean = np.where(a.count == 0, b.mean, np.where(b.count == 0, a.mean, mean))
    var = np.where(a.count == 0, b.var, np.where(b.count == 0, a.var, var))
    return Moments(a.keys, n, mean, var)


def _since(now: Moments, base: Moments) -> Moments:
    """The statistics of the observations added to `base` to give `now` (Chan's formula solved for b)."""
    missing = set(base.keys) - set(now.keys)
    if missing:
        raise ValueError(f"statistics lost features since the last sync: {sorted(map(str, missing))[:5]}")
    b_count, b_mean, b_var = (_scatter(now.keys, [(base.keys, getattr(base, a))])[0][0]
                              for a in ("count", "mean", "var"))
    n = now.count - b_count
    if (n < 0).any():
        raise ValueError("statistics count fewer observations than at the last sync")
    safe = np.where(n > 0, n, 1.0)
    mean = b_mean + (now.mean - b_mean) * now.count / safe
    m2 = now.var * now.count - b_var * b_count - (now.mean - b_mean) ** 2 * now.count * b_count / safe
    var = np.maximum(m2, 0.0) / safe
    fresh = b_count == 0   # nothing to take away: exactly what `now` holds
    mean, var = np.where(fresh, now.mean, mean), np.where(fresh, now.var, var)
    kept = n > 0
    return Moments(tuple(k for k, keep in zip(now.keys, kept) if keep), n[kept], mean[kept], var[kept])


def _union(key_lists: Iterable[Keys]) -> Keys:
    """Every key once, in order of first appearance (so every replica gets the same order from the same sets)."""
    return tuple(dict.fromkeys(k for keys in key_lists for k in keys))


def _scatter(keys: Keys, parts: list[tuple[Keys, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows aligned on `keys` (0 where a part lacks a key; a key's value may have trailing axes) and which keys each
    part holds."""
    index = {k: i for i, k in enumerate(keys)}
    trailing = np.shape(parts[0][1])[1:] if parts else ()
    rows = np.zeros((len(parts), len(keys)) + trailing)
    present = np.zeros((len(parts), len(keys)), dtype=bool)
    for r, (part_keys, values) in enumerate(parts):
        cols = np.fromiter((index[k] for k in part_keys), dtype=np.intp, count=len(part_keys))
        rows[r, cols] = values
        present[r, cols] = True
    return rows, present


class TorchParameters:
    """A torch network's weights as its one flat tensor (`FlatParameters.param`), averaged as a whole.

    Only for networks whose inputs and outputs mean the same on every replica: a `TorchLearner`'s do not (its
    encoder hands out columns as names come), so its `parameters()` are `torch_averaging.TorchLearnerParameters`.
    The optimizer's state (Adam's moments) stays local.
    """

    def __init__(self, flat: FlatParameters) -> None:
        self.flat = flat

    def get(self, weight: float = 1.0) -> ParameterSet:
        """A copy of the flat tensor, on the CPU, in its own dtype."""
        values = self.flat.param.detach().cpu().numpy().copy()
        return ParameterSet(weight=float(weight), values={"flat": Values(values)})

    def set(self, params: ParameterSet) -> None:
        """Copies into the flat tensor in place, so that every layer's weight (a view of it) sees the new values."""
        import torch

        values = _only(params, "flat").values
        if values.shape != tuple(self.flat.param.shape):
            raise ValueError(f"flat parameters of shape {values.shape} for a network of {tuple(self.flat.param.shape)}")
        with torch.no_grad():
            self.flat.param.copy_(torch.from_numpy(values))


def _only(params: ParameterSet, name: str) -> Values:
    if set(params.values) != {name} or params.moments:
        raise ValueError(f"parameters {sorted(params.values) + sorted(params.moments)} are not a torch network's {name!r}")
    return params.values[name]


class RiverLinearParameters:
    """A River linear model's weights and intercept, and the statistics of the StandardScaler before it.

    Takes a `LinearRegression`/`LogisticRegression` (any GLM) or a pipeline of `StringOneHot`,
    `StandardScaler` and one GLM. Build it at a sync (or a fresh start), when every replica holds the
    same model: the scaler statistics of that moment are the base that later ones are measured from.
    SGD's state (its step count, L1's cumulated penalties) stays local.
    """

    def __init__(self, model) -> None:
        self.scalers, self.linear = _linear_parts(model)
        self._base = {name: _scaler_moments(s) for name, s in self.scalers.items()}

    def get(self, weight: float = 1.0) -> ParameterSet:
        """The weights keyed by feature, the intercept, and each scaler's statistics since the base."""
        values = {}
        for name, glm in self.linear.items():
            weights = glm._weights.to_dict()
            keys = tuple(weights)
            values[f"{name}.weights"] = Values(np.fromiter(weights.values(), np.float64, len(keys)), keys)
            values[f"{name}.intercept"] = Values(np.array([float(glm.intercept)]))
        moments = {name: _since(_scaler_moments(s), self._base[name]) for name, s in self.scalers.items()}
        return ParameterSet(weight=float(weight), values=values, moments=moments, base=_fingerprint(self._base))

    def set(self, params: ParameterSet) -> None:
        """Writes the weights and intercept; each scaler gets its base merged with the statistics since."""
        expected = self.get(0.0)
        if set(params.values) != set(expected.values) or set(params.moments) != set(expected.moments):
            raise ValueError(f"parameters {sorted(params.values) + sorted(params.moments)} are not this model's "
                             f"{sorted(expected.values) + sorted(expected.moments)}")
        if params.base != expected.base:
            raise ValueError(f"parameters learned from base {params.base}, this replica's is {expected.base}")
        for name, glm in self.linear.items():
            weights = params.values[f"{name}.weights"]
            glm._weights = utils.VectorDict({k: float(v) for k, v in zip(weights.keys, weights.values)})
            glm.intercept = float(params.values[f"{name}.intercept"].values[0])
        for name, scaler in self.scalers.items():
            merged = _merge_moments([self._base[name], params.moments[name]])
            _write_scaler(scaler, merged)
            self._base[name] = merged


def _linear_parts(model) -> tuple[dict, dict]:
    """The pipeline's scalers and linear models by step name; `Unaverageable` naming any other step."""
    steps = model.steps.items() if isinstance(model, compose.Pipeline) else [(type(model).__name__, model)]
    scalers, linear = {}, {}
    for name, step in steps:
        if isinstance(step, StringOneHot):
            continue   # stateless: nothing to average
        if isinstance(step, preprocessing.StandardScaler) and step.window_size is None:
            scalers[str(name)] = step
        elif isinstance(step, linear_model.base.GLM) and not linear:
            linear[str(name)] = step
        else:
            raise Unaverageable(_reason(step))
    if not linear:
        raise Unaverageable(f"{type(model).__name__}: no linear model to average")
    return scalers, linear


class Unaverageable(ValueError):
    """A model, or a step of it, that has no averaging rule; the message is the reason."""


def _reason(step) -> str:
    """One line on why `step` cannot be averaged."""
    name = type(step).__name__
    module = type(step).__module__
    if module.startswith(("river.tree", "river.forest")) or "Tree" in name:
        return f"{name}: a tree's structure cannot be averaged"
    if module.startswith("river.neighbors"):
        return f"{name}: a neighbours model's stored examples cannot be averaged"
    if isinstance(step, preprocessing.StandardScaler):
        return f"{name}: a windowed scaler's statistics cannot be merged (its window is a list of examples)"
    if isinstance(step, linear_model.base.GLM):
        return f"{name}: only one linear model per pipeline can be averaged"
    return (f"{name}: no averaging rule (averageable: torch networks; River GLMs after StringOneHot"
            " and StandardScaler steps)")


def _scaler_moments(scaler: preprocessing.StandardScaler) -> Moments:
    keys = tuple(scaler.counts)
    return Moments(keys=keys,
                   count=np.array([float(scaler.counts[k]) for k in keys]),
                   mean=np.array([float(scaler.means.get(k, 0.0)) for k in keys]),
                   var=np.array([float(scaler.vars.get(k, 0.0)) for k in keys]))


def _write_scaler(scaler: preprocessing.StandardScaler, m: Moments) -> None:
    """Replaces the scaler's statistics with `m` (counts back to ints, as River keeps them)."""
    scaler.counts = Counter({k: int(round(c)) for k, c in zip(m.keys, m.count)})
    scaler.means = defaultdict(float, {k: float(v) for k, v in zip(m.keys, m.mean)})
    scaler.vars = defaultdict(float, {k: float(v) for k, v in zip(m.keys, m.var)} if scaler.with_std else {})


def _fingerprint(bases: Mapping[str, Moments]) -> str:
    """A short hash of the base statistics: equal on replicas that set the same parameters at the last sync."""
    digest = hashlib.sha256()
    for name in sorted(bases):
        m = bases[name]
        digest.update(repr((name, m.keys)).encode())
        for array in (m.count, m.mean, m.var):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def averageable(part) -> Averaging:
    """The averageable parameters of a River model or a torch learner's `FlatParameters`, or why there are none."""
    if isinstance(part, river_base.Base):
        try:
            return Averaging(RiverLinearParameters(part))
        except Unaverageable as err:
            return Averaging(None, str(err))
    from streamlearn.learners.flat import FlatParameters   # here: River-only users need not import torch

    if isinstance(part, FlatParameters):
        return Averaging(TorchParameters(part))
    return Averaging(None, f"{type(part).__name__}: neither a River model nor a torch network's FlatParameters")
