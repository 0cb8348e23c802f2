"""Each replay buffer's sampling property, measured over many seeded runs (no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from streamlearn.replay.class_balanced import ClassBalancedBuffer
from streamlearn.replay.reservoir import ReservoirBuffer
from streamlearn.replay.time_decayed import TimeDecayedBuffer


def stream(n: int, labels=None):
    x = np.arange(n, dtype=np.float32).reshape(-1, 1)
    y = np.zeros(n, dtype=np.float32) if labels is None else np.asarray(labels, dtype=np.float32)
    return x, y, np.arange(n, dtype=float)


@pytest.mark.parametrize("batch", [3, 64])
def test_reservoir_keeps_every_example_with_the_same_probability(batch):
    n, capacity, trials = 400, 40, 500
    kept = np.zeros(n)
    for seed in range(trials):
        buffer = ReservoirBuffer(capacity, dim=1, seed=seed)
        x, y, ts = stream(n)
        for start in range(0, n, batch):
            buffer.add(x[start:start + batch], y[start:start + batch], ts[start:start + batch])
        assert buffer.store.size == capacity and buffer.seen == n
        kept[buffer.store.x[:, 0].astype(int)] += 1
    share = kept / trials                      # each should be capacity / n = 0.1
    for quarter in np.split(share, 4):         # old and new alike: 20,000 draws per quarter, sd ≈ 0.002
        assert abs(quarter.mean() - capacity / n) < 0.01


def test_reservoir_samples_uniformly_from_what_it_holds():
    buffer = ReservoirBuffer(50, dim=1, seed=3)
    buffer.add(*stream(50))
    counts = np.bincount(buffer.sample(50_000), minlength=50)
    assert counts.min() > 800 and counts.max() < 1200   # 1,000 expected each


def test_class_balanced_gives_rare_and_late_classes_an_equal_share():
    labels = [0] * 2000 + [1] * 300 + [2] * 40 + [3] * 25   # class-incremental and imbalanced
    buffer = ClassBalancedBuffer(capacity=100, dim=1, seed=0)
    x, y, ts = stream(len(labels), labels)
    for start in range(0, len(labels), 32):
        buffer.add(x[start:start + 32], y[start:start + 32], ts[start:start + 32])
    held = np.bincount(buffer.store.y.astype(int), minlength=4)
    assert held.sum() == 100
    assert held.tolist() == [25, 25, 25, 25]


def test_class_balanced_is_a_reservoir_within_each_class():
    kept = np.zeros(600)
    for seed in range(150):
        buffer = ClassBalancedBuffer(capacity=20, dim=1, seed=seed)
        buffer.add(*stream(600, [i % 2 for i in range(600)]))
        kept[buffer.store.x[:, 0].astype(int)] += 1
    share = kept / 150                          # 10 rows per class of 300: 1/30 each
    for quarter in np.split(share, 4):          # 22,500 draws per quarter, sd ≈ 0.0012
        assert abs(quarter.mean() - 1 / 30) < 0.006


def test_time_decayed_holds_the_last_window_and_weights_by_age():
    buffer = TimeDecayedBuffer(capacity=200, dim=1, half_life=20, seed=1)
    x, y, ts = stream(1000)
    for start in range(0, 1000, 50):
        buffer.add(x[start:start + 50], y[start:start + 50], ts[start:start + 50])
    assert sorted(buffer.store.x[:, 0].astype(int).tolist()) == list(range(800, 1000))
    ages = 999 - buffer.store.x[buffer.sample(100_000), 0]
    observed = np.bincount((ages // 20).astype(int), minlength=10)[:4] / 100_000
    expected = 0.5 ** np.arange(4) * (1 - 2 ** (-1)) / (1 - 2 ** (-10))  # halving per half-life
    assert np.allclose(observed, expected, atol=0.01)


@pytest.mark.parametrize("kind", [ReservoirBuffer, ClassBalancedBuffer, TimeDecayedBuffer])
def test_a_restored_buffer_continues_exactly(kind):
    x, y, ts = stream(300, [i % 3 for i in range(300)])
    a, b = kind(50, dim=1, seed=9), kind(50, dim=1, seed=123)
    a.add(x[:150], y[:150], ts[:150])
    b.load({k: v.copy() for k, v in a.arrays().items()})
    for buffer in (a, b):
        buffer.add(x[150:], y[150:], ts[150:])
    assert np.array_equal(a.store.x, b.store.x) and np.array_equal(a.sample(20), b.sample(20))
