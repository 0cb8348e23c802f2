"""A torch learner's averageable parameters, keyed by what each input column and output unit stands for.

A `TorchLearner`'s encoder hands out input columns as feature names first appear,
and the learner hands out output units as class labels first appear, so two
replicas that saw names and labels in different orders lay out their networks
differently: averaging the flat tensors position by position would mix unrelated
weights. So `TorchLearnerParameters.get` hands in:

- `<layer>.weight:numeric|strings|hashed`: the weights of each input column of
  every layer that takes the network's input (the first `nn.Linear` of an `mlp`),
  one row per column, keyed by the numeric feature's name, the one-hot column's
  `name=value`, or the hash bucket's index (the same bucket on every replica);
- `<layer>.weight:classes`, `<layer>.bias:classes` (classification): each output
  unit's weights and bias, keyed by class label. A layer that is both (no hidden
  layer) keys each weight by the pair (column key, label);
- `rest`: every other number, positional (the same layout on every replica);
- moments `scaling` (each numeric column's running statistics, by feature name)
  and, for regression, `targets`: what was learned since the base, as
  `RiverLinearParameters` does (the base is the statistics when this was built
  or last set).

Keys go sorted (by type name, then key), not in slot order, so that replicas
holding one model hand in the same bytes and base fingerprint. Labels keep their
type across the wire: "1" and 1 are two classes (1 and True are one, as in the
learner's own index). Columns and units not handed out yet are left out: their
input is always 0, or their output is never read. `set` hands out the columns and
units this replica lacks, in the merged key order, and writes every keyed value
into this replica's own slot for it: slots never move (the replay buffer keeps
raw rows in this layout), so after `set` replicas compute the same function with
different layouts. Optimizer state, EWC and the drift policy's references stay
local.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from streamlearn.learners.averaging import (
    Averaging, Keys, Moments, ParameterSet, Values, _fingerprint, _merge_moments, _since, _union,
)
from streamlearn.learners.encoder import FeatureEncoder, RunningMoments

if TYPE_CHECKING:
    from streamlearn.learners.torch_learner import TorchLearner

GROUPS = ("numeric", "strings", "hashed")   # the encoder's kinds of input column, in slot order
TARGET = "target"                           # the one key of the regression targets' moments


class Entry(NamedTuple):
    """One keyed tensor: a layer's weight or bias, its input-column group (None: not by column), by unit or not."""

    name: str
    tensor: torch.Tensor   # a view of the flat parameter
    group: Optional[str]
    units: bool


def torch_learner_parameters(learner: "TorchLearner") -> Averaging:
    """The learner's `TorchLearnerParameters`, or why its network's weights cannot be keyed."""
    try:
        return Averaging(TorchLearnerParameters(learner))
    except ValueError as err:
        return Averaging(None, str(err))


