"""Two replicas average their parameters over torch.distributed (gloo on loopback): both end with the same model.

Each replica is its own process, as in production: it learns its own examples into a
River `StandardScaler | LogisticRegression` and a torch MLP, hands both parameter sets to
`ReplicaGroup.average`, and sets the result. Both must hold the same parameters after,
equal to `combine` of the two sets computed here; a sync of mismatched models is refused
on every replica.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import numpy as np
import pytest

from streamlearn.cluster.wire import Array, WireError, WireSet, WireValues, decode_sets, encode_sets
from streamlearn.learners.averaging import combine
from streamlearn.stream.broker import free_port

WORKER = textwrap.dedent('''
    import random, sys
    import torch
    from streamlearn.cluster.group import ReplicaGroup, ReplicaMismatch
    from streamlearn.cluster.wire import encode_sets
    from streamlearn.learners.averaging import averageable
    from streamlearn.learners.flat import FlatParameters
    from streamlearn.learners.models import build_model
    from streamlearn.learners.networks import mlp

    rank, port, out, mismatch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    rng = random.Random(rank)
    model = build_model("scaled_logreg", "classification", {}, seed=1)
    river = averageable(model).parameters          # built before learning: the shared base of the scaler
    for _ in range(200 + 100 * rank):               # each replica its own examples, and features of its own
        x = {"a": rng.gauss(rank, 1), "b": rng.gauss(0, 2), f"only{rank}": rng.random()}
        model.learn_one(x, x["a"] + x["b"] > rank)
    torch.manual_seed(rank)
    flat = FlatParameters(mlp(4, 2, [8]))
    net = averageable(flat).parameters
    sets = {"river": river.get(weight=200 + 100 * rank), "torch": net.get(weight=1 + rank)}
    if mismatch and rank == 1:
        sets["extra"] = net.get(weight=1)
    open(out + ".mine", "wb").write(encode_sets(sets))
    group = ReplicaGroup(rank, 2, init_method=f"tcp://127.0.0.1:{port}", timeout=60)
    try:
        merged = group.average(sets)
    except ReplicaMismatch as err:
        open(out + ".refused", "w").write(str(err))
        sys.exit(0)
    finally:
        group.close()
    river.set(merged["river"]); net.set(merged["torch"])
    open(out, "wb").write(encode_sets({"river": river.get(0.0), "torch": net.get(0.0)}))
''')


def run_replicas(tmp_path, mismatch: bool = False) -> list[str]:
    script = tmp_path / "replica.py"
    script.write_text(WORKER)
    port = free_port()
    outs = [str(tmp_path / f"replica-{rank}") for rank in range(2)]
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), outs[rank], str(int(mismatch))])
                 for rank in range(2)]
    for p in processes:
        assert p.wait(timeout=120) == 0
    return outs


def test_two_replicas_end_with_the_combined_parameters(tmp_path):
    outs = run_replicas(tmp_path)
    mine = [decode_sets(open(out + ".mine", "rb").read()) for out in outs]
    after = [decode_sets(open(out, "rb").read()) for out in outs]
    expected = {name: combine([m[name] for m in mine]) for name in ("river", "torch")}
    for name in ("river", "torch"):
        for replica in after:
            for key, v in expected[name].values.items():
                got = replica[name].values[key]
                order = [got.keys.index(k) for k in v.keys] if v.keys else slice(None)
                assert np.array_equal(got.values[order], v.values), f"{name} {key} differs from combine()"
    a, b = after
    assert a["river"].values["LogisticRegression.weights"].keys == b["river"].values["LogisticRegression.weights"].keys
    assert np.array_equal(a["torch"].values["flat"].values, b["torch"].values["flat"].values)
    assert "only0" in a["river"].values["LogisticRegression.weights"].keys   # a feature of one replica is kept
    assert "only1" in a["river"].values["LogisticRegression.weights"].keys


def test_replicas_with_different_models_refuse_the_sync(tmp_path):
    outs = run_replicas(tmp_path, mismatch=True)
    for out in outs:
        text = open(out + ".refused").read()
        assert "replica 1 averages models ['extra', 'river', 'torch']" in text or "replica 0 averages" in text


def test_bytes_that_are_not_parameters_are_refused():
    good = encode_sets({})
    assert decode_sets(good) == {}
    with pytest.raises(WireError):
        decode_sets(b"\x81\xa1m\x81\xa6weight\xa1x")                  # a weight that is not a number
    for array, why in [(Array("|O", [1], b"\x00" * 8), "not numeric"), (Array("<f8", [2], b"\x00" * 8), "8 bytes")]:
        data = msgspec.msgpack.encode({"m": WireSet(1.0, {"v": WireValues(array)})})
        with pytest.raises(WireError, match=why):   # an object array is never rebuilt from a peer's bytes
            decode_sets(data)
