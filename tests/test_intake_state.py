"""The intake's state at a barrier, written in pieces: the same bytes as one msgspec encoding, and across processes."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from streamlearn.config import Config, parse_config
from streamlearn.records import Example
from streamlearn.stream.channel import STATE_FRAME_BYTES, ProcessIntake
from streamlearn.stream.decode import LabelEntry, LogEntry
from streamlearn.stream.intake import Intake, IntakeState, Resume
from streamlearn.testing import MemorySource, memory_intake


def whole(intake: Intake) -> bytes:
    """The state as it was encoded before it went out in pieces: one msgspec encoding of the struct."""
    newest, floor = intake.watermarks.state()
    return msgspec.msgpack.encode(IntakeState(intake.joiner.state(), newest, floor, intake.stats(),
                                              intake.dead_letters.ends()))


def fill(intake: Intake, requests: int, watermark: float) -> None:
    """Pending logs, closed ids (hashed past 32,768), examples waiting for the watermark, feedback waiting for its
    log and a pre-joined example; then the watermark moves: logs before `watermark - ttl` expire, and ids closed
    before `watermark - ttl - early_ttl` are forgotten (still in the arrays until the next merge)."""
    joiner = intake.joiner
    for i in range(requests):
        joiner.add_log(LogEntry(f"r-{i}", i * 0.01, "default", {"x": float(i), "c": "web"}, "3", i % 2 == 0))
        if i % 2:
            joiner.add_feedback(LabelEntry(f"r-{i}", i * 0.01 + 1.0, i % 3 == 0, 1.0))
    joiner.add_example(Example("e-1", "default", {"x": 1.0}, True, 1.0, 50.0, 50.0))
    joiner.advance(watermark, limit=100)
    for i in range(50):
        joiner.add_feedback(LabelEntry(f"f-{i}", watermark + i, False, 0.5))


@pytest.mark.parametrize("requests, watermark, forgotten", [(150_000, 3650.0, False), (80_000, 4400.0, True)])
def test_the_pieces_make_the_bytes_of_one_encoding_and_restore_to_the_same_state(requests, watermark, forgotten):
    intake = memory_intake(Config(), MemorySource({}))
    fill(intake, requests, watermark)
    joiner = intake.joiner
    assert joiner._closed.hashed > 0 and joiner._ready and joiner._early
    assert len(joiner._logs) > 65_535 or forgotten   # an array 32 header
    assert (joiner._closed.stale() > 0) == forgotten

    state = intake.state()
    assert state == whole(intake)
    assert max(len(p) for p in intake.state_pieces()) <= 2 * STATE_FRAME_BYTES   # never the whole state at once

    restored = memory_intake(Config(), MemorySource({}), resume=Resume({}, state))
    assert restored.state() == state
    assert restored.joiner._closed.get("r-70001") is joiner._closed.get("r-70001") is True
    assert (restored.joiner._closed.get("r-1") is None) == forgotten


def test_an_empty_intake_state_is_one_encoding_too():
    intake = memory_intake(Config(), MemorySource({}))
    assert intake.state() == whole(intake)


def test_the_intake_process_sends_a_state_of_many_frames_that_the_learner_reads_whole(tmp_path):
    """Logs whose feedback has not come: the final cut's state holds them all, several frames' worth."""
    path = tmp_path / "events.jsonl"
    lines = [orjson.dumps({"request_id": f"r-{i}", "ts": 1_000 + i * 0.01, "model": "default",
                           "features": {"x": i, "note": "a" * 60}}) for i in range(20_000)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = parse_config({"source": f"file:{path}", "state_dir": str(tmp_path / "state"),
                           "intake": {"mode": "process"}}, env={})
    channel = ProcessIntake(config, Resume())
    try:
        batches = list(channel.batches())
        channel.commit(batches[-1].offsets, final=True)
    finally:
        channel.close()
    final = batches[-1]
    assert final.final and final.barrier is not None and len(final.barrier) > 2 * STATE_FRAME_BYTES
    state = msgspec.msgpack.decode(final.barrier, type=IntakeState)
    assert sorted(log.request_id for log in state.joiner.logs) == sorted(f"r-{i}" for i in range(20_000))
    [log] = [log for log in state.joiner.logs if log.request_id == "r-123"]   # spilled, read back
    assert log == LogEntry("r-123", 1_001.23, "default", {"x": 123.0, "note": "a" * 60})
    assert list((tmp_path / "state").iterdir()) == []   # the spill files have no names
    assert state.stats.join_pending == 20_000
