"""What the join holds in memory while a skewed catch-up fills it, and that it lets go once drained."""

from __future__ import annotations

import sys
import tracemalloc

from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.join import FeedbackJoiner

FEATURES = {"amount": 12.5, "age": 31.0, "country": "fr", "device": "ios", "score": 0.25, "new": True}


def log(i: int) -> LogEntry:
    return LogEntry(f"r-{i:07d}", 1000.0 + i * 0.01, "fraud", dict(FEATURES, amount=float(i)), "v3", i % 2 == 0)


def test_examples_waiting_for_the_watermark_are_held_packed():
    """Matched examples held behind a slow partition cost a few hundred bytes each, not their objects' ~1 KB."""
    joiner = FeedbackJoiner(ttl=3600, early_ttl=300, max_pending=10**6)
    entries = [(log(i), LabelEntry(f"r-{i:07d}", 1000.5 + i * 0.01, i % 3 == 0, 1.0)) for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for entry, feedback in entries:
            joiner.add_log(entry)
            joiner.add_feedback(feedback)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert joiner.held == 20_000
    assert held / 20_000 < 600, held / 20_000
    released = joiner.advance(10_000.0)
    assert [e.id for e in released] == [f"r-{i:07d}" for i in range(20_000)]
    assert released[7].features == dict(FEATURES, amount=7.0) and released[7].served is False
    assert released[3].label is True and released[4].model_version == "v3"


def test_drained_tables_give_their_room_back():
    """Feedback that waited for its log by the ten thousand, then matched: the table it filled shrinks again."""
    joiner = FeedbackJoiner(ttl=3600, early_ttl=300, max_pending=10**6)
    n = 50_000
    for i in range(n):
        joiner.add_feedback(LabelEntry(f"r-{i:07d}", 1000.5 + i * 0.01, True, 1.0))
    joiner.advance(0.0)
    full = sys.getsizeof(joiner._early)
    for i in range(n - 100):   # their logs come: all but 100 match
        joiner.add_log(log(i))
    joiner.advance(0.0)
    assert joiner.pending == 100 and joiner.held == n - 100
    assert sys.getsizeof(joiner._early) < full / 50, (sys.getsizeof(joiner._early), full)
    for i in range(n - 100, n):
        joiner.add_log(log(i))
    assert len(joiner.advance(10_000.0)) == n
