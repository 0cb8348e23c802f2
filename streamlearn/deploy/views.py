"""What `streamlearn models list | show | diff` print: registry records as table lines, JSON and differences.

>>> from streamlearn.deploy.records import GateScores
>>> a = VersionRecord("m", 1, "retired", 0.0, "file:///a/v1", "s1", {"model.pkl": "aa"},
...                   scores=GateScores(recent=Comparison(0.9)))
>>> b = VersionRecord("m", 2, "production", 60.0, "file:///a/v2", "s2", {"model.pkl": "bb"}, parent=1,
...                   position=StreamPosition(5000), scores=GateScores(recent=Comparison(0.95, 0.9, 100)))
>>> print("\\n".join(diff_lines(a, b)))
status: retired -> production
parent: - -> 1
examples: 0 -> 5000 (+5000)
recent: 0.9000 -> 0.9500 (+0.0500)
files changed: model.pkl
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import msgspec

from streamlearn.deploy.records import SETS, Change, Comparison, StreamPosition, VersionRecord

HEADER = (f"{'model':<12} {'version':>7}  {'status':<10} {'created (UTC)':<19} {'parent':>6} {'snapshot':>8} "
          f"{'examples':>10}  {'recent':>13} {'historical':>13} {'shadow':>13}  reason")


def utc(unix: Optional[float]) -> str:
    """`2026-11-23 20:05:00` (UTC), or `-` for no time."""
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if unix is not None else "-"


def _score(found: Optional[Comparison]) -> str:
    """`0.9500 (+0.012)`: the candidate's score and its difference to production's."""
    if found is None:
        return "-"
    return f"{found.candidate:.4f}" + (f" ({found.delta:+.3f})" if found.delta is not None else "")


def row(record: VersionRecord) -> str:
    """One table line per version."""
    scores = " ".join(f"{_score(getattr(record.scores, name)):>13}" for name in SETS)
    reason = "; ".join(record.reasons)
    return (f"{record.model:<12} {record.version:>7}  {record.status:<10} {utc(record.created):<19} "
            f"{_dash(record.parent):>6} {_dash(record.snapshot_seq):>8} {record.position.examples:>10,}  {scores}  "
            f"{reason[:100]}")


def shown(record: VersionRecord, changes: list[Change], artifact: str) -> dict:
    """One version in full, its audit trail and whether its artifact verifies, as a JSON-ready dict."""
    out = msgspec.to_builtins(record)
    out["created_utc"], out["decided_utc"] = utc(record.created), utc(record.decided)
    out["history"] = [{"at_utc": utc(c.at), "status": c.status, "actor": c.actor, "note": c.note}
                      for c in changes if c.version == record.version]
    out["artifact_check"] = artifact
    return out


def diff_lines(a: VersionRecord, b: VersionRecord) -> list[str]:
    """What differs from version `a` to version `b`: status, lineage, stream position, scores, files."""
    lines = [f"{name}: {_dash(getattr(a, name))} -> {_dash(getattr(b, name))}"
             for name in ("status", "parent", "snapshot_seq") if getattr(a, name) != getattr(b, name)]
    if a.position.examples != b.position.examples:
        step = b.position.examples - a.position.examples
        lines.append(f"examples: {a.position.examples} -> {b.position.examples} ({step:+d})")
    lines += _offset_lines(a.position, b.position)
    pairs = [(name, getattr(a.scores, name), getattr(b.scores, name)) for name in SETS]
    pairs += [(f"capability {name}", a.scores.capabilities.get(name), b.scores.capabilities.get(name))
              for name in sorted(set(a.scores.capabilities) | set(b.scores.capabilities))]
    for name, old, new in pairs:
        if old is not None and new is not None:
            lines.append(f"{name}: {old.candidate:.4f} -> {new.candidate:.4f} ({new.candidate - old.candidate:+.4f})")
        elif old is not None or new is not None:
            lines.append(f"{name}: {_score(old)} -> {_score(new)}")
    changed = sorted(n for n in set(a.checksums) | set(b.checksums) if a.checksums.get(n) != b.checksums.get(n))
    lines.append(f"files changed: {', '.join(changed)}" if changed else "files: identical")
    return lines


def _offset_lines(a: StreamPosition, b: StreamPosition) -> list[str]:
    return [f"offset {key}: {_dash(a.offsets.get(key))} -> {_dash(b.offsets.get(key))}"
            for key in sorted(set(a.offsets) | set(b.offsets)) if a.offsets.get(key) != b.offsets.get(key)]


def _dash(value) -> str:
    return "-" if value is None else str(value)
