"""Snapshots on disk, written transactionally and verified before anything is loaded.

A snapshot is a folder `snap-<seq>` of files plus `manifest.json`, which lists
every file with its SHA-256, the sequence number, the parent, the config
fingerprint, the source offsets and the time; with a key (`STREAMLEARN_SNAPSHOT_KEY`)
it also carries an HMAC-SHA256 of itself. Writing goes: temporary folder → fsync
each file → rename into place → fsync the parent → `LATEST` (itself replaced
atomically). A crash at any point leaves either the old or the new snapshot.

>>> import tempfile
>>> store = SnapshotStore(tempfile.mkdtemp(), keep=2)
>>> store.write({"model.pkl": b"weights"}, offsets={"feedback:0": 7}, fingerprint="abc").seq
1
>>> store.load(1).files["model.pkl"], store.latest_seq()
(b'weights', 1)
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import msgspec

MANIFEST = "manifest.json"
PREFIX = "snap-"


class SnapshotError(Exception):
    """A snapshot that does not verify; the message is the reason."""


class FileEntry(msgspec.Struct):
    name: str
    sha256: str
    size: int


class Manifest(msgspec.Struct):
    seq: int
    parent: Optional[int]
    created: float                 # unix seconds
    fingerprint: str               # of the config parts the state depends on
    offsets: dict[str, int]        # next offset per source partition ("file:PATH" -> next line)
    files: list[FileEntry]
    meta: dict[str, float] = {}    # small figures worth showing (examples learned, ...)
    hmac: str = ""                 # HMAC-SHA256 of the manifest with this field empty, when keyed


class Snapshot(msgspec.Struct):
    manifest: Manifest
    files: dict[str, bytes]


class SnapshotStore:
    """A folder of snapshots: write, list, verify, load, prune."""

    def __init__(self, root: str | Path, keep: int = 5, key: Optional[bytes] = None) -> None:
        self.root = Path(root)
        self.keep = keep
        self.key = key or None
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, bytes], offsets: dict[str, int], fingerprint: str,
              meta: Optional[dict[str, float]] = None, parent: Optional[int] = None) -> Manifest:
        """Writes the next snapshot durably, points LATEST at it, prunes old ones; returns its manifest.

        `parent` is the snapshot this state grew from (default: the latest one).
        """
        self.prune(keep=max(self.keep - 1, 1))  # room for the new one, so a full disk does not stay full
        latest = self.latest_seq()
        seq = (latest or 0) + 1
        parent = latest if parent is None else parent
        entries = file_entries(files)
        manifest = signed(Manifest(seq, parent, time.time(), fingerprint, offsets, entries, meta or {}), self.key)
        try:
            write_folder_durably(self._folder(seq), {**files, MANIFEST: msgspec.json.encode(manifest)})
        except OSError as err:
            if err.errno == errno.ENOSPC:
                # Durable progress matters more than rollback history: keep only the newest to make room.
                self.prune(keep=1)
            raise
        replace_durably(self.root / "LATEST", f"{seq}\n".encode())
        self.prune()
        return manifest

    def sequences(self) -> list[int]:
        """Every snapshot folder's sequence number, oldest first (verified or not)."""
        seqs = []
        for path in self.root.glob(PREFIX + "*"):
            try:
                seqs.append(int(path.name[len(PREFIX):]))
            except ValueError:
                continue
        return sorted(seqs)

    def latest_seq(self) -> Optional[int]:
        seqs = self.sequences()
        return seqs[-1] if seqs else None

    def manifest(self, seq: int) -> Optional[Manifest]:
        """One snapshot's manifest as written, unverified (None when missing or unreadable): for showing."""
        try:
            return self._read_manifest(seq)
        except SnapshotError:
            return None

    def load(self, seq: int) -> Snapshot:
        """Reads and verifies one snapshot (manifest, HMAC, every file's size and hash); raises SnapshotError."""
        folder = self._folder(seq)
        manifest = self._read_manifest(seq)
        check_signature(manifest, self.key)
        return Snapshot(manifest, verified_files(manifest.files, lambda name: (folder / name).read_bytes()))

    def newest_valid(self, at_most: Optional[int] = None) -> Iterator[tuple[int, Snapshot | SnapshotError]]:
        """Newest first: each snapshot (up to `at_most`) with its content or why it does not verify."""
        for seq in reversed(self.sequences()):
            if at_most is not None and seq > at_most:
                continue
            try:
                yield seq, self.load(seq)
            except SnapshotError as err:
                yield seq, err

    def prune(self, keep: Optional[int] = None) -> None:
        """Keeps the newest `keep` snapshots (default: the store's); drops older ones and abandoned temporary folders."""
        for seq in self.sequences()[:-(keep or self.keep)]:
            shutil.rmtree(self._folder(seq), ignore_errors=True)
        for tmp in self.root.glob(".tmp-*"):
            if not tmp.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(tmp, ignore_errors=True)

    def _read_manifest(self, seq: int) -> Manifest:
        try:
            raw = (self._folder(seq) / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise SnapshotError("manifest missing") from None
        try:
            return msgspec.json.decode(raw, type=Manifest)
        except msgspec.MsgspecError as err:
            raise SnapshotError(f"manifest unreadable: {err}") from None

    def _folder(self, seq: int) -> Path:
        return self.root / f"{PREFIX}{seq:08d}"


Signable = TypeVar("Signable", bound=msgspec.Struct)   # a manifest with an `hmac: str` field


def file_entries(files: dict[str, bytes]) -> list[FileEntry]:
    """Each file's name, SHA-256 and size, for a manifest."""
    return [FileEntry(name, hashlib.sha256(data).hexdigest(), len(data)) for name, data in files.items()]


def verified_files(entries: list[FileEntry], read: Callable[[str], bytes]) -> dict[str, bytes]:
    """Reads every listed file with `read(name)` and checks its size and SHA-256; raises SnapshotError.

    >>> entries = file_entries({"a": b"12"})
    >>> verified_files(entries, {"a": b"12"}.__getitem__)
    {'a': b'12'}
    >>> verified_files(entries, {"a": b"13"}.__getitem__)
    Traceback (most recent call last):
    ...
    streamlearn.checkpoints.store.SnapshotError: a checksum mismatch
    """
    files = {}
    for entry in entries:
        try:
            data = read(entry.name)
        except (FileNotFoundError, KeyError):
            raise SnapshotError(f"{entry.name} missing") from None
        if len(data) != entry.size:
            raise SnapshotError(f"{entry.name} truncated: {len(data)} of {entry.size} bytes")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise SnapshotError(f"{entry.name} checksum mismatch")
        files[entry.name] = data
    return files


def signed(manifest: Signable, key: Optional[bytes]) -> Signable:
    """The manifest with its HMAC-SHA256 filled in (unchanged without a key)."""
    if key is None:
        return manifest
    return msgspec.structs.replace(manifest, hmac=_mac(manifest, key))


def check_signature(manifest: msgspec.Struct, key: Optional[bytes]) -> None:
    """Raises SnapshotError when a key is set and the manifest is unsigned or signed otherwise."""
    if key is None:
        return
    if not manifest.hmac:
        raise SnapshotError("not signed, and STREAMLEARN_SNAPSHOT_KEY is set")
    if not hmac.compare_digest(manifest.hmac, _mac(manifest, key)):
        raise SnapshotError("HMAC does not verify (tampered, or another key)")


def _mac(manifest: msgspec.Struct, key: bytes) -> str:
    body = msgspec.json.encode(msgspec.structs.replace(manifest, hmac=""))
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def write_folder_durably(final: Path, files: dict[str, bytes], replace_existing: bool = False) -> None:
    """Creates folder `final` holding `files`, in order: a temporary folder beside it, each file fsynced, the
    folder fsynced and renamed into place, the parent fsynced. A crash leaves no folder or the whole one (and
    maybe a `.tmp-*` folder of this process id, which the caller may clean up later)."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_durably(tmp / name, data)
        fsync_dir(tmp)
        if replace_existing and final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def replace_durably(path: Path, data: bytes) -> None:
    """Replaces `path` atomically: a crash leaves the old content or the new one, never a mix.

    The temporary file is per process: the service and the CLI may both re-point production."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write_durably(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
