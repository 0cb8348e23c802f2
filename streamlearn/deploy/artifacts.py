"""Immutable version artifacts for serving: a folder of the model's files and a manifest with their checksums.

Layout under the store's root (a local folder, or any fsspec URL where fsspec
and its backend are installed):

    <model>/v000007/manifest.json    model, version, kind, settings, every file's SHA-256 (+ HMAC when keyed)
    <model>/v000007/model.pkl        (River) or weights.safetensors + encoding.pkl (torch)
    <model>/PRODUCTION               {"model", "version", "manifest_sha256"}: what serving should load

Locally a version is written to a temporary folder, fsynced and renamed into place,
and PRODUCTION is replaced atomically (temp file, fsync, rename), as snapshots
are. Nothing is read back before its checksums (and HMAC) verify; artifacts are
never deleted by the service.

>>> import tempfile
>>> store = ArtifactStore(tempfile.mkdtemp())
>>> written = store.write(ArtifactManifest("fraud", 1, "river", "classification", 0.0), {"model.pkl": b"x"})
>>> store.load("fraud", 1, written.manifest_sha256).files
{'model.pkl': b'x'}
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import quote

import msgspec

from streamlearn.checkpoints.store import (MANIFEST, FileEntry, SnapshotError, check_signature, file_entries,
                                           replace_durably, signed, verified_files, write_folder_durably)
from streamlearn.checkpoints.catalog import signing_key
from streamlearn.config import Config, ConfigError, ModelConfig

ARTIFACTS_DIR = "artifacts"
POINTER = "PRODUCTION"


class ArtifactError(Exception):
    """An artifact that is missing or does not verify; the message says which and why."""


class ArtifactManifest(msgspec.Struct):
    """What a version's folder holds and how to rebuild the model from it."""

    model: str
    version: int
    kind: Literal["river", "torch", "lm"]
    task: str
    created: float
    settings: ModelConfig = msgspec.field(default_factory=ModelConfig)   # the model's config (torch: its shape)
    files: list[FileEntry] = []
    hmac: str = ""                 # HMAC-SHA256 of the manifest with this field empty, when keyed


class Pointer(msgspec.Struct):
    """The production pointer serving reads: which version, and the manifest checksum it must have."""

    model: str
    version: int
    manifest_sha256: str
    updated: float


class Artifact(msgspec.Struct):
    """A verified version: its manifest, files, where it lives and its manifest's checksum."""

    manifest: ArtifactManifest
    files: dict[str, bytes]
    url: str
    manifest_sha256: str

    @property
    def checksums(self) -> dict[str, str]:
        return {f.name: f.sha256 for f in self.manifest.files}


class ArtifactStore:
    """Version folders and production pointers under one root (a path or URL)."""

    def __init__(self, location: str | Path, key: Optional[bytes] = None) -> None:
        self.location = str(location)
        self.key = key or None
        local = self.location[len("file://"):] if self.location.startswith("file://") else self.location
        self._files = _LocalFiles(Path(local)) if "://" not in local else _RemoteFiles(self.location)

    def write(self, manifest: ArtifactManifest, files: dict[str, bytes]) -> Artifact:
        """Writes a new version folder (manifest last); a leftover folder of a crashed attempt is replaced."""
        manifest = signed(msgspec.structs.replace(manifest, files=file_entries(files)), self.key)
        raw = msgspec.json.encode(manifest)
        folder = _folder(manifest.model, manifest.version)
        self._files.write_folder(folder, {**files, MANIFEST: raw})
        return Artifact(manifest, files, self._files.url(folder), hashlib.sha256(raw).hexdigest())

    def load(self, model: str, version: int, manifest_sha256: Optional[str] = None) -> Artifact:
        """Reads one version and verifies it (manifest checksum when given, HMAC when keyed, every file)."""
        folder = _folder(model, version)
        try:
            raw = self._files.read(f"{folder}/{MANIFEST}")
        except FileNotFoundError:
            raise ArtifactError(f"{model} v{version}: manifest missing ({self._files.url(folder)})") from None
        sha = hashlib.sha256(raw).hexdigest()
        if manifest_sha256 is not None and sha != manifest_sha256:
            raise ArtifactError(f"{model} v{version}: manifest checksum mismatch (not the artifact registered)")
        try:
            manifest = msgspec.json.decode(raw, type=ArtifactManifest)
            check_signature(manifest, self.key)
            files = verified_files(manifest.files, lambda name: self._files.read(f"{folder}/{name}"))
        except (msgspec.MsgspecError, SnapshotError) as err:
            raise ArtifactError(f"{model} v{version}: {err}") from None
        if (manifest.model, manifest.version) != (model, version):
            raise ArtifactError(f"{model} v{version}: the manifest is {manifest.model} v{manifest.version}'s")
        return Artifact(manifest, files, self._files.url(folder), sha)

    def point_production(self, model: str, version: int, manifest_sha256: str) -> None:
        """Replaces the model's production pointer atomically."""
        pointer = Pointer(model, version, manifest_sha256, time.time())
        self._files.replace(f"{quote(model, safe='')}/{POINTER}", msgspec.json.encode(pointer))

    def production(self, model: str) -> Optional[Pointer]:
        """The model's production pointer, or None when nothing was promoted yet."""
        try:
            raw = self._files.read(f"{quote(model, safe='')}/{POINTER}")
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(raw, type=Pointer)
        except msgspec.MsgspecError as err:
            raise ArtifactError(f"{model}: production pointer unreadable: {err}") from None


def open_artifacts(config: Config) -> ArtifactStore:
    """The artifact store of this config (`publish.artifacts`, or `STATE_DIR/artifacts`), keyed when a key is set."""
    location = config.publish.artifacts or Path(config.state_dir) / ARTIFACTS_DIR
    try:
        return ArtifactStore(location, signing_key())
    except OSError as err:
        raise ConfigError(f"config error: publish.artifacts: cannot open {location}: {err}") from None


def _folder(model: str, version: int) -> str:
    return f"{quote(model, safe='')}/v{version:06d}"


class _LocalFiles:
    """A local folder, written with fsync and renames (what a crash can leave is old or new, never half)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def url(self, relative: str) -> str:
        return (self.root / relative).as_uri()

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def write_folder(self, relative: str, files: dict[str, bytes]) -> None:
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        # A folder already there was written by an attempt that crashed before the registry knew it: not a version.
        write_folder_durably(final, files, replace_existing=True)

    def replace(self, relative: str, data: bytes) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(path, data)


class _RemoteFiles:
    """An fsspec file system (object stores: each object is written whole; the manifest goes last)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self._url = url.rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self._url)

    def url(self, relative: str) -> str:
        return f"{self._url}/{relative}"

    def read(self, relative: str) -> bytes:
        return self._fs.cat_file(f"{self._root}/{relative}")

    def write_folder(self, relative: str, files: dict[str, bytes]) -> None:
        # The manifest last: a folder without one is unfinished.
        for name in sorted(files, key=lambda n: n == MANIFEST):
            self._fs.pipe_file(f"{self._root}/{relative}/{name}", files[name])

    def replace(self, relative: str, data: bytes) -> None:
        self._fs.pipe_file(f"{self._root}/{relative}", data)