class TorchLearnerParameters:
    """A whole `TorchLearner`: network weights keyed by input column and class, encoder and target statistics.

    Build it at a sync (or a fresh start), when every replica holds the same model: the statistics of that moment
    are the base that later ones are measured from.
    """

    def __init__(self, learner: "TorchLearner") -> None:
        self.learner = learner
        self.entries, self.rest = _layout(learner)
        self._base = self._moments()

    def get(self, weight: float = 1.0) -> ParameterSet:
        """Keyed weights, the positional rest, and the statistics learned since the base."""
        columns, units = self._columns(), self._units()
        values = {e.name: _read(e, columns.get(e.group, {}), units) for e in self.entries}
        values["rest"] = Values(self.learner.flat.param.detach()[self.rest].cpu().numpy().copy())
        moments = {name: _since(now, self._base[name]) for name, now in self._moments().items()}
        return ParameterSet(weight=float(weight), values=values, moments=moments, base=_fingerprint(self._base))

    def set(self, params: ParameterSet) -> None:
        """Hands out the columns and units new here, writes every value into its slot, and replaces the statistics.

        Raises ValueError, changing nothing, for another model's parameters or when the new keys do not fit.
        """
        self._check(params)
        new_columns, new_labels = self._new_keys(params)
        for group, keys in new_columns.items():
            _hand_out(self.learner.encoder, group, keys)
        for label in new_labels:
            self.learner._class_of(label)
        columns, units = self._columns(), self._units()
        with torch.no_grad():
            before = self.learner.flat.param.detach().clone()
            for e in self.entries:
                _write(e, params.values[e.name], columns.get(e.group, {}), units)
            rest = torch.from_numpy(np.ascontiguousarray(params.values["rest"].values))
            self.learner.flat.param.data[self.rest] = rest.to(self.learner.flat.param.dtype)
            # EWC's anchor moves with the weights: the penalty keeps what this replica consolidated relative to
            # the average, rather than pulling the averaged weights back to this replica's own.
            self.learner.ewc.anchor.add_(self.learner.flat.param.detach() - before)
        merged = {name: _merge_moments([base, params.moments[name]]) for name, base in self._base.items()}
        _write_moments(self.learner.encoder.moments, merged["scaling"], self.learner.encoder.numeric)
        self.learner.encoder._shift = self.learner.encoder._factor = None   # its cached scaling is stale now
        if "targets" in merged:
            _write_moments(self.learner.targets, merged["targets"], {TARGET: 0})
        self._base = self._moments()

    def _check(self, params: ParameterSet) -> None:
        """ValueError when `params` are not this model's: other names, base or shapes."""
        names = sorted(e.name for e in self.entries) + ["rest"]
        if sorted(params.values) != names or sorted(params.moments) != sorted(self._base):
            raise ValueError(f"parameters {sorted(params.values) + sorted(params.moments)} are not this torch "
                             f"model's {names + sorted(self._base)}")
        if params.base != _fingerprint(self._base):
            raise ValueError(f"parameters learned from base {params.base}, this replica's is "
                             f"{_fingerprint(self._base)}")
        mine = self.get(0.0).values
        for name, v in params.values.items():
            fits = (v.values.shape == mine[name].values.shape if v.keys is None else
                    mine[name].keys is not None and v.values.shape[:1] == (len(v.keys),)
                    and v.values.shape[1:] == mine[name].values.shape[1:])
            if not fits:
                raise ValueError(f"parameters {name!r} of shape {v.values.shape} ({_count(v.keys)} keys), this "
                                 f"network's are {mine[name].values.shape} ({_count(mine[name].keys)} keys)")
        for e in self.entries:
            if e.group is not None and e.units and not all(type(k) is tuple and len(k) == 2
                                                           for k in params.values[e.name].keys):
                raise ValueError(f"parameters {e.name!r} are not keyed by (input column, class label) pairs")
        if "targets" in params.moments and set(params.moments["targets"].keys) - {TARGET}:
            raise ValueError(f"target statistics keyed {params.moments['targets'].keys}, not ({TARGET!r},)")

    def _new_keys(self, params: ParameterSet) -> tuple[dict[str, list], list]:
        """The input-column keys (by group) and labels in `params` this replica lacks, in their order there;
        ValueError if they do not fit in the slots left."""
        wanted: dict[str, list[Keys]] = {group: [] for group in GROUPS}
        labels: list[Keys] = []
        for e in self.entries:
            keys = params.values[e.name].keys
            if e.group is not None:
                wanted[e.group].append(tuple(k[0] for k in keys) if e.units else keys)
            if e.units:
                labels.append(tuple(k[1] for k in keys) if e.group is not None else keys)
        wanted["numeric"].append(params.moments["scaling"].keys)
        columns = self._columns()
        new = {group: [k for k in _union(lists) if k not in columns[group]] for group, lists in wanted.items()}
        new_labels = [label for label in _union(labels) if label not in self.learner._class_index]
        _check_keys(self.learner, new, new_labels)
        return new, new_labels

    def _columns(self) -> dict[str, dict[Hashable, int]]:
        """Each group's handed-out columns, key -> slot, sorted by key (so that replicas holding the same model
        hand in the same bytes, whatever their slots: `EpochSync.summary` digests them)."""
        enc = self.learner.encoder
        first_bucket = enc.numeric_slots + enc.string_slots
        return {"numeric": _sorted(enc.numeric), "strings": _sorted(enc.strings),
                "hashed": {b: first_bucket + b for b in range(enc.hash_buckets)}}

    def _units(self) -> dict[Hashable, int]:
        """The handed-out output units, label -> unit, sorted by label (type name first: labels mix types)."""
        return _sorted(self.learner._class_index)

    def _moments(self) -> dict[str, Moments]:
        """The scaling statistics by feature name, and (regression) the targets', of columns that saw a value."""
        enc = self.learner.encoder
        moments = {"scaling": _read_moments(enc.moments, enc.numeric)}
        if self.learner.task == "regression":
            moments["targets"] = _read_moments(self.learner.targets, {TARGET: 0})
        return moments


