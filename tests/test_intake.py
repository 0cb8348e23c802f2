"""The intake stage on a file: batches, cuts and positions."""

from __future__ import annotations

import orjson

from streamlearn.config import parse_config
from streamlearn.stream.dead_letters import FileDeadLetters
from streamlearn.stream.file_source import FileSource
from streamlearn.stream.intake import Intake


def make_intake(tmp_path, lines: list[bytes], batch_size: int) -> Intake:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    config = parse_config({"source": f"file:{path}", "intake": {"batch_size": batch_size, "poll_records": 10_000}},
                          env={})
    return Intake(config, FileSource(path, 1 << 20), FileDeadLetters(tmp_path / "events.jsonl.dlq.jsonl"))


def test_a_large_release_goes_out_in_pieces_and_only_the_last_is_a_cut(tmp_path):
    lines = [orjson.dumps({"id": f"e-{i}", "ts": 1000 - i, "features": {"x": i}, "label": i % 2})
             for i in range(2500)]
    batches = list(make_intake(tmp_path, lines, batch_size=1000).batches())
    assert [len(b.examples) for b in batches] == [1000, 1000, 500]
    assert [b.cut for b in batches] == [False, False, True]
    assert [b.positions for b in batches[:2]] == [{}, {}]
    assert batches[-1].positions == {f"file:{tmp_path / 'events.jsonl'}": 2500}
    assert batches[-1].final
    learned = [e.ts for b in batches for e in b.examples]
    assert learned == sorted(learned)  # released in event-time order, not file order


def test_joined_pairs_and_dead_letters_are_counted(tmp_path):
    lines = [orjson.dumps({"request_id": "r-1", "ts": 1, "features": {"x": 1}}),
             orjson.dumps({"request_id": "r-1", "ts": 2, "label": 1}),
             b"{broken",
             orjson.dumps({"request_id": "r-2", "ts": 3, "features": {"x": 2}})]
    intake = make_intake(tmp_path, lines, batch_size=10)
    examples = [e for b in intake.batches() for e in b.examples]
    stats = intake.stats()
    assert [e.id for e in examples] == ["r-1"]
    assert stats.join["matched"] == 1 and stats.join_pending == 1
    assert stats.dead_letters == {("inference-logs", "invalid_json"): 1}
    intake.close()
    letter = orjson.loads((tmp_path / "events.jsonl.dlq.jsonl").read_bytes())
    assert (letter["reason"], letter["line"]) == ("invalid_json", 3)  # 1-based, as editors count
