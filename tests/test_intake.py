"""The intake stage on a file: batches, cuts and offsets."""

from __future__ import annotations

import orjson
import pytest

from streamlearn.config import parse_config
from streamlearn.stream.dead_letters import FileDeadLetters
from streamlearn.stream.file_source import FileSource
from streamlearn.stream.intake import Intake
from streamlearn.stream.source import Chunk


def make_intake(tmp_path, lines: list[bytes], batch_size: int) -> Intake:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    config = parse_config({"source": f"file:{path}", "intake": {"batch_size": batch_size, "poll_records": 10_000}},
                          env={})
    return Intake(config, FileSource(path, 1 << 20), FileDeadLetters(tmp_path / "events.jsonl.dlq.jsonl"))


def test_a_large_release_goes_out_in_pieces_and_only_the_last_is_a_cut(tmp_path):
    lines = [orjson.dumps({"id": f"e-{i}", "ts": 10_000 - i, "features": {"x": i}, "label": i % 2})
             for i in range(2500)]
    batches = list(make_intake(tmp_path, lines, batch_size=1000).batches())
    assert [len(b.examples) for b in batches] == [1000, 1000, 500]
    assert [b.cut for b in batches] == [False, False, True]
    assert [b.offsets for b in batches[:2]] == [{}, {}]
    assert batches[-1].offsets == {f"file:{tmp_path / 'events.jsonl'}": 2500}
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


class Boom(Exception):
    """Raised by the tests' sabotaged stage for the one marked message."""


def pairs_and_examples(poison: bytes) -> list[bytes]:
    lines = []
    for i in range(10):
        lines.append(orjson.dumps({"request_id": f"r-{i}", "ts": 100 + i, "features": {"x": i}}))
        lines.append(orjson.dumps({"request_id": f"r-{i}", "ts": 101 + i, "label": i % 2}))
    lines += [orjson.dumps({"id": f"e-{i}", "ts": 120 + i, "features": {"x": i}, "label": 1}) for i in range(5)]
    lines.insert(7, poison)
    return lines


POISONS = {
    "inference-logs": orjson.dumps({"request_id": "poison", "ts": 105, "features": {"x": 1}}),
    "feedback": orjson.dumps({"request_id": "poison", "ts": 105, "label": 1}),
    "examples": orjson.dumps({"id": "poison", "ts": 105, "features": {"x": 1}, "label": 1}),
}
DECODERS = {"inference-logs": "decode_log", "feedback": "decode_feedback", "examples": "decode_example"}
ACCEPTORS = {"inference-logs": "add_log", "feedback": "add_feedback", "examples": "add_example"}


def sabotage(target, name: str, marked) -> None:
    """Makes `target.name` raise `Boom` for the marked message, and behave as before for the others."""
    original = getattr(target, name)

    def wrapped(value):
        if marked(value):
            raise Boom(f"sabotaged {name}")
        return original(value)
    setattr(target, name, wrapped)


def run_to_end(intake: Intake) -> list[str]:
    learned = [e.id for b in intake.batches() for e in b.examples]
    intake.close()
    return learned


def letters(tmp_path) -> list[dict]:
    return [orjson.loads(line) for line in (tmp_path / "events.jsonl.dlq.jsonl").read_bytes().splitlines()]


@pytest.mark.parametrize("stage", ["decoder", "joiner"])
@pytest.mark.parametrize("topic", list(POISONS))
def test_whatever_one_message_raises_it_is_dead_lettered_and_the_intake_goes_on(tmp_path, stage, topic):
    intake = make_intake(tmp_path, pairs_and_examples(POISONS[topic]), batch_size=100)
    if stage == "decoder":
        sabotage(intake.decoder, DECODERS[topic], lambda raw: b"poison" in raw)
    else:
        sabotage(intake.joiner, ACCEPTORS[topic],
                 lambda record: getattr(record, "request_id", getattr(record, "id", "")) == "poison")
    learned = run_to_end(intake)
    assert sorted(learned) == sorted([f"r-{i}" for i in range(10)] + [f"e-{i}" for i in range(5)])
    stats = intake.stats()
    assert stats.dead_letters == {(topic, "undecodable"): 1}
    assert stats.events[(topic, "dead_letter")] == 1
    [letter] = letters(tmp_path)
    assert (letter["reason"], letter["line"], letter["topic"]) == ("undecodable", 8, topic)
    assert letter["detail"].startswith("Boom: sabotaged")