def _sorted(slots: dict) -> dict:
    return dict(sorted(slots.items(), key=lambda item: (type(item[0]).__name__, item[0])))


def _count(keys: Optional[Keys]) -> str:
    return "no" if keys is None else str(len(keys))


def _layout(learner: "TorchLearner") -> tuple[list[Entry], torch.Tensor]:
    """The keyed entries of the learner's network and the mask of its flat parameter's positional rest."""
    classify = learner.task == "classification"
    inputs, output = _input_output_layers(learner.net, learner.encoder.width, learner.flat.param.dtype)
    entries, keyed = [], []
    for name, layer in inputs:
        shared = classify and output is not None and layer is output[1]
        entries += [Entry(f"{name}.weight:{group}", layer.weight, group, shared) for group in GROUPS]
        keyed.append(layer.weight)
    if classify:
        if output is None:
            raise ValueError(f"{learner.config.model}: no nn.Linear layer gives the network's output as is: its output "
                             "units cannot be keyed by class label")
        name, layer = output
        if not any(e.tensor is layer.weight for e in entries):
            entries.append(Entry(f"{name}.weight:classes", layer.weight, None, True))
            keyed.append(layer.weight)
        if layer.bias is not None:
            entries.append(Entry(f"{name}.bias:classes", layer.bias, None, True))
            keyed.append(layer.bias)
    rest = torch.ones(learner.flat.param.numel(), dtype=torch.bool)
    offset = 0
    for p in learner.flat._params:
        if any(p is k for k in keyed):
            rest[offset:offset + p.numel()] = False
        offset += p.numel()
    return entries, rest


