"""The intake stage: source -> decode + validate -> dead letters -> join -> batches.

`Intake.batches()` yields `Batch`es of examples in learning order. Each batch
carries the source offsets after everything it covers: examples not in it are
still held by the joiner, whose state is the intake's own. When the joiner
releases more than `batch_size` examples at once (a backlog catching up), the
release goes out in pieces; only the last piece is a `cut` whose offsets
describe a consistent state, so only after it may offsets be committed.

Over an in-memory source (`streamlearn.testing`): a log and its feedback joined, a bad
message dead-lettered with its position, and the final cut's offsets.

>>> from streamlearn.config import Config
>>> from streamlearn.testing import MemorySource, memory_intake
>>> source = MemorySource({"inference-logs:0": [{"request_id": "r-1", "ts": 1, "features": {"x": 0.5}}],
...                        "feedback:0": [{"request_id": "r-1", "ts": 2, "label": True}, b"{broken"]})
>>> intake = memory_intake(Config(), source)
>>> batches = list(intake.batches())
>>> [(e.id, e.label) for b in batches for e in b.examples], batches[-1].final, batches[-1].offsets
([('r-1', True)], True, {'feedback:0': 2, 'inference-logs:0': 1})
>>> [(letter.key, letter.reason) for letter in intake.dead_letters.letters]
[('feedback:0@1', 'invalid_json')]
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import msgspec
import numpy as np
import orjson

from streamlearn.config import Config
from streamlearn.records import Batch, Example, IntakeStats, Rejected, handoff_pieces
from streamlearn.stream.dead_letters import DeadLetterSink
from streamlearn.stream.decode import DeadLetter, EventDecoder
from streamlearn.stream.events import EXAMPLES_TOPIC, FEEDBACK_TOPIC, INFERENCE_TOPIC
from streamlearn.stream import pieces
from streamlearn.stream.join import FeedbackJoiner, JoinerState
from streamlearn.stream.source import Chunk, Source, partition_number
from streamlearn.stream.watermark import NEVER, PartitionWatermarks
from streamlearn.telemetry.histogram import DELAY_BUCKETS, STAGE_BUCKETS, WAIT_BUCKETS, Histogram

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 0.5  # an empty batch at least this often keeps the counters on the learner side fresh
BARRIER_FLUSH_SECONDS = 1.0  # a barrier waits this long for dead letters to land, then tries at the next cut
FINAL_FLUSH_SECONDS = 10.0   # the last snapshot waits longer: after it the intake exits
# The feedback loop's stages timed here, per example (wall clock, measurement only; the learner times the rest):
# kafka: broker timestamp of the message that completed the example -> read; join: read -> released by the
# watermark; batch: released -> handed over in a batch (intake.max_wait, intake.batch_size).
INTAKE_STAGES = ("kafka", "join", "batch")


class IntakeState(msgspec.Struct):
    """The intake's part of a snapshot: pending joins, watermarks and counters at a cut."""

    joiner: JoinerState
    newest: dict[str, float]   # per partition: the newest event time delivered
    floor: float               # the watermark so far
    stats: IntakeStats
    dead_letter_ends: dict[str, int] = {}   # where the dead-letter sink's output ended (what a restore skips after)


class Resume(msgspec.Struct):
    """Where an intake starts: a snapshot's offsets and the intake state it holds (none: from scratch)."""

    offsets: dict[str, int] = {}
    state: Optional[bytes] = None


