"""The model registry: every version of every model, its status, scores and history, in one transactional store.

`Registry` is the interface the service and the CLI use; `SqliteRegistry` keeps it
in a SQLite file in the state folder (a server database can implement the same
methods). Every change is one transaction, and a partial unique index allows at
most one `production` row per model, so no crash can leave two. A promotion also
writes its `model-updates` event to an outbox table in the same transaction; the
publisher sends what is unsent and marks it (at least once, in order).

>>> import tempfile
>>> registry = SqliteRegistry(tempfile.mkdtemp() + "/registry.sqlite")
>>> for v in (1, 2):
...     registry.add(VersionRecord("fraud", v, "candidate", 0.0, f"file:///a/v{v}", "sha"))
>>> registry.promote("fraud", 1, "promote", "gate").version
1
>>> registry.promote("fraud", 2, "promote", "gate").previous
1
>>> [(r.version, r.status) for r in registry.versions("fraud")]
[(2, 'production'), (1, 'retired')]
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Protocol

import msgspec

from streamlearn.config import Config, ConfigError
from streamlearn.deploy.faults import pause_point
from streamlearn.deploy.records import Change, GateScores, ModelUpdate, StreamPosition, VersionRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'production', 'rejected', 'retired')),
    created REAL NOT NULL,
    artifact TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    checksums TEXT NOT NULL,       -- JSON: file name -> SHA-256
    parent INTEGER,
    snapshot_seq INTEGER,
    position TEXT NOT NULL,        -- JSON StreamPosition
    scores TEXT NOT NULL,          -- JSON GateScores
    reasons TEXT NOT NULL,         -- JSON list of strings
    decided REAL,
    PRIMARY KEY (model, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_production_per_model ON versions (model) WHERE status = 'production';
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
    at REAL NOT NULL, actor TEXT NOT NULL, note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL, event BLOB NOT NULL, sent INTEGER NOT NULL DEFAULT 0
);
"""
COLUMNS = ("model", "version", "status", "created", "artifact", "manifest_sha256", "checksums", "parent",
           "snapshot_seq", "position", "scores", "reasons", "decided")
REGISTRY_FILE = "registry.sqlite"
PROMOTABLE = ("candidate", "rejected", "retired")   # rejected: an operator overrides the gate; retired: a rollback


class RegistryError(Exception):
    """A registry change that cannot be made (no such version, already production, ...)."""


class Registry(Protocol):
    """What the service and the CLI need from a registry; each method is one transaction."""

    def next_version(self, model: str) -> int: ...

    def add(self, record: VersionRecord) -> None: ...

    def get(self, model: str, version: int) -> Optional[VersionRecord]: ...

    def versions(self, model: Optional[str] = None) -> list[VersionRecord]: ...

    def production(self, model: str) -> Optional[VersionRecord]: ...

    def reject(self, model: str, version: int, scores: GateScores, reasons: list[str], actor: str) -> bool: ...

    def promote(self, model: str, version: int, action: str, actor: str, scores: Optional[GateScores] = None,
                reasons: Optional[list[str]] = None) -> ModelUpdate: ...

    def abandon_candidates(self, model: str, keep: Optional[int], note: str) -> list[int]: ...

    def changes(self, model: str) -> list[Change]: ...

    def unsent(self) -> list[tuple[int, ModelUpdate]]: ...

    def mark_sent(self, event_id: int) -> None: ...

    def close(self) -> None: ...


def open_registry(config: Config) -> SqliteRegistry:
    """The registry of this config: `publish.registry`, or `STATE_DIR/registry.sqlite`; a ConfigError if unusable."""
    path = config.publish.registry or Path(config.state_dir) / REGISTRY_FILE
    try:
        return SqliteRegistry(path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"config error: publish.registry: cannot open {path}: {err}") from None


