"""The learner contract: what the service, the snapshots, the handoff and the metrics may ask of any learner.

Every learner kind (River, torch, language models) is built the same way,
`Kind(name, ModelConfig, seed, *, drift=None, evaluation=None, threads=0)` (or
`build_learner`), and shows these twelve members and nothing else to the rest of
the code: `name`, `kind`, `task`, `evaluation` (a `ModelEvaluation`: scores,
drift, probes, counters), `learn_batch`, `predict_many`, `flush`, `snapshot`,
`restore`, `export`, `metrics`, `parameters`. A `LearnerSnapshot` is immutable:
bytes and read-only array copies, so nothing the learner does after taking it
changes it.

>>> from streamlearn.config import ModelConfig
>>> from streamlearn.records import Example
>>> learner = build_learner("m", ModelConfig(model="logreg"))
>>> isinstance(learner, Learner), learner.kind
(True, 'river')
>>> learner.learn_batch([Example(f"r-{i}", "m", {"x": float(i % 2)}, i % 2, 1.0, i, i) for i in range(50)])
>>> twin = build_learner("m", ModelConfig(model="logreg"))
>>> twin.restore(learner.snapshot())
>>> twin.evaluation.learned, twin.predict_many([{"x": 1.0}]) == learner.predict_many([{"x": 1.0}])
(50, True)
"""

from __future__ import annotations

import pickle
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Protocol, runtime_checkable

import msgspec
import numpy as np

from streamlearn.config import Config, DriftConfig, EvalConfig, ModelConfig
from streamlearn.records import Example, Features

if TYPE_CHECKING:
    from streamlearn.learners.averaging import Averaging
    from streamlearn.learners.evaluation import ModelEvaluation

RIVER_MODEL = "model.pkl"              # a River artifact: the estimator (or pipeline) pickled
TORCH_WEIGHTS = "weights.safetensors"  # a torch artifact: the network's state dict, no pickle ...
TORCH_ENCODING = "encoding.pkl"        # ... and its feature encoder, target scaling and class labels


class LearnerSnapshot(msgspec.Struct, frozen=True):
    """A learner's whole state at one moment: its pickled state and read-only copies of its arrays.

    `kind` is the learner kind that took it ("" for one read from a snapshot older than this record);
    `state` is trusted only once the snapshot store verified it (it is unpickled on restore).
    """

    kind: str
    state: bytes
    tensors: Mapping[str, np.ndarray] = MappingProxyType({})


class ExportedModel(msgspec.Struct, frozen=True):
    """The model alone, as the files of a serving artifact (`deploy/model_files.py`); never scores or replay."""

    kind: str
    files: Mapping[str, bytes]


class LearnerMetrics(msgspec.Struct, frozen=True):
    """A learner's own figures, as of the call: for `/metrics` and the summary.

    `triggers`: (action, reason, firings) of the learner's own triggers (the torch learner's consolidation);
    `extra`: what the learner adds to its summary line.
    """

    model_label: str = ""                 # what the model is ("scaled_logreg", a factory path)
    rolled_back: int = 0                  # updates undone because they made the model non-finite
    replay_size: Optional[int] = None     # examples in the replay buffer; None for a learner without one
    triggers: tuple[tuple[str, str, int], ...] = ()
    extra: Mapping[str, Any] = MappingProxyType({})


@runtime_checkable
class Learner(Protocol):
    """What every learner kind shows: learn, predict, snapshot and restore, export, metrics (twelve members)."""

    kind: ClassVar[str]   # "river", "torch", "lm": the artifact format and the learner kind, declared by the class
    name: str
    task: str
    evaluation: "ModelEvaluation"

    def learn_batch(self, examples: list[Example], now: Optional[float] = None) -> None:
        """Scores then learns every example, in order (but held-out probes); a failing one is refused, not fatal."""

    def predict_many(self, rows: list[Features]) -> list:
        """The predicted label (regression: value) of each feature dict, None where it cannot tell; learns nothing."""

    def flush(self, now: Optional[float] = None) -> None:
        """Learns whatever is still queued, at the end of the input (`now`: wall time, for latency only)."""

    def snapshot(self) -> LearnerSnapshot:
        """The whole state, immutable (called where the snapshot is written: the forked writer)."""

    def restore(self, snapshot: LearnerSnapshot) -> None:
        """Takes back a snapshot's state (of this kind; a verified one: it unpickles)."""

    def export(self) -> ExportedModel:
        """The model as artifact files for serving."""

    def metrics(self) -> LearnerMetrics:
        """The learner's own figures now."""

    def parameters(self) -> "Averaging":
        """The parameters to average across replicas (get, set, `averaging.combine`), or None and the reason.

        The adapter counts running statistics (a scaler's) since it was made: make it at a sync.
        """


def frozen_arrays(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Read-only copies of `arrays`, in a read-only mapping."""
    out = {}
    for key, array in arrays.items():
        copy = np.array(array, copy=True)
        copy.flags.writeable = False
        out[key] = copy
    return MappingProxyType(out)


def snapshot_of(kind: str, state: dict, tensors: Optional[Mapping[str, np.ndarray]] = None) -> LearnerSnapshot:
    """A snapshot of a state dict and arrays (also how a `learners.pkl` entry of older versions is read)."""
    return LearnerSnapshot(kind, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
                           frozen_arrays(tensors or {}))


def build_learner(name: str, model: ModelConfig, config: Optional[Config] = None, *,
                  seed: Optional[int] = None, drift: Optional[DriftConfig] = None,
                  evaluation: Optional[EvalConfig] = None, threads: Optional[int] = None) -> Learner:
    """The learner of a configured model, every kind built the same way; `config` gives the service-wide pieces
    (seed, drift, eval, torch_threads), each overridable. Raises `ModelError` for a model that cannot be built."""
    if config is not None:
        seed = config.seed if seed is None else seed
        drift = config.drift if drift is None else drift
        evaluation = config.eval if evaluation is None else evaluation
        threads = config.torch_threads if threads is None else threads
    if model.is_lm:
        from streamlearn.learners.lm.learner import LmLearner   # transformers and peft load only for a language model

        kind: Any = LmLearner
    elif model.is_torch:
        from streamlearn.learners.torch_learner import TorchLearner  # torch loads only when a model needs it

        kind = TorchLearner
    else:
        from streamlearn.learners.river_learner import RiverLearner

        kind = RiverLearner
    return kind(name, model, 42 if seed is None else seed, drift=drift, evaluation=evaluation, threads=threads or 0)
