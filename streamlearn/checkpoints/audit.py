"""An append-only log of learned example ids that a restore cuts back to its snapshot.

With it, "every example learned exactly once across crashes" can be checked from
outside: each snapshot records the log's length, and a restore truncates the log
to that length, dropping the ids learned after the snapshot (they will be learned
again from the snapshot's offsets).

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "learned.log"
>>> audit = AuditLog(path)
>>> audit.append(["a", "b"]); length = audit.sync(); audit.append(["c"]); audit.close()
>>> AuditLog(path, truncate_to=length).close(); path.read_text().split()
['a', 'b']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional


class AuditLog:
    """Learned ids, one per line, append-only; `sync()` returns the durable length in bytes."""

    def __init__(self, path: str | Path, truncate_to: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        if truncate_to is not None:
            self._file.truncate(truncate_to)
            self._file.seek(0, os.SEEK_END)   # truncate leaves tell() at the old end until the next write
        elif self._file.tell():
            # No snapshot to agree with: the ids in the file belong to some other run's state.
            self._file.truncate(0)

    def append(self, ids: Iterable[str]) -> None:
        self._file.write("".join(f"{i}\n" for i in ids).encode())

    def sync(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
