"""A replica's averageable parameters as bytes, and back: msgpack of plain numbers, never a pickle.

What one replica sends the others at a sync: for each model its `ParameterSet`
(weight, values, moments, base). Arrays travel as raw little-endian bytes with
their dtype and shape, and only numeric dtypes are accepted back; keys (feature
names, class labels) as strings, numbers or booleans, each keeping its type (the
string "1" is not the number 1), or tuples of those (a weight that belongs to an
input column and an output unit). Bytes that do not decode to that shape are refused
with `WireError`, so a replica never builds anything but numbers from its peers.

>>> import numpy as np
>>> from streamlearn.learners.averaging import ParameterSet, Values
>>> sets = {"default": ParameterSet(2.0, {"w": Values(np.array([0.5, 1.5]), ("x", "y"))})}
>>> back = decode_sets(encode_sets(sets))
>>> back["default"].weight, back["default"].values["w"].keys, back["default"].values["w"].values.tolist()
(2.0, ('x', 'y'), [0.5, 1.5])
>>> decode_sets(b"\\x91\\x01")
Traceback (most recent call last):
...
streamlearn.cluster.wire.WireError: parameters from a replica do not decode: Expected `object`, got `array`
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import msgspec
import numpy as np

from streamlearn.learners.averaging import Moments, ParameterSet, Values

Scalar = Union[str, int, float, bool]
Key = Union[str, int, float, bool, tuple[Scalar, ...]]
NUMERIC_KINDS = "biuf"   # bool, signed and unsigned integers, floats: nothing else is rebuilt from a peer's bytes


class WireError(ValueError):
    """Bytes from a replica that are not parameter sets."""


class Array(msgspec.Struct, array_like=True):
    dtype: str          # numpy's name of it, e.g. "<f4"
    shape: list[int]
    data: bytes


class WireValues(msgspec.Struct, array_like=True):
    values: Array
    keys: Optional[list[Key]] = None


class WireMoments(msgspec.Struct, array_like=True):
    keys: list[Key]
    count: Array
    mean: Array
    var: Array


class WireSet(msgspec.Struct):
    weight: float
    values: dict[str, WireValues] = {}
    moments: dict[str, WireMoments] = {}
    base: str = ""


class Layout(msgspec.Struct, array_like=True):
    """A positional array that travels by all-reduce, not in the gathered bytes: its dtype and shape."""

    dtype: str
    shape: list[int]


class SyncHeader(msgspec.Struct):
    """What a replica gathers at a sync: per model, its keyed values and moments (`keyed`), and the layout of its
    positional values (`positional`), which are summed by an all-reduce instead."""

    keyed: dict[str, WireSet]
    positional: dict[str, dict[str, Layout]]


_decoder = msgspec.msgpack.Decoder(dict[str, WireSet])
_header_decoder = msgspec.msgpack.Decoder(SyncHeader)


def encode_sets(sets: Mapping[str, ParameterSet]) -> bytes:
    """Each model's parameter set (by model name) as one msgpack document."""
    return msgspec.msgpack.encode({name: _wire_set(s) for name, s in sets.items()})


def decode_sets(data: bytes) -> dict[str, ParameterSet]:
    """The parameter sets `encode_sets` wrote; `WireError` for anything else."""
    try:
        wire = _decoder.decode(data)
        return {name: _parameter_set(s) for name, s in wire.items()}
    except (msgspec.DecodeError, TypeError, ValueError) as err:
        raise WireError(f"parameters from a replica do not decode: {err}") from None


def encode_header(keyed: Mapping[str, ParameterSet], positional: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """A replica's `SyncHeader`: its keyed sets whole, its positional arrays by layout only."""
    layouts = {model: {name: Layout(np.dtype(a.dtype).str, list(a.shape)) for name, a in arrays.items()}
               for model, arrays in positional.items()}
    return msgspec.msgpack.encode(SyncHeader({n: _wire_set(s) for n, s in keyed.items()}, layouts))


def decode_header(data: bytes) -> tuple[dict[str, ParameterSet], dict[str, dict[str, tuple[str, tuple[int, ...]]]]]:
    """The keyed sets and the positional layouts (model -> value name -> (dtype, shape)) of a `SyncHeader`."""
    try:
        header = _header_decoder.decode(data)
        layouts = {model: {name: (np.dtype(lay.dtype).str, tuple(lay.shape)) for name, lay in arrays.items()}
                   for model, arrays in header.positional.items()}
        if any(np.dtype(d).kind not in NUMERIC_KINDS for arrays in layouts.values() for d, _ in arrays.values()):
            raise ValueError("a positional array is not numeric")
        return {name: _parameter_set(s) for name, s in header.keyed.items()}, layouts
    except (msgspec.DecodeError, TypeError, ValueError) as err:
        raise WireError(f"parameters from a replica do not decode: {err}") from None


def _wire_set(s: ParameterSet) -> WireSet:
    return WireSet(
        float(s.weight),
        {name: WireValues(_array(v.values), None if v.keys is None else list(v.keys)) for name, v in s.values.items()},
        {name: WireMoments(list(m.keys), _array(m.count), _array(m.mean), _array(m.var)) for name, m in s.moments.items()},
        s.base)


def _parameter_set(w: WireSet) -> ParameterSet:
    return ParameterSet(
        w.weight,
        {name: Values(_numbers(v.values), None if v.keys is None else tuple(v.keys)) for name, v in w.values.items()},
        {name: Moments(tuple(m.keys), _numbers(m.count), _numbers(m.mean), _numbers(m.var))
         for name, m in w.moments.items()},
        w.base)


def _array(a: np.ndarray) -> Array:
    a = np.asarray(a)
    if a.dtype.kind not in NUMERIC_KINDS:
        raise TypeError(f"only numeric arrays travel between replicas, not {a.dtype}")
    little = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return Array(little.dtype.str, list(a.shape), np.ascontiguousarray(little).tobytes())


def _numbers(a: Array) -> np.ndarray:
    dtype = np.dtype(a.dtype)
    if dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"dtype {a.dtype} is not numeric")
    count = int(np.prod(a.shape, dtype=np.int64))
    if count * dtype.itemsize != len(a.data):
        raise ValueError(f"{len(a.data)} bytes for shape {a.shape} of {a.dtype}")
    return np.frombuffer(a.data, dtype=dtype).reshape(a.shape).copy()