class Intake:
    """Turns a source's raw messages into batches of joined, validated examples."""

    def __init__(self, config: Config, source: Source, dead_letters: DeadLetterSink,
                 clock: Callable[[], float] = time.monotonic, resume: Optional[Resume] = None,
                 spill_dir: Optional[Path] = None) -> None:
        self.source = source
        self.dead_letters = dead_letters
        self.clock = clock
        self.batch_size = config.intake.batch_size
        self.max_wait = config.intake.max_wait
        self.poll_records = config.intake.poll_records
        bounds = {name: m.max_abs_feature for name, m in config.models.items()}
        lm = frozenset(n for n, m in config.models.items() if m.is_lm)
        self.decoder = EventDecoder(set(config.models), config.intake.max_message_bytes, bounds,
                                    config.intake.max_future_seconds, lm)
        regression = frozenset(n for n, m in config.models.items() if m.task == "regression")
        self.joiner = FeedbackJoiner(config.join.ttl, config.join.early_ttl, config.join.max_pending, regression,
                                     {name: bounds[name] for name in regression}, spill_dir, lm)
        self.watermarks = PartitionWatermarks(config.join.max_out_of_order)
        self.max_ahead = config.intake.max_ahead
        self._paused: set[str] = set()          # partitions paused for running ahead in event time
        self._flush_on_stop = not config.snapshot.enabled   # else what the join holds stays in the final snapshot
        if config.join.idle_timeout is not None:
            log.warning("join.idle_timeout is no longer used: a partition stops holding the watermark when the "
                        "broker says it is at its end")
        resume = resume or Resume()
        self.offsets: dict[str, int] = dict(resume.offsets)
        self.events: Counter[tuple[str, str]] = Counter()
        self.dead: Counter[tuple[str, str]] = Counter()
        self.feedback_delay = Histogram(DELAY_BUCKETS)
        self.queueing: dict[str, Histogram] = {}   # per topic: broker timestamp -> read here
        # Counted since this process started (not restored: the learner's stages restart with it too).
        self.stages = {name: Histogram(STAGE_BUCKETS) for name in INTAKE_STAGES}
        self._released_at = 0.0   # wall time of the newest release by the join
        self._watermark = NEVER
        k = config.kafka
        self._kinds = {k.inference_topic: INFERENCE_TOPIC, k.feedback_topic: FEEDBACK_TOPIC,
                       k.examples_topic: EXAMPLES_TOPIC, INFERENCE_TOPIC: INFERENCE_TOPIC,
                       FEEDBACK_TOPIC: FEEDBACK_TOPIC, EXAMPLES_TOPIC: EXAMPLES_TOPIC}
        self._known_partitions: set[str] = set()
        self._rejected_topic = k.examples_topic or k.inference_topic
        self.barrier_requested = False
        self.state_follows = False   # a cut's state is sent after its batch, in pieces (the intake process)
        since: Optional[dict[str, int]] = None   # no snapshot: everything in the dead-letter sink was delivered now
        if resume.state is not None:
            restored = msgspec.msgpack.decode(resume.state, type=IntakeState)
            self._restore(restored)
            since = restored.dead_letter_ends
        skipped = self.dead_letters.skip_delivered(since)
        if skipped:
            log.info("%d dead letters were delivered after the snapshot; they are not sent again", skipped)

    def state(self) -> bytes:
        """This intake's state now, as the opaque bytes a barrier carries."""
        return b"".join(self.state_pieces())

    def state_pieces(self) -> Iterator[pieces.Piece]:
        """`state()` in pieces of about a MB (what the intake process sends, so it never holds the whole of it).

        The msgpack of an `IntakeState`, written field by field in the struct's order: the same bytes as
        `msgspec.msgpack.encode(IntakeState(...))` (tests/test_intake_state.py holds it to that).
        """
        encode = msgspec.msgpack.Encoder().encode
        newest, floor = self.watermarks.state()
        fields = {"newest": newest, "floor": floor, "stats": self.stats(), "dead_letter_ends": self.dead_letters.ends()}
        names = [f.encode_name for f in msgspec.structs.fields(IntakeState)]
        yield pieces.map_header(len(names))
        for name in names:
            yield encode(name)
            if name == "joiner":
                yield from self.joiner.state_pieces(encode)
            else:
                yield encode(fields[name])

    def _restore(self, state: IntakeState) -> None:
        self.joiner.restore(state.joiner)
        self.watermarks.restore(state.newest, state.floor)
        self._watermark = state.floor
        self.events.update(state.stats.events)
        self.dead.update(state.stats.dead_letters)
        if state.stats.feedback_delay is not None:
            self.feedback_delay = Histogram.from_state(state.stats.feedback_delay)
        self.queueing = {topic: Histogram.from_state(h) for topic, h in state.stats.queueing.items()}

    def batches(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Batch]:
        """Yields batches until the source is exhausted or `should_stop()`; the last one is `final`."""
        held: list[Example] = []
        runs: list[tuple[int, float]] = []   # (examples, released at) of what is held, for the batch stage
        first_held_at = last_yield = self.clock()
        while not should_stop():
            examples = self.poll(timeout=self.max_wait, room=self.batch_size - len(held))
            now = self.clock()
            if examples and not held:
                first_held_at = now
            self._hold(held, runs, examples)
            done = self.source.exhausted()
            if done:
                self._hold(held, runs, self.finish())
            due = held and (len(held) >= self.batch_size or now - first_held_at >= self.max_wait)
            if due or done or now - last_yield >= HEARTBEAT_SECONDS:
                yield from self._pieces(held, final=done, exhausted=done, runs=runs)
                held, runs, last_yield = [], [], now
            if done:
                return
        # Stopped: what the join holds goes into the final snapshot, to be released as it would have been.
        self._hold(held, runs, self._released(self.joiner.flush()) if self._flush_on_stop else [])
        yield from self._pieces(held, final=True, runs=runs)

    def _hold(self, held: list[Example], runs: list[tuple[int, float]], examples: list[Example]) -> None:
        """Adds what the join just released to what waits for the next batch, with when it was released."""
        if examples:
            held.extend(examples)
            runs.append((len(examples), self._released_at))

    def _pieces(self, examples: list[Example], final: bool, exhausted: bool = False,
                runs: tuple[tuple[int, float], ...] | list[tuple[int, float]] = ()) -> Iterator[Batch]:
        """`examples` in batches of at most `batch_size`; the last one is the cut (`exhausted`: no input is left).

        `runs`: (how many, released at) for `examples`, in order: their wait for this hand-off is the batch stage.
        """
        sent = time.time()
        for count, released in runs:
            self.stages["batch"].observe(max(0.0, sent - released), count)
        stats = self.stats()
        leading, last = handoff_pieces(examples, self.batch_size)
        for piece in leading:
            yield Batch(piece, stats=stats, cut=False, sent=sent)
        carries = self._barrier(final)
        yield Batch(last, dict(self.offsets), stats, final=final, exhausted=exhausted,
                    barrier=self.state() if carries and not self.state_follows else None,
                    barrier_follows=carries and self.state_follows, sent=sent)

    def _barrier(self, final: bool) -> bool:
        """Whether this cut carries the state a snapshot asked for (the final cut: always), once every dead
        letter so far has landed. With `state_follows`, the caller sends `state_pieces()` after the batch
        (before asking for the next one, so the state is the cut's).

        This is step 2 of the cut procedure (`streamlearn.checkpoints.cut`): step 1 set `barrier_requested`;
        the learner takes steps 3 to 6 when this cut's batch, carrying the state, reaches it.
        The snapshot keeps where the dead letters end, so each one before the cut must be delivered first.
        While the broker takes none (an outage), the cut goes out without a barrier and the next one tries
        again: the intake keeps its heartbeat instead of blocking on the flush.
        """
        if not (self.barrier_requested or final):
            return False
        if not self.dead_letters.flush(FINAL_FLUSH_SECONDS if final else BARRIER_FLUSH_SECONDS) and not final:
            return False
        self.barrier_requested = False
        return True

    def poll(self, timeout: float, room: Optional[int] = None) -> list[Example]:
        """One poll of the source: decodes, joins, and returns the examples the watermark released (at most `room`).

        While the join still holds released examples (a backlog catching up), the source is not read: they go
        out first, `room` at a time, each piece a consistent cut.
        """
        room = self.batch_size if room is None else room
        if not self.joiner.releasable(self._watermark):
            self._read(timeout)
        return self._released(self.joiner.advance(self._watermark, room))

    def _released(self, examples: list[Example]) -> list[Example]:
        """Times the join stage of examples the join just released (read -> now) and returns them."""
        if examples:
            self._released_at = now = time.time()
            consumed = np.fromiter((e.consumed for e in examples), float, len(examples))
            self.stages["join"].observe_many(np.maximum(now - consumed[consumed > 0], 0.0))   # 0: not timed
        return examples

    def _read(self, timeout: float) -> None:
        """Reads, decodes and joins one poll's messages; moves the watermark; pauses what runs ahead."""
        chunks = self.source.poll(self.poll_records, timeout)
        self.joiner.consumed = consumed = time.time()
        for chunk in chunks:
            completing: Optional[list[int]] = [] if chunk.timestamps else None
            newest = self._take(chunk, completing)
            if chunk.timestamps:
                waits = consumed - np.asarray(chunk.timestamps)
                self._queueing(chunk.topic).observe_many(waits[~np.isnan(waits)])
                if completing:   # the kafka stage: the waits of the messages that completed an example
                    waits = waits[completing]
                    self.stages["kafka"].observe_many(np.maximum(waits[~np.isnan(waits)], 0.0))
            if newest > NEVER:
                self.watermarks.observe(chunk.partition, newest)
            self.offsets[chunk.partition] = chunk.next_offset
        self._track_assignment()
        self.watermarks.set_caught_up(self.source.caught_up())
        self._watermark = self.watermarks.current()
        self._align()

    def _align(self) -> None:
        """Pauses the partitions that ran ahead of the slowest by more than `intake.max_ahead`, resumes the rest
        (Flink's watermark alignment): memory during a catch-up is bounded by that, not by the backlog."""
        # Hysteresis: a paused partition stays paused until it is within half the bound, so that partitions
        # near the bound are not paused and resumed at every poll (each resume throws the prefetch away).
        ahead = self.watermarks.ahead(self.max_ahead) | (self._paused & self.watermarks.ahead(self.max_ahead / 2))
        if ahead != self._paused:
            self.source.resume(self._paused - ahead)
            self.source.pause(ahead - self._paused)
            self._paused = ahead

    def _queueing(self, topic: str) -> Histogram:
        histogram = self.queueing.get(topic)
        if histogram is None:
            histogram = self.queueing[topic] = Histogram(WAIT_BUCKETS)
        return histogram

    def finish(self) -> list[Example]:
        """End of input: everything seen has arrived, so the watermark moves to the newest event."""
        self._watermark = max(self._watermark, self.watermarks.newest())
        return self._released(self.joiner.advance(self._watermark) + self.joiner.flush())

    def _take(self, chunk: Chunk, completing: Optional[list[int]] = None) -> float:
        """Decodes, checks and joins one chunk's messages; returns the newest event time accepted.

        `completing` gets the index of each message that completed an example (a pair's second half, or a
        prejoined example), for the kafka stage.

        Total: whatever decoding or joining one message raises, that message is dead-lettered
        `undecodable` (the exception's class in the detail), counted, and the chunk goes on. Where
        the source gives each message's broker timestamp, an event time more than
        `intake.max_future_seconds` after it is refused (`schema`).
        """
        kind = self._kinds.get(chunk.topic, INFERENCE_TOPIC)
        decode, accept = {
            INFERENCE_TOPIC: (self.decoder.decode_log, self.joiner.add_log),
            FEEDBACK_TOPIC: (self.decoder.decode_feedback, self.joiner.add_feedback),
            EXAMPLES_TOPIC: (self.decoder.decode_example, self.joiner.add_example),
        }[kind]
        stamps = chunk.timestamps or None   # one per message, as the sources give them
        ahead = self.decoder.max_future_seconds
        newest, refused = NEVER, 0
        matches = self.joiner.delays   # one entry per pair matched (drained by `stats`, never during a chunk)
        every = kind == EXAMPLES_TOPIC   # a prejoined example is complete in its one message
        track = completing is not None
        part = partition_number(chunk.partition)   # carried by what the join holds: rescaling divides by it
        for i, (raw, offset) in enumerate(zip(chunk.values, chunk.offsets)):
            try:
                record = decode(raw)
                if type(record) is not DeadLetter:
                    record.partition = part
                    if stamps is not None and record.ts - stamps[i] > ahead:
                        record = self.decoder.ahead_of_broker(record.ts, stamps[i])
                    else:
                        matched = len(matches)
                        accept(record)
                        if track and (every or len(matches) != matched):
                            completing.append(i)
            except Exception as err:   # noqa: BLE001 - one message must never stop the intake
                record = _undecodable(err)
            if type(record) is DeadLetter:
                refused += 1
                self.dead[(chunk.topic, record.reason)] += 1
                self.dead_letters.send(chunk.topic, chunk.partition, offset, raw, record)
                continue
            if record.ts > newest:
                newest = record.ts
        self.events[(chunk.topic, "ok")] += len(chunk.values) - refused
        if refused:
            self.events[(chunk.topic, "dead_letter")] += refused
        return newest

    def _track_assignment(self) -> None:
        current = set(self.source.partitions())
        for key in current - self._known_partitions:
            self.watermarks.assign(key)
        for key in self._known_partitions - current:
            self.watermarks.revoke(key)
            self._paused.discard(key)   # a partition assigned again starts unpaused
        self._known_partitions = current

    def stats(self) -> IntakeStats:
        if self.joiner.delays:
            self.feedback_delay.observe_many(self.joiner.delays)
            self.joiner.delays.clear()
        return IntakeStats(
            events=dict(self.events), dead_letters=dict(self.dead), join=dict(self.joiner.outcomes),
            join_pending=self.joiner.pending, feedback_delay=self.feedback_delay.state(),
            consumer_lag=self.source.lag(), queueing={t: h.state() for t, h in self.queueing.items()},
            stages={name: h.state() for name, h in self.stages.items()},
            watermark=self._watermark, released_to=min(self._watermark, self.joiner.held_from()),
            assigned=sorted(self._known_partitions),
            caught_up=self._watermark >= self.watermarks.newest() and not self.joiner.held,
            broker=self.source.problem(),
        )

    def reject(self, rejected: list[Rejected]) -> None:
        """Dead-letters examples a model refused, as `examples` messages that can be re-sent once it is fixed.

        They are counted by the learners (`learn_errors_total`, exact across restores), not here.
        """
        for r in rejected:
            ex = r.example
            raw = orjson.dumps(_example_message(ex))
            self.dead_letters.send(self._rejected_topic, "", -1, raw, DeadLetter("learn_error", f"{r.error}: {r.detail}"),
                                   key=f"learn_error:{r.model}:{ex.id}")

    def commit(self, offsets: dict[str, int]) -> None:
        """Makes dead letters durable, then records offsets with the source."""
        self.dead_letters.flush()
        self.source.commit(offsets)

    def close(self) -> None:
        self.dead_letters.close()
        self.source.close()
        self.joiner.close()


def _example_message(ex: Example) -> dict:
    """An example as the `examples` message that gives it again: features and label, or a language model's
    conversation and its feedback (from which the answer to learn, its label, is made again)."""
    if ex.text is None:
        return {"id": ex.id, "ts": ex.ts, "model": ex.model, "features": ex.features, "label": ex.label,
                "weight": ex.weight}
    text = ex.text
    feedback = {"rating": text.rating, "correction": text.correction}
    return {"id": ex.id, "ts": ex.ts, "model": ex.model, "weight": ex.weight,
            "messages": [{"role": turn.role, "content": turn.content} for turn in text.messages],
            "answer": text.answer, **{name: value for name, value in feedback.items() if value is not None}}


def _undecodable(err: BaseException) -> DeadLetter:
    """The safety net's letter: the exception's class and the start of its message."""
    try:
        message = str(err)[:300]
    except Exception:   # noqa: BLE001 - even its message may be broken
        message = "(no message)"
    return DeadLetter("undecodable", f"{type(err).__name__}: {message}")