def _input_output_layers(net: nn.Module, width: int, dtype: torch.dtype) -> tuple[list, Optional[tuple]]:
    """The `nn.Linear` layers that take the network's input as is, and the one whose output the network returns.

    Found by one forward pass of a zero row in eval mode (global random state kept); ValueError without an input
    layer: the weights of an input column could not be told apart.
    """
    seen_in: dict[str, nn.Linear] = {}
    seen_out: list[tuple[str, nn.Linear, torch.Tensor]] = []   # outputs held, so that `is` below is sound
    x = torch.zeros(1, width, dtype=dtype)

    def record(name: str, module: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        if args and args[0] is x:
            seen_in.setdefault(name, module)
        seen_out.append((name, module, out))

    hooks = [module.register_forward_hook(lambda m, args, out, name=name: record(name, m, args, out))
             for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    training = net.training
    try:
        net.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            result = net(x)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(training)
    if not seen_in:
        raise ValueError(f"{type(net).__name__}: no nn.Linear layer takes the network's input as is: the weights of "
                         "an input column (handed out in another order on each replica) cannot be told apart")
    output = next(((name, module) for name, module, out in reversed(seen_out) if out is result), None)
    return [_named(*layer) for layer in seen_in.items()], output and _named(*output)


def _named(name: str, module: nn.Linear) -> tuple[str, nn.Linear]:
    return name or "net", module   # "": the network itself is the layer


def _read(entry: Entry, columns: dict, units: dict) -> Values:
    """The entry's numbers of the handed-out columns and units, keyed (pairs where it is keyed by both)."""
    t = entry.tensor.detach().cpu().numpy()
    cols = np.fromiter(columns.values(), np.intp, len(columns))
    rows = np.fromiter(units.values(), np.intp, len(units))
    if entry.group is not None and entry.units:
        block = t[np.ix_(rows, cols)].T   # (columns, units)
        return Values(block.reshape(-1).copy(), tuple((c, u) for c in columns for u in units))
    if entry.group is not None:
        return Values(t[:, cols].T.copy(), tuple(columns))
    return Values(t[rows].copy(), tuple(units))


def _write(entry: Entry, values: Values, columns: dict, units: dict) -> None:
    """Writes each keyed number into this replica's slot for its key (the keys have slots here by now)."""
    t = entry.tensor
    data = torch.from_numpy(np.ascontiguousarray(values.values)).to(t.dtype)
    if entry.group is not None and entry.units:
        # A pair no replica held (its column new on one, its unit on another) never learned anything: 0 on every
        # replica, rather than each one's own initial value, so that they compute the same function.
        held_rows = torch.tensor(list(units.values()), dtype=torch.long)
        held_cols = torch.tensor(list(columns.values()), dtype=torch.long)
        t[held_rows[:, None], held_cols[None, :]] = 0.0
        rows = torch.tensor([units[k[1]] for k in values.keys], dtype=torch.long)
        cols = torch.tensor([columns[k[0]] for k in values.keys], dtype=torch.long)
        t[rows, cols] = data
    elif entry.group is not None:
        t[:, torch.tensor([columns[k] for k in values.keys], dtype=torch.long)] = data.T
    else:
        t[torch.tensor([units[k] for k in values.keys], dtype=torch.long)] = data


def _check_keys(learner: "TorchLearner", new: dict[str, list], labels: list) -> None:
    """ValueError (one line) when new keys are of the wrong type or do not fit in the slots left."""
    enc = learner.encoder
    if any(type(k) is not str for k in new["numeric"] + new["strings"]):
        raise ValueError("parameters key an input column by something other than a feature name")
    if new["hashed"]:
        raise ValueError(f"parameters hold hash buckets {new['hashed'][:5]} beyond this encoder's "
                         f"{enc.hash_buckets}")
    room = [("numeric features", "encoder.numeric_slots", new["numeric"], enc.numeric_slots - len(enc.numeric)),
            ("one-hot string values", "encoder.string_slots", new["strings"], enc.string_slots - len(enc.strings)),
            ("class labels", "train.max_classes", labels, learner.config.train.max_classes - len(learner.classes))]
    for what, setting, keys, left in room:
        if len(keys) > left:
            raise ValueError(f"{len(keys)} {what} new to this replica ({', '.join(map(repr, keys[:3]))}, ...) do not "
                             f"fit in the {left} slots left of {setting}")


def _hand_out(enc: FeatureEncoder, group: str, keys: list) -> None:
    """Gives each key the next free column of its group, as the encoder does on first sight (room checked)."""
    for key in keys:
        if group == "numeric":
            enc.numeric[key] = len(enc.numeric)
        else:
            enc.strings[key] = enc.numeric_slots + len(enc.strings)


def _read_moments(moments: RunningMoments, slots: dict) -> Moments:
    """Count, mean and population variance of the columns in `slots` that saw a value, sorted by key (the same
    order on every replica, whatever their slots)."""
    keys = tuple(sorted(k for k, s in slots.items() if moments.count[s] > 0))
    at = [slots[k] for k in keys]
    count = moments.count[at]
    return Moments(keys, count.copy(), moments.mean[at].copy(), moments.m2[at] / np.maximum(count, 1))


def _write_moments(moments: RunningMoments, merged: Moments, slots: dict) -> None:
    """Replaces the running statistics with `merged` (a column it does not hold has seen nothing)."""
    for array in (moments.count, moments.mean, moments.m2):
        array[:] = 0.0
    at = [slots[k] for k in merged.keys]
    moments.count[at] = merged.count
    moments.mean[at] = merged.mean
    moments.m2[at] = merged.var * merged.count
