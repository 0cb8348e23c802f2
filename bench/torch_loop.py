"""The bare torch loop that `throughput.py` holds the service's torch learner against.

Same network, optimizer, micro-batch size, replay mix and EWC penalty as the
service's `TorchLearner`, on the same examples encoded and scaled up front: per
micro-batch a scoring forward pass, then the training step on the batch mixed
with replayed rows. No Kafka, no decoding, no join, no feature encoding, no
scores, no guard: what is left is the learning itself.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from streamlearn.learners.encoder import FeatureEncoder
from streamlearn.learners.ewc import OnlineEWC
from streamlearn.learners.flat import FlatParameters
from streamlearn.learners.networks import mlp
from streamlearn.replay.reservoir import ReservoirBuffer

HIDDEN = [64, 64]
ENCODER = {"numeric_slots": 16, "string_slots": 16, "hash_buckets": 16}
REPLAY = {"kind": "reservoir", "capacity": 1000, "ratio": 0.3}
EWC = {"lambda": 10.0, "gamma": 0.9, "consolidate": {"every_examples": 1000, "on_drift": False}}
CONFIGS = {  # name -> (replay, ewc) on or off
    "plain": (False, False),
    "ewc": (False, True),
    "replay+ewc": (True, True),
}


def model_table(batch: int, config: str) -> dict:
    """The service's [models.default] table for one configuration."""
    replay, ewc = CONFIGS[config]
    return {"model": "mlp", "params": {"hidden": HIDDEN}, "encoder": ENCODER,
            "train": {"batch_size": batch, "max_classes": 2, "steps_per_batch": 1, "loss": "cross_entropy"},  # as below
            "replay": REPLAY if replay else {"kind": "none"},
            "ewc": EWC if ewc else {"lambda": 0.0}}


def learner_loop(examples, batch: int, config: str, seed: int = 42) -> float:
    """Examples/s of the service's TorchLearner alone: the same examples as feature dicts, in memory."""
    from streamlearn.config import parse_config
    from streamlearn.learners.torch_learner import TorchLearner
    from streamlearn.records import Example

    model = parse_config({"models": {"default": model_table(batch, config)}}, env={}).models["default"]
    learner = TorchLearner("default", model, seed, threads=1)
    # Event times 1 ms apart, as in the service's backlog: `train.max_wait` (1 s of event time) then cuts no
    # micro-batch short (1 s apart, every micro-batch was one or two examples: 5k examples/s, not the learner's)
    chunks = [[Example(rid, "default", x, y, 1.0, i * 1e-3, i * 1e-3) for i, (rid, x, y) in
               enumerate(examples[start:start + 1000], start)] for start in range(0, len(examples), 1000)]
    started = time.perf_counter()
    for chunk in chunks:
        learner.learn_batch(chunk, now=0.0)
    return learner.evaluation.learned / (time.perf_counter() - started)


def encoded(examples) -> tuple[torch.Tensor, torch.Tensor]:
    """All examples as the learner's encoder would give them, scaled with statistics of the whole set."""
    encoder = FeatureEncoder(**ENCODER)
    raw = encoder.vectorize([x for _, x, _ in examples])
    encoder.learn(raw)
    return torch.from_numpy(encoder.scale(raw)), torch.tensor([y for _, _, y in examples])


def bare_torch_loop(x: torch.Tensor, y: torch.Tensor, batch: int, config: str, seed: int = 42) -> float:
    """Examples/s of the plain loop: score, mix in replay, step with the EWC gradient, add to the buffer."""
    replay_on, ewc_on = CONFIGS[config]
    torch.manual_seed(seed)
    net = mlp(x.shape[1], 2, HIDDEN)
    flat = FlatParameters(net)
    optimizer = torch.optim.Adam([flat.param], lr=1e-3)
    ewc = OnlineEWC(flat.param.numel(), EWC["lambda"] if ewc_on else 0.0, EWC["gamma"])
    buffer = ReservoirBuffer(REPLAY["capacity"], x.shape[1], seed)
    replayed = int(round(batch * REPLAY["ratio"] / (1 - REPLAY["ratio"]))) if replay_on else 0
    since = 0
    started = time.perf_counter()
    for start in range(0, len(y) - batch + 1, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        with torch.no_grad():
            net(xb)
        if replayed:
            rows = torch.from_numpy(buffer.sample(replayed))
            store = buffer.store
            xb = torch.cat([xb, torch.from_numpy(store.x)[rows]])
            yb = torch.cat([yb, torch.from_numpy(store.y)[rows].long()])
        flat.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        ewc.observe(flat.param.grad, len(yb))
        ewc.penalty_grad(flat.param, flat.param.grad)
        optimizer.step()
        if replay_on:
            buffer.add(x[start:start + batch].numpy(), y[start:start + batch].numpy().astype(np.float32),
                       np.zeros(batch))
        since += batch
        if since >= EWC["consolidate"]["every_examples"]:
            ewc.consolidate(flat.param)
            since = 0
    return (len(y) // batch * batch) / (time.perf_counter() - started)
