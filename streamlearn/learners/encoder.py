"""Turns feature dicts into fixed-width vectors for a neural network, and scales them.

Columns are handed out on first sight and kept: numeric features get one column
each (up to `numeric_slots`), string values one one-hot column per `name=value`
(up to `string_slots`), and string values beyond that share `hash_buckets`
columns by a stable hash. The width never changes, so the network's input layer
does not either. `vectorize` gives raw values (a missing numeric is NaN);
`scale` standardizes numerics with running statistics from the examples learned
and imputes missing ones with the mean (0 after scaling). Replay buffers keep
raw rows, so a replayed example is scaled like a new one.

>>> enc = FeatureEncoder(numeric_slots=2, string_slots=2, hash_buckets=2)
>>> raw = enc.vectorize([{"x": 1.0, "colour": "red"}, {"x": 3.0}])
>>> enc.learn(raw)
>>> enc.scale(raw).round(2).tolist()
[[-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import zlib
from itertools import chain
from typing import Optional

import numpy as np

from streamlearn.records import Features


MAX_LAYOUTS = 1024


class RunningMoments:
    """Per-column running mean and variance, NaN meaning "not present" (Chan et al.'s parallel update).

    >>> m = RunningMoments(1); m.update(np.array([[1.0], [3.0]])); m.update(np.array([[np.nan]]))
    >>> m.mean.tolist(), m.standardize(np.array([[3.0]])).tolist()
    ([2.0], [[1.0]])
    """

    def __init__(self, width: int) -> None:
        self.count = np.zeros(width)
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)

    def update(self, values: np.ndarray) -> None:
        """Adds rows of `values` (columns beyond its width are left as they are)."""
        k = values.shape[1]
        values = values.astype(np.float64)
        sums = values.sum(axis=0)
        if not np.isnan(sums).any():   # the common case: no value missing (the decoder refuses infinities)
            n = float(len(values))
            batch_mean = sums / n
            batch_m2 = ((values - batch_mean) ** 2).sum(axis=0)
        else:
            present = ~np.isnan(values)
            n = present.sum(axis=0)
            batch_mean = np.nansum(values, axis=0) / np.maximum(n, 1)
            batch_m2 = np.nansum(np.where(present, (values - batch_mean) ** 2, 0.0), axis=0)
        count, mean = self.count[:k], self.mean[:k]
        total = count + n
        delta = batch_mean - mean
        safe = np.maximum(total, 1)
        self.mean[:k] = mean + delta * n / safe
        self.m2[:k] += batch_m2 + delta ** 2 * count * n / safe
        self.count[:k] = total

    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / np.maximum(self.count, 1))
        return np.where(std > 1e-8, std, 1.0)

    def standardize(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.std()).astype(np.float32)


class FeatureEncoder:
    """Feature dicts → float32 rows of width numeric_slots + string_slots + hash_buckets."""

    def __init__(self, numeric_slots: int = 256, string_slots: int = 256, hash_buckets: int = 256) -> None:
        self.numeric_slots, self.string_slots, self.hash_buckets = numeric_slots, string_slots, hash_buckets
        self.width = numeric_slots + string_slots + hash_buckets
        self.numeric: dict[str, int] = {}
        self.strings: dict[str, int] = {}
        self.moments = RunningMoments(numeric_slots)
        self.dropped = 0   # numeric features seen after every numeric column was taken
        self._layouts: dict[tuple, list[int]] = {}   # feature names in order -> their numeric columns
        self._shift = self._factor = None            # scaling, as of the last learn

    def vectorize(self, rows: list[Features], grow: bool = True) -> np.ndarray:
        """Raw rows; with `grow=False` (scoring only) features never seen are ignored, no column is handed out."""
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        out[:, :self.numeric_slots] = np.nan
        schemas = list(map(tuple, rows))   # rows of one schema (same names, same order) go in together
        if schemas and schemas.count(schemas[0]) == len(schemas):   # the usual case: one schema
            groups: dict[tuple, Optional[list[int]]] = {schemas[0]: None}
        else:
            groups = {}
            for i, names in enumerate(schemas):
                groups.setdefault(names, []).append(i)
        for names, members in groups.items():
            if not self._numeric_block(out, rows, names, members, grow):
                for i in members if members is not None else range(len(rows)):
                    self._one_by_one(out, i, rows[i], grow)
        return out

    def _numeric_block(self, out: np.ndarray, rows: list[Features], names: tuple, members: Optional[list[int]],
                       grow: bool) -> bool:
        """Writes rows (`members`, or all) whose features are all numeric in one numpy op; False when they are
        not (or do not fit)."""
        columns = self._layouts.get(names)
        if columns is None:
            if any(self.numeric.get(name) is None for name in names) and not grow:
                return False
            columns = [self._numeric_column(name, grow) for name in names]
            if None in columns:
                return False
            if len(self._layouts) < MAX_LAYOUTS:  # bounded: a stream of ever new schemas gains nothing here
                self._layouts[names] = columns
        chosen = rows if members is None else [rows[i] for i in members]
        try:
            values = np.fromiter(chain.from_iterable(map(dict.values, chosen)), np.float32, len(chosen) * len(names))
        except (TypeError, ValueError):   # a string among the values
            return False
        values = values.reshape(len(chosen), len(names))
        if members is None:
            out[:, columns] = values
        else:
            out[np.ix_(members, columns)] = values
        return True

    def _one_by_one(self, out: np.ndarray, i: int, features: Features, grow: bool) -> None:
        for name, value in features.items():
            if type(value) is str:
                col, value = self._string_column(name, value, grow), 1.0
            else:
                col = self._numeric_column(name, grow)
            if col is not None:
                out[i, col] = value

    def learn(self, raw: np.ndarray) -> None:
        """Adds a batch of raw rows to the running mean and variance of the numeric columns in use."""
        self.moments.update(raw[:, :len(self.numeric)])
        self._shift = self._factor = None

    def scale(self, raw: np.ndarray) -> np.ndarray:
        """Standardized numerics (missing or unused: 0), string columns as they are."""
        if self._shift is None:   # cached between learns: scaling is on every forward pass
            self._shift = self.moments.mean.astype(np.float32)
            self._factor = (1.0 / self.moments.std()).astype(np.float32)
        out = raw.copy()
        numeric = out[:, :self.numeric_slots]
        numeric -= self._shift
        numeric *= self._factor
        np.copyto(numeric, 0.0, where=~np.isfinite(numeric))   # missing (NaN) -> the mean
        return out

    def scaling(self) -> np.ndarray:
        """The numeric columns' scaling now, (2, numeric_slots): shift, factor (a copy, for `far_from`)."""
        return np.stack([self.moments.mean, 1.0 / self.moments.std()]).astype(np.float32)

    def _numeric_column(self, name: str, grow: bool):
        col = self.numeric.get(name)
        if col is None and grow:
            if len(self.numeric) >= self.numeric_slots:
                self.dropped += 1
                return None
            col = self.numeric[name] = len(self.numeric)
        return col

    def _string_column(self, name: str, value: str, grow: bool):
        key = f"{name}={value}"
        col = self.strings.get(key)
        if col is None:
            if not grow:
                return None
            if len(self.strings) < self.string_slots:
                col = self.strings[key] = self.numeric_slots + len(self.strings)
            else:  # a stable hash (not Python's, which changes per process)
                col = self.numeric_slots + self.string_slots + zlib.crc32(key.encode()) % self.hash_buckets
        return col


FAR_Z = 10.0        # standard deviations from a column's mean that no stationary input reaches (digits: 0 of 600)
FAR_COLUMNS = 2     # such columns in one row make it new ground (one alone is a rare value)


def far_from(raw: np.ndarray, scaling: np.ndarray) -> np.ndarray:
    """Rows with `FAR_COLUMNS` numeric values beyond `FAR_Z` standard deviations of `scaling` (new inputs).

    Measured on digits: 0 of 600 held-out rows of the same inputs, 599 of 600 under a pixel permutation.
    Missing values (NaN) are never far.

    >>> scaling = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    >>> far_from(np.array([[1.0, 2.0, 3.0], [11.0, 0.0, -12.0], [11.0, np.nan, 0.0]]), scaling).tolist()
    [False, True, False]
    """
    shift, factor = scaling
    numeric = raw[:, :len(shift)]
    with np.errstate(invalid="ignore"):
        far = np.abs((numeric - shift) * factor) > FAR_Z
    return far.sum(axis=1) >= FAR_COLUMNS


SAMPLE_ROWS = 200       # inputs from before a drift case that rows after it are compared with
MIN_SAMPLE = 20         # fewer say nothing: every row counts as familiar
NEAR_QUANTILE = 0.95    # a row farther from the sample than this share of the sample is from itself is new


def beyond_sample(rows: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Rows farther from their nearest `sample` row than 95% of the sample's rows are from theirs (scaled rows).

    New inputs, not new labels: measured on digits, 5-8% of held-out rows of the inputs the sample came from
    (one pixel permutation or a mix of three) are beyond it, and every row of a new permutation.

    Repeated rows count once (discrete inputs repeat: distances between distinct rows set the scale).

    >>> sample = np.array([[0.0, i / 4] for i in range(40)] * 2)
    >>> beyond_sample(np.array([[0.0, 2.1], [9.0, 9.0]]), sample).tolist()
    [False, True]
    """
    sample = np.unique(sample, axis=0)
    if len(sample) < MIN_SAMPLE:
        return np.zeros(len(rows), dtype=bool)
    own = _squared_distances(sample, sample)
    np.fill_diagonal(own, np.inf)
    bound = np.quantile(own.min(axis=1), NEAR_QUANTILE)
    return _squared_distances(rows, sample).min(axis=1) > bound


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)
