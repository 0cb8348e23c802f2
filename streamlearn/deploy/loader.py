"""For serving code: load the production version of a model, verified, ready to predict.

Serving needs no registry and no Kafka: it reads the model's production pointer
from the artifact store, loads that version's folder, checks the manifest's
checksum against the pointer, every file's SHA-256 against the manifest (and the
HMAC when `STREAMLEARN_SNAPSHOT_KEY` is set), and only then unpickles. Anything
that does not verify raises `ArtifactError`; nothing is loaded from it.

    from streamlearn.deploy import load_production

    fraud = load_production("fraud", store="/var/lib/streamlearn/artifacts")   # or "s3://bucket/artifacts"
    fraud.version, fraud.model.predict_proba_one({"amount": 12.5})           # River: the estimator itself
    fraud.predict_many([{"amount": 12.5}])                                    # River or torch
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from streamlearn.checkpoints.catalog import signing_key
from streamlearn.deploy.artifacts import ArtifactError, ArtifactStore
from streamlearn.deploy.model_files import Deployed, deployed


def load_production(model: str, store: str | Path | ArtifactStore, key: Optional[bytes] = None) -> Deployed:
    """The model's production version from `store` (a folder, an fsspec URL or an ArtifactStore), verified.

    `key` is the HMAC key (default: `STREAMLEARN_SNAPSHOT_KEY` from the environment, when set).
    """
    artifacts = _store(store, key)
    pointer = artifacts.production(model)
    if pointer is None:
        raise ArtifactError(f"{model}: no production version in {artifacts.location}")
    return load_version(model, pointer.version, artifacts, manifest_sha256=pointer.manifest_sha256)


def load_version(model: str, version: int, store: str | Path | ArtifactStore, key: Optional[bytes] = None,
                 manifest_sha256: Optional[str] = None) -> Deployed:
    """One version of a model, verified (against `manifest_sha256` too, when given)."""
    return deployed(_store(store, key).load(model, version, manifest_sha256))


def _store(store: str | Path | ArtifactStore, key: Optional[bytes]) -> ArtifactStore:
    if isinstance(store, ArtifactStore):
        return store
    return ArtifactStore(store, key if key is not None else signing_key())
