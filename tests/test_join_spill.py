"""Waiting logs spilled to disk: the same join as in memory, the same snapshot state, no files left behind."""

from __future__ import annotations

import random

import msgspec
import pytest

from streamlearn.stream import spill
from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.join import FeedbackJoiner, JoinerState

TTL, EARLY_TTL = 3600.0, 300.0


def events(seed: int, requests: int) -> list:
    """Logs at 10 a second with feedback that comes soon, late (past the spill age, before the ttl), too late or
    never; some feedback before its log, some ids sent twice."""
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        ts = i * 0.1
        out.append((ts, LogEntry(f"r-{i}", ts, "default", {"x": float(i), "c": "web" * (i % 3)})))
        delay = rng.choice([2.0, 30.0, spill.SPILL_AFTER + 50.0, 2000.0, TTL + 10.0, None, -20.0])
        if delay is not None:
            out.append((ts + delay, LabelEntry(f"r-{i}", ts + delay, i % 2 == 0, 1.0)))
        if i % 97 == 0:
            out.append((ts + 1.0, LogEntry(f"r-{i}", ts + 1.0, "default", {"x": 0.0})))   # a duplicate
    out.sort(key=lambda item: item[0])
    return [event for _, event in out]


def canonical(state: JoinerState) -> JoinerState:
    """A joiner's state with its waiting logs and newest closed ids in id order: spilled logs are listed first,
    and expire a second at a time from the spill, so these two lists come in another order than in memory."""
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=JoinerState)
    return msgspec.structs.replace(state, logs=sorted(state.logs, key=lambda log: log.request_id),
                                   closed=sorted(state.closed))


def run(joiner: FeedbackJoiner, stream: list, every: int = 500) -> tuple[list, list[JoinerState]]:
    """Feeds the stream, moving the watermark every `every` events; returns what came out and the states seen."""
    released, states = [], []
    for n, event in enumerate(stream, 1):
        (joiner.add_log if isinstance(event, LogEntry) else joiner.add_feedback)(event)
        if n % every == 0:
            released += joiner.advance(event.ts - 5.0)
            states.append(canonical(joiner.state()))
    released += joiner.advance(stream[-1].ts + 1.0) + joiner.flush()
    return released, states


@pytest.fixture
def small_segments(monkeypatch):
    monkeypatch.setattr(spill, "SEGMENT_BYTES", 64 << 10)   # many segments, so that emptied ones are closed


def test_a_spilling_join_matches_one_in_memory_and_snapshots_the_same(tmp_path, small_segments):
    stream = events(seed=5, requests=60_000)   # 6,000 s of event time: logs are spilled, and expire from the spill
    plain = FeedbackJoiner(TTL, EARLY_TTL, max_pending=1_000_000)
    spilling = FeedbackJoiner(TTL, EARLY_TTL, max_pending=1_000_000, spill_dir=tmp_path)
    spilled_seen = []
    original = spilling._logs.spill

    def spill_and_count(watermark: float) -> None:
        original(watermark)
        spilled_seen.append(len(spilling._logs._spilled))
    spilling._logs.spill = spill_and_count

    expected, expected_states = run(plain, stream)
    released, states = run(spilling, stream)
    assert max(spilled_seen) > 1_000   # the logs whose feedback is late or never comes went to disk
    assert [e.id for e in released] == [e.id for e in expected] and released == expected
    assert spilling.outcomes == plain.outcomes and plain.outcomes["late"] and plain.outcomes["expired"]
    assert states == expected_states   # the snapshot holds the logs themselves, read back from the spill
    assert spilling._logs._spill.files() < 5   # segments whose logs all left are closed
    assert list(tmp_path.iterdir()) == []       # unlinked files: nothing is left behind, even after a crash
    spilling.close()


def test_a_state_taken_while_logs_are_spilled_restores_without_the_spill(tmp_path):
    stream = events(seed=8, requests=8_000)   # 800 s: the first 500 s of logs are old enough to spill
    spilling = FeedbackJoiner(TTL, EARLY_TTL, max_pending=1_000_000, spill_dir=tmp_path)
    for event in stream:
        (spilling.add_log if isinstance(event, LogEntry) else spilling.add_feedback)(event)
    spilling.advance(800.0)
    assert len(spilling._logs._spilled) > 1_000
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(spilling.state()), type=JoinerState)
    restored = FeedbackJoiner(TTL, EARLY_TTL, max_pending=1_000_000)
    restored.restore(state)
    late = [LabelEntry(f"r-{i}", 900.0, True, 1.0) for i in range(0, 8_000, 7)]
    for joiner in (spilling, restored):
        for fb in late:
            joiner.add_feedback(fb)
    assert restored.outcomes == spilling.outcomes
    assert restored.advance(5_000.0) == spilling.advance(5_000.0)
    assert restored.outcomes == spilling.outcomes


def test_eviction_over_the_bound_picks_the_same_logs_when_they_are_spilled(tmp_path):
    stream = [e for e in events(seed=11, requests=12_000) if isinstance(e, LogEntry)]
    plain = FeedbackJoiner(TTL, EARLY_TTL, max_pending=5_000)
    spilling = FeedbackJoiner(TTL, EARLY_TTL, max_pending=5_000, spill_dir=tmp_path)
    for joiner in (plain, spilling):
        for n, log in enumerate(stream):
            joiner.add_log(log)
            if n % 1_000 == 0:
                joiner.advance(log.ts - 5.0)
    assert plain.outcomes["evicted"] > 0 and spilling.outcomes == plain.outcomes
    assert canonical(spilling.state()) == canonical(plain.state())


def test_a_spill_folder_that_cannot_be_written_leaves_the_logs_in_memory(tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    stream = events(seed=3, requests=6_000)
    plain = FeedbackJoiner(TTL, EARLY_TTL, max_pending=1_000_000)
    spilling = FeedbackJoiner(TTL, EARLY_TTL, max_pending=1_000_000, spill_dir=blocked)
    expected, _ = run(plain, stream)
    released, _ = run(spilling, stream)
    assert released == expected and spilling.outcomes == plain.outcomes
    assert "they stay in memory" in caplog.text
