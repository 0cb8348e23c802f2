"""This replica among the others: parameters averaged across a torch.distributed process group.

PyTorch does the rendezvous, the transport and the failure detection (gloo on CPU; a
collective that a dead peer never joins ends in an error after `timeout`). A sync
gathers every replica's parameter sets as bytes (`streamlearn.cluster.wire`: numbers
only, no pickle: `all_gather_object` would unpickle what peers send) and combines
them in rank order, so every replica computes, and sets, the same result.

Two replicas on loopback (`tests/test_cluster_sync.py` runs this in two processes):

    group = ReplicaGroup(rank, 2, init_method="tcp://127.0.0.1:29500")
    merged = group.average({"default": learner.parameters().parameters.get(weight=learned)})
    learner.parameters().parameters.set(merged["default"])
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from streamlearn.cluster.wire import decode_header, encode_header
from streamlearn.config import ConfigError
from streamlearn.learners.averaging import ParameterSet, Values, combine

DEFAULT_TIMEOUT = 300.0   # seconds a collective waits for every replica before it fails


class ReplicaMismatch(ValueError):
    """Replicas that handed in different models at one sync (different configs): refused, not averaged."""


def split_sets(sets: Mapping[str, ParameterSet]) -> tuple[dict[str, ParameterSet], dict[str, dict[str, np.ndarray]]]:
    """Each model's set without its positional values (gathered whole), and those values (summed by all-reduce)."""
    keyed = {n: ParameterSet(s.weight, {k: v for k, v in s.values.items() if v.keys is not None}, s.moments, s.base)
             for n, s in sets.items()}
    positional = {n: {k: v.values for k, v in s.values.items() if v.keys is None} for n, s in sets.items()}
    return keyed, positional


def sync_bytes(sets: Mapping[str, ParameterSet]) -> int:
    """What one replica hands in at a sync: its header's bytes, and its positional values as float64 (all-reduced)."""
    keyed, positional = split_sets(sets)
    return len(encode_header(keyed, positional)) + 8 * sum(a.size for arrays in positional.values() for a in arrays.values())


def rendezvous_address(init_method: str) -> tuple[str, int]:
    """Host and port of the rendezvous store: `tcp://HOST:PORT`, or `env://` (MASTER_ADDR, MASTER_PORT)."""
    if init_method == "env://":
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    elif init_method.startswith("tcp://"):
        host, _, port = init_method[len("tcp://"):].rpartition(":")
    else:
        host = port = None
    if not host or not port or not port.isdigit():
        raise ConfigError(f"config error: cluster.init_method: {init_method!r} is not tcp://HOST:PORT, nor env:// with "
                          "MASTER_ADDR and MASTER_PORT set")
    return host, int(port)


def check_world_size(replicas: int, env: Optional[Mapping[str, str]] = None) -> None:
    """A ConfigError when torchrun's WORLD_SIZE says another number of replicas than `cluster.replicas`.

    >>> check_world_size(2, {"WORLD_SIZE": "3"})
    Traceback (most recent call last):
    ...
    streamlearn.config.ConfigError: config error: cluster.replicas: 2, but torchrun started WORLD_SIZE=3 replicas
    """
    found = (os.environ if env is None else env).get("WORLD_SIZE")
    if found is not None and found != str(replicas):
        raise ConfigError(f"config error: cluster.replicas: {replicas}, but torchrun started WORLD_SIZE={found} "
                          "replicas")