class SqliteRegistry:
    """The registry in one SQLite file (WAL, synchronous=FULL: a committed change survives a power cut)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            for statement in filter(str.strip, SCHEMA.split(";")):
                self._db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; any exception (or a kill) rolls everything back."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def next_version(self, model: str) -> int:
        row = self._db.execute("SELECT MAX(version) FROM versions WHERE model = ?", (model,)).fetchone()
        return (row[0] or 0) + 1

    def add(self, record: VersionRecord) -> None:
        """Registers a new version (normally a candidate); the (model, version) must be new."""
        values = _row(record)
        with self._transaction() as db:
            try:
                db.execute(f"INSERT INTO versions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                           values)
            except sqlite3.IntegrityError as err:
                raise RegistryError(f"{record.model} v{record.version}: {err}") from None
            _log_change(db, record.model, record.version, record.status, "service", "created")

    def get(self, model: str, version: int) -> Optional[VersionRecord]:
        row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM versions WHERE model = ? AND version = ?",
                               (model, version)).fetchone()
        return _record(row) if row else None

    def versions(self, model: Optional[str] = None) -> list[VersionRecord]:
        """Every version (of one model, or all), newest first."""
        where, args = ("WHERE model = ?", (model,)) if model is not None else ("", ())
        rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM versions {where} ORDER BY model, version DESC",
                                args).fetchall()
        return [_record(row) for row in rows]

    def production(self, model: str) -> Optional[VersionRecord]:
        row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM versions WHERE model = ? AND status = 'production'",
                               (model,)).fetchone()
        return _record(row) if row else None

    def reject(self, model: str, version: int, scores: GateScores, reasons: list[str], actor: str) -> bool:
        """Candidate → rejected with the gate's scores and reasons; False when it is no candidate any more."""
        with self._transaction() as db:
            updated = db.execute("UPDATE versions SET status = 'rejected', scores = ?, reasons = ?, decided = ? "
                                 "WHERE model = ? AND version = ? AND status = 'candidate'",
                                 (_json(scores), _json(reasons), time.time(), model, version)).rowcount
            if updated:
                _log_change(db, model, version, "rejected", actor, "; ".join(reasons))
        return bool(updated)

    def promote(self, model: str, version: int, action: str, actor: str, scores: Optional[GateScores] = None,
                reasons: Optional[list[str]] = None) -> ModelUpdate:
        """Makes `version` production and the old one retired, and queues the event: one transaction."""
        with self._transaction() as db:
            record = self.get(model, version)
            if record is None:
                raise RegistryError(f"{model} has no version {version}")
            if record.status not in PROMOTABLE:
                raise RegistryError(f"{model} v{version} is already {record.status}")
            previous = self.production(model)
            now = time.time()
            if previous is not None:
                db.execute("UPDATE versions SET status = 'retired', decided = ? WHERE model = ? AND version = ?",
                           (now, model, previous.version))
                _log_change(db, model, previous.version, "retired", actor, f"replaced by v{version}")
            scores = scores if scores is not None else record.scores
            reasons = reasons if reasons is not None else record.reasons
            db.execute("UPDATE versions SET status = 'production', scores = ?, reasons = ?, decided = ? "
                       "WHERE model = ? AND version = ?", (_json(scores), _json(reasons), now, model, version))
            _log_change(db, model, version, "production", actor, f"{action}: " + "; ".join(reasons))
            event = ModelUpdate(model, version, action, record.artifact, record.manifest_sha256, record.checksums,
                                scores, now,
                                previous.version if previous is not None else None)
            db.execute("INSERT INTO outbox (model, event) VALUES (?, ?)", (model, msgspec.json.encode(event)))
            pause_point("in-transaction")
        return event

    def abandon_candidates(self, model: str, keep: Optional[int], note: str) -> list[int]:
        """Rejects every candidate of `model` but `keep` (candidates nobody is evaluating any more)."""
        with self._transaction() as db:
            versions = [v for (v,) in db.execute("SELECT version FROM versions WHERE model = ? AND "
                                                 "status = 'candidate'", (model,)) if v != keep]
            for version in versions:
                db.execute("UPDATE versions SET status = 'rejected', reasons = ?, decided = ? WHERE model = ? AND "
                           "version = ?", (_json([note]), time.time(), model, version))
                _log_change(db, model, version, "rejected", "service", note)
        return versions

    def changes(self, model: str) -> list[Change]:
        """The audit trail of one model, oldest first."""
        rows = self._db.execute("SELECT model, version, status, at, actor, note FROM changes WHERE model = ? "
                                "ORDER BY id", (model,)).fetchall()
        return [Change(*row) for row in rows]

    def unsent(self) -> list[tuple[int, ModelUpdate]]:
        """Events committed but not yet marked sent, oldest first."""
        rows = self._db.execute("SELECT id, event FROM outbox WHERE sent = 0 ORDER BY id").fetchall()
        return [(i, msgspec.json.decode(event, type=ModelUpdate)) for i, event in rows]

    def mark_sent(self, event_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET sent = 1 WHERE id = ?", (event_id,))

    def close(self) -> None:
        self._db.close()


def _json(value) -> str:
    return msgspec.json.encode(value).decode()


def _row(record: VersionRecord) -> tuple:
    return (record.model, record.version, record.status, record.created, record.artifact, record.manifest_sha256,
            _json(record.checksums), record.parent, record.snapshot_seq, _json(record.position), _json(record.scores),
            _json(record.reasons), record.decided)


def _record(row: tuple) -> VersionRecord:
    (model, version, status, created, artifact, sha, checksums, parent, snapshot_seq, position, scores, reasons,
     decided) = row
    return VersionRecord(model, version, status, created, artifact, sha, msgspec.json.decode(checksums),
                         parent, snapshot_seq,
                         msgspec.json.decode(position, type=StreamPosition),
                         msgspec.json.decode(scores, type=GateScores),
                         msgspec.json.decode(reasons, type=list[str]), decided)


def _log_change(db: sqlite3.Connection, model: str, version: int, status: str, actor: str, note: str) -> None:
    db.execute("INSERT INTO changes (model, version, status, at, actor, note) VALUES (?, ?, ?, ?, ?, ?)",
               (model, version, status, time.time(), actor, note))
