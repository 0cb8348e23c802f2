"""A learner's model as artifact files, and a verified artifact back as a model that predicts.

River: `model.pkl`, the estimator (or pipeline) pickled. Torch: `weights.safetensors`
(the network's state dict, no pickle) and `encoding.pkl` (feature encoder, target
scaling, class labels). A language model: its adapter (`learners/lm/served.py`),
loaded onto its base, ready to answer (`Deployed.lm`). Only the model goes in, never the learner's scores, probes
or replay buffer. `deployed()` is called on an `Artifact` whose checksums have
verified, so unpickling here is unpickling what this service wrote.

>>> from streamlearn.config import ModelConfig
>>> from streamlearn.learners.river_learner import RiverLearner
>>> from streamlearn.records import Example
>>> learner = RiverLearner("m", ModelConfig(model="logreg"))
>>> learner.learn_batch([Example(f"r-{i}", "m", {"x": float(i % 2)}, i % 2, 1.0, i, i) for i in range(200)])
>>> kind, files = model_files(learner)
>>> kind, sorted(files)
('river', ['model.pkl'])
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

from streamlearn.deploy.artifacts import Artifact
from streamlearn.learners.contract import RIVER_MODEL, Learner
from streamlearn.records import Features

KINDS = ("river", "torch", "lm")   # learner kinds (the `kind` each learner class declares) that have an artifact format


def model_files(learner: Learner) -> tuple[str, dict[str, bytes]]:
    """The learner's model as (kind, files) for an artifact: what its `export()` gives, the kind it declares."""
    exported = learner.export()
    if exported.kind not in KINDS:
        raise ValueError(f"learner {learner.name!r} ({type(learner).__name__}, kind {exported.kind!r}) has no "
                         f"artifact format; known kinds: {', '.join(KINDS)}")
    return exported.kind, dict(exported.files)


class Deployed:
    """A loaded version: `model` is the River estimator, the torch module or the language model (base + adapter);
    `predict_many` takes feature dicts; a language model answers through `lm` (`ServedLm.reply_many`)."""

    def __init__(self, artifact: Artifact, model: Any, predictor: Any) -> None:
        self.name = artifact.manifest.model
        self.version = artifact.manifest.version
        self.kind = artifact.manifest.kind
        self.task = artifact.manifest.task
        self.url = artifact.url
        self.manifest_sha256 = artifact.manifest_sha256
        self.model = model
        self._predictor = predictor
        self.lm = predictor if self.kind == "lm" else None   # a ServedLm

    def predict_many(self, rows: list[Features]) -> list:
        """The predicted label (regression: value) of each feature dict; None where the model cannot tell."""
        if self.kind == "torch":
            return self._predictor.predict_many(rows)
        if self.kind == "lm":
            return [None] * len(rows)   # feature rows mean nothing to it
        predict, predicted = self.model.predict_one, []
        for x in rows:
            try:
                predicted.append(predict(x))
            except Exception:   # as in learning: a row the model cannot take is a miss, not a crash
                predicted.append(None)
        return predicted

    def __repr__(self) -> str:
        return f"Deployed({self.name!r}, version={self.version}, kind={self.kind!r})"


def deployed(artifact: Artifact, template: Optional[Any] = None) -> Deployed:
    """The model of a verified artifact, ready to predict; a language model's base is copied from `template` (its
    learner) when given, else loaded."""
    files = artifact.files
    if artifact.manifest.kind == "lm":
        from streamlearn.learners.lm.served import served_lm

        served = served_lm(dict(files), template)
        return Deployed(artifact, served.model, served)
    if artifact.manifest.kind == "river":
        model = pickle.loads(files[RIVER_MODEL])
        return Deployed(artifact, model, model)
    from streamlearn.learners.torch_learner import exported_predictor   # torch is imported only for torch models

    network, predictor = exported_predictor(artifact.manifest.model, artifact.manifest.settings, files)
    return Deployed(artifact, network, predictor)