class ReplicaGroup:
    """Rank `rank` of `size` replicas in one process group (torch.distributed's `init_method`: env:// or tcp://)."""

    def __init__(self, rank: int, size: int, init_method: str = "env://", backend: str = "gloo",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        host, port = rendezvous_address(init_method)
        check_world_size(size)
        # The rendezvous store, made here rather than by init_process_group, so that replicas can also leave each
        # other word without a collective (`post_ready`, `ready`, `post_stop`): a collective blocks until every one comes.
        # Under torchrun's elastic agent the agent hosts it; keys are kept apart per restart of the group.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        self.store = dist.TCPStore(host, port, size, is_master=rank == 0 and not agent,
                                   timeout=timedelta(seconds=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"collectives/{attempt}", self.store), rank=rank,
                                world_size=size, timeout=timedelta(seconds=timeout))
        self._flags = dist.PrefixStore(f"streamlearn/{attempt}", self.store)
        self.rank, self.size = rank, size

    def post_ready(self, sync: int) -> None:
        """Says this replica is ready for sync number `sync`."""
        self._flags.add(f"ready/{sync}", 1)

    def ready(self, sync: int) -> int:
        """How many replicas have said they are ready for sync number `sync`."""
        return self._flags.add(f"ready/{sync}", 0)

    def post_stop(self) -> None:
        """Asks every replica to stop (each hears it at its next batch, and all stop at one sync)."""
        self._flags.add("stop", 1)

    def post_durable(self, epoch: int) -> None:
        """Says this replica's snapshot of epoch `epoch` is durable."""
        self._flags.add(f"durable/{epoch}", 1)

    def durable(self, epoch: int) -> int:
        """How many replicas have a durable snapshot of epoch `epoch`."""
        return self._flags.add(f"durable/{epoch}", 0)

    def stop_posted(self) -> bool:
        return self._flags.add("stop", 0) > 0

    def agree(self, values: list[float]) -> list[float]:
        """The highest of every replica's value, position by position (one small collective)."""
        mine = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return mine.tolist()

    def average(self, sets: Mapping[str, ParameterSet]) -> dict[str, ParameterSet]:
        """Every replica's sets for the same models, combined as `averaging.combine` combines them.

        Keyed values (a River model's weights by feature) and moments are gathered and combined in rank order;
        positional values (a torch network's flat tensor) are summed, each scaled by its replica's share, in one
        all-reduce (a tenth of the time for millions of parameters; every replica gets the same sum).
        """
        names = sorted(sets)
        keyed, positional = split_sets(sets)
        headers = [decode_header(p) for p in self.gather(encode_header(keyed, positional))]
        mine = {n: {k: (np.dtype(a.dtype).str, a.shape) for k, a in arrays.items()} for n, arrays in positional.items()}
        for rank, (replica, layout) in enumerate(headers):
            self._check_same(rank, sorted(replica), layout, names, mine)
        merged = {name: combine([replica[name] for replica, _ in headers]) for name in names}
        summed = self._weighted_sum({n: np.array([replica[n].weight for replica, _ in headers]) for n in names},
                                    positional)
        return {name: ParameterSet(merged[name].weight, {**merged[name].values, **summed[name]},
                                   merged[name].moments, merged[name].base) for name in names}

    def _check_same(self, rank: int, models: list[str], layout: dict, names: list[str], mine: dict) -> None:
        """`ReplicaMismatch` when replica `rank` hands in other models, or positional values of another shape."""
        if models != names:
            raise ReplicaMismatch(f"replica {rank} averages models {models}, replica {self.rank} {names}: "
                                  "the replicas do not run the same config")
        for name in names:
            if layout.get(name, {}) != mine.get(name, {}):
                raise ReplicaMismatch(f"model {name}: replica {rank} has parameters {layout.get(name)}, replica "
                                      f"{self.rank} {mine.get(name)}: the replicas do not run the same config")

    def _weighted_sum(self, weights: Mapping[str, np.ndarray],
                      positional: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Values]]:
        """Each positional array's mean over the replicas, weighted by their shares (all equal when no replica
        learned since the last sync), summed in float64 in one all-reduce; `ValueError` if any is not finite."""
        parts = [(model, name, array) for model in sorted(positional) for name, array in sorted(positional[model].items())]
        if not parts:
            return {model: {} for model in positional}
        scaled = []
        for model, _, array in parts:
            w = weights[model]
            share = (w[self.rank] / w.sum()) if w.sum() > 0 else 1.0 / len(w)
            scaled.append(array.astype(np.float64).ravel() * share)
        total = torch.from_numpy(np.concatenate(scaled))
        dist.all_reduce(total)
        if not torch.isfinite(total).all():   # the same sum on every replica: all refuse it alike
            raise ValueError("combine: positional values hold non-finite values after the sum")
        out: dict[str, dict[str, Values]] = {model: {} for model in positional}
        offset = 0
        for model, name, array in parts:
            out[model][name] = Values(total[offset:offset + array.size].numpy().reshape(array.shape).astype(array.dtype))
            offset += array.size
        return out

    def gather(self, payload: bytes) -> list[bytes]:
        """Every replica's `payload`, in rank order (two collectives: the sizes, then the padded bytes)."""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        mine = torch.zeros(longest, dtype=torch.uint8)
        if payload:
            mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        received = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(received, mine)
        return [bytes(r[:int(n.item())].numpy()) for r, n in zip(received, sizes)]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class SoloGroup:
    """One replica alone (`cluster.replicas = 1` with a `cluster.snapshot_dir`): every collective is its own word.

    It keeps the epochs and the snapshot layout of a cluster, so that a later start can scale out from its
    snapshots (and a cluster can scale in to it), without torch.distributed.
    """

    rank, size = 0, 1

    def __init__(self) -> None:
        self._ready: dict[int, int] = {}
        self._stop = False

    def post_ready(self, sync: int) -> None:
        self._ready[sync] = self._ready.get(sync, 0) + 1

    def ready(self, sync: int) -> int:
        return self._ready.get(sync, 0)

    def post_stop(self) -> None:
        self._stop = True

    def post_durable(self, epoch: int) -> None:
        pass

    def durable(self, epoch: int) -> int:
        return 1

    def stop_posted(self) -> bool:
        return self._stop

    def agree(self, values: list[float]) -> list[float]:
        return list(values)

    def average(self, sets: Mapping[str, ParameterSet]) -> dict[str, ParameterSet]:
        return {name: combine([s]) for name, s in sets.items()}

    def gather(self, payload: bytes) -> list[bytes]:
        return [payload]

    def close(self) -> None:
        pass