def test_a_line_whose_topic_cannot_be_told_goes_to_the_log_decoder(tmp_path, monkeypatch):
    from streamlearn.stream import file_source

    original = file_source._parse_leniently

    def sniff(raw: bytes):
        if b"poison" in raw:
            raise Boom("sabotaged sniffing")
        return original(raw)
    monkeypatch.setattr(file_source, "_parse_leniently", sniff)
    intake = make_intake(tmp_path, pairs_and_examples(POISONS["feedback"]), batch_size=100)
    learned = run_to_end(intake)
    assert len(learned) == 15
    [letter] = letters(tmp_path)
    assert (letter["reason"], letter["line"], letter["topic"]) == ("schema", 8, "inference-logs")  # no features


def test_deep_nesting_is_a_dead_letter_on_every_path(tmp_path):
    deep = [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
            b'{"request_id": "r", "ts": 1, "label": 1, "features": {"x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000
            + b"}}",
            b'{"request_id": "r", "ts": 1, "label": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    intake = make_intake(tmp_path, pairs_and_examples(POISONS["feedback"])[:-1] + deep, batch_size=100)
    assert len(run_to_end(intake)) == 15 - 1
    assert [(letter["reason"], letter["topic"]) for letter in letters(tmp_path)] == [
        ("not_object", "inference-logs"), ("schema", "inference-logs"), ("schema", "inference-logs"),
        ("schema", "inference-logs")]


class ListSource:
    """A replayable in-memory source: the given chunks in one poll, then exhausted (as a file is)."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.done = False

    def poll(self, max_records: int, timeout: float) -> list[Chunk]:
        chunks, self.chunks, self.done = self.chunks, [], True
        return chunks

    def partitions(self) -> list[str]:
        return ["logs:0", "feedback:0"]

    def exhausted(self) -> bool:
        return self.done

    def caught_up(self) -> set[str]:
        return set(self.partitions()) if self.done else set()

    def problem(self) -> str:
        return ""

    def pause(self, keys: set[str]) -> None:
        pass

    def resume(self, keys: set[str]) -> None:
        pass

    def commit(self, offsets: dict[str, int]) -> None:
        pass

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    def close(self) -> None:
        pass


def test_event_times_far_after_the_broker_timestamp_are_refused_the_same_on_replay(tmp_path):
    broker = 1_763_800_000.0
    logs = [orjson.dumps({"request_id": f"r-{i}", "ts": broker + dt, "features": {"x": 1}})
            for i, dt in enumerate([0, 3600, 3601, -86_400 * 365 * 20, 1e7])]
    feedback = [orjson.dumps({"request_id": f"r-{i}", "ts": broker + dt + 1, "label": 1})
                for i, dt in enumerate([0, 3600, 3601, -86_400 * 365 * 20, 1e7])]

    def run(tag: str) -> tuple[list[str], list[str]]:
        chunks = [Chunk("inference-logs", "logs:0", logs, list(range(5)), 5, [broker] * 5),
                  Chunk("feedback", "feedback:0", feedback, list(range(5)), 5, [broker + 5000] * 5)]
        config = parse_config({"source": "file:unused", "intake": {"max_future_seconds": 3600}}, env={})
        sink = FileDeadLetters(tmp_path / f"{tag}.dlq.jsonl")
        learned = run_to_end(Intake(config, ListSource(chunks), sink))
        dead = [(d["topic"], d["line"] - 1, d["reason"]) for d in letters_at(tmp_path / f"{tag}.dlq.jsonl")]
        return sorted(learned), dead

    learned, dead = run("first")
    assert learned == ["r-0", "r-1", "r-3"]
    assert dead == [("inference-logs", 2, "schema"), ("inference-logs", 4, "schema"), ("feedback", 4, "schema")]
    assert run("replay") == (learned, dead)


def test_a_message_without_a_broker_timestamp_is_not_refused_for_it(tmp_path):
    logs = [orjson.dumps({"request_id": f"r-{i}", "ts": 4e9, "features": {"x": 1}}) for i in range(2)]
    chunks = [Chunk("inference-logs", "logs:0", logs, [0, 1], 2, [float("nan"), 1.0])]   # the first has none
    config = parse_config({"source": "file:unused"}, env={})
    intake = Intake(config, ListSource(chunks), FileDeadLetters(tmp_path / "dlq.jsonl"))
    run_to_end(intake)
    assert intake.stats().join_pending + intake.stats().join["expired"] == 1   # r-0 read: no stamp, no check
    assert intake.stats().dead_letters == {("inference-logs", "schema"): 1}    # r-1: far ahead of its stamp


def letters_at(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
