"""Runs the intake beside the learner: in a second process (the default) or inline.

On a two-core box the Kafka client, decoding and joining cost about as much as
the learner itself (two messages per example), so the intake gets its own
process and hands the learner compact msgpack batches over a socket. The socket's
small buffer is the back-pressure: a busy learner stops the intake from reading
ahead. Control flows back on the same socket: commit offsets, stop.

Inline, over a JSONL file: a barrier asked for rides on the next cut, here the final one.

>>> import pathlib, tempfile
>>> from streamlearn.config import parse_config
>>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
>>> _ = path.write_text('{"id": "e-1", "ts": 5, "features": {"x": 1.0}, "label": true}\\n')
>>> channel = start_intake(parse_config({"source": f"file:{path}", "intake": {"mode": "inline"}}, env={}))
>>> channel.request_barrier()
>>> batch = next(channel.batches())
>>> [e.id for e in batch.examples], batch.final, batch.barrier is not None, batch.offsets == {f"file:{path}": 1}
(['e-1'], True, True, True)
>>> channel.commit(batch.offsets, final=True); channel.close()
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Mapping, Optional, Union

import msgspec

from streamlearn.config import Config, ConfigError, KafkaConfig, Setting, check_source, replica_rank, resolve_settings
from streamlearn.records import Batch, Rejected, decode_batch, encode_batch
from streamlearn.stream.dead_letters import FileDeadLetters, KafkaDeadLetters
from streamlearn.stream.file_source import FileSource
from streamlearn.stream.intake import Intake, Resume
from streamlearn.stream.kafka_source import kafka_topics, open_kafka_source
from streamlearn.stream.merge import check_intakes
from streamlearn.stream.source import Share, intake_share

if TYPE_CHECKING:
    from streamlearn.stream.fan_in import FanInIntake

log = logging.getLogger(__name__)
FINAL_COMMIT_WAIT = 30.0   # the learner's final commit follows the last snapshot's write: room for a slow disk
EXIT_WAIT_SECONDS = 5.0    # an intake whose socket closed is exiting: reaping it takes moments
BATCHES_IN_FLIGHT = 4
STATE_FRAME_BYTES = 1 << 20   # the intake's state at a barrier travels in frames of about this size
MMAP_THRESHOLD = 128 * 1024   # bytes: glibc's default before it adapts (see `_child_environment`)
# After a stop, how long the learner waits for the intake's next word before it stops without one (an
# intake still starting can be held a minute by a broker that cannot be reached; heartbeats come every 0.5 s).
STOP_PATIENCE = 5.0
WAKE_SECONDS = 0.25   # how often a learner waiting for a batch looks whether it was asked to stop


class IntakeDied(RuntimeError):
    """The intake process ended without being asked to: one line for the log, no traceback."""

    def __init__(self, code: Optional[int]) -> None:
        super().__init__(f"intake process died (exit code {code}); its log lines above say why")
        self.code = code


class Control(msgspec.Struct):
    """A message from the learner side to the intake."""

    # barrier: attach your state to the next cut; final_commit: the last word, the intake then exits;
    # reject: examples a model refused, for the intake's dead-letter sink (one sink, one exactly-once rule)
    kind: Literal["commit", "stop", "barrier", "final_commit", "reject"]
    offsets: dict[str, int] = {}
    rejected: list[Rejected] = []


def open_intake(config: Config, resume: Resume, share: Optional[Share] = None) -> Intake:
    """Builds the configured source and dead-letter sink, and the intake over them (over `share` of the partitions)."""
    path = config.file_path
    if path is not None:
        start_line = resume.offsets.get(f"file:{path}", 0)
        source = FileSource(path, config.intake.max_message_bytes, start_line)
        sink = FileDeadLetters(path.with_name(path.name + ".dlq.jsonl"))
    else:
        settings = resolve_settings(config.kafka.settings, os.environ)
        source = open_kafka_source(config.kafka, {**consumer_settings(config.kafka), **settings}, resume.offsets, share)
        sink = KafkaDeadLetters(config.kafka, settings, kafka_topics(config.kafka))
    return Intake(config, source, sink, resume=resume, spill_dir=Path(config.state_dir))


def consumer_settings(kafka: KafkaConfig) -> dict[str, Setting]:
    """The consumer's own client keys that streamlearn's config sets (`kafka.settings` still wins over them).

    Only the consumer gets them: a producer (dead letters) given a consumer key logs a warning at every start.
    """
    if kafka.fetch_wait_ms is None:
        return {}
    key = "fetch.wait.max.ms" if kafka.client == "confluent-kafka" else "fetch_max_wait_ms"
    return {key: kafka.fetch_wait_ms}


class InlineIntake:
    """The intake in the learner's own thread: simplest, for files, debugging and tests (`intake`: one built over
    another source, e.g. `streamlearn.testing.memory_intake`)."""

    def __init__(self, config: Config, resume: Resume, share: Optional[Share] = None,
                 intake: Optional[Intake] = None) -> None:
        self._intake = intake or open_intake(config, resume, share)
        self._stop = False

    def batches(self, stopping: Callable[[], bool] = lambda: False) -> Iterator[Batch]:
        for batch in self._intake.batches(lambda: self._stop):
            batch.received = time.time()   # stage timing: handed over in the same thread
            yield batch

    def commit(self, offsets: dict[str, int], final: bool = False) -> None:
        self._intake.commit(offsets)

    def request_stop(self) -> None:
        self._stop = True

    def request_barrier(self) -> None:
        self._intake.barrier_requested = True

    def reject(self, rejected: list[Rejected]) -> None:
        """Dead-letters examples a model refused (`learn_error`)."""
        self._intake.reject(rejected)

    def examples_in_flight(self) -> int:
        return 0   # the intake runs only when the learner asks for its next batch

    def close(self) -> None:
        self._intake.close()


class ProcessIntake:
    """The intake in a child process, talking to the learner over a socket pair.

    The child is a fresh interpreter (`python -m streamlearn.stream.channel`), not a
    multiprocessing fork or spawn: it shares no threads or locks with the parent and
    never re-imports the caller's `__main__`.
    """

    def __init__(self, config: Config, resume: Resume, share: Optional[Share] = None) -> None:
        check_source(config)   # a one-line ConfigError here, not a traceback from the child
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        fd = theirs.fileno()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "streamlearn.stream.channel", str(fd)],
            stdin=subprocess.PIPE, pass_fds=(fd,), env=_child_environment(os.environ))
        theirs.close()
        self._process.stdin.write(msgspec.msgpack.encode(ChildArgs(config, resume, share)))
        self._process.stdin.close()
        self._encoder = msgspec.msgpack.Encoder()
        # A socket buffer holds about one batch; this queue lets the intake run a few batches
        # ahead while the learner learns, instead of the two taking turns.
        # Each frame with the wall time it was received (stage timing: hand-off ends, the learner's queue starts).
        self._inbox: queue.Queue[Optional[tuple[float, bytes]]] = queue.Queue(maxsize=BATCHES_IN_FLIGHT)
        self._batch_size = config.intake.batch_size
        self._pump = threading.Thread(target=self._receive, name="intake-receiver", daemon=True)
        self._pump.start()

    def _receive(self) -> None:
        try:
            while True:
                data = self._conn.recv_bytes()
                self._inbox.put((time.time(), data))
        except (EOFError, OSError):
            self._inbox.put(None)

    def batches(self, stopping: Callable[[], bool] = lambda: False) -> Iterator[Batch]:
        """The intake's batches, up to its final one; after `stopping()`, up to a silence of `STOP_PATIENCE`."""
        patience = StopPatience(self.request_stop)
        while True:
            try:
                batch = self.next_batch(WAKE_SECONDS)
            except IntakeDied as died:
                if not stopping():
                    raise
                log.warning("the intake process ended (exit code %s) while stopping", died.code)
                return
            if batch is None:
                if stopping() and patience.exhausted():
                    self.abandon()
                    return
                continue
            patience.heard()
            yield batch
            if batch.final:
                return

    def next_batch(self, timeout: float) -> Optional[Batch]:
        """The intake's next batch (None: none came within `timeout`); raises `IntakeDied` once the process ended."""
        try:
            frame = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if frame is None:
            self._inbox.put(None)   # ended for every later call too
            raise IntakeDied(self._process.wait(EXIT_WAIT_SECONDS))
        batch = decode_batch(frame[1])
        batch.received = frame[0]
        if batch.barrier_follows:
            batch.barrier = self._receive_state()
            if batch.barrier is None:   # the intake ended while sending it: as if before the batch
                self._inbox.put(None)
                return self.next_batch(timeout)
        return batch

    def _receive_state(self) -> Optional[bytes]:
        """The intake's state that follows a batch: frames up to an empty one, joined (None: the intake ended)."""
        frames = []
        while True:
            item = self._inbox.get()
            if item is None:
                return None
            if not item[1]:
                return b"".join(frames)
            frames.append(item[1])

    def abandon(self) -> None:
        """Ends an intake that does not answer; what it did since the newest snapshot is read again at the next start."""
        self._process.kill()
        self._process.wait()

    def commit(self, offsets: dict[str, int], final: bool = False) -> None:
        """Asks the intake to commit `offsets`; after the `final` one it closes and exits."""
        self._send(Control("final_commit" if final else "commit", offsets))

    def request_stop(self) -> None:
        self._send(Control("stop"))

    def request_barrier(self) -> None:
        self._send(Control("barrier"))

    def reject(self, rejected: list[Rejected]) -> None:
        """Dead-letters examples a model refused (`learn_error`), through the intake's sink."""
        self._send(Control("reject", rejected=rejected))

    def examples_in_flight(self) -> int:
        """About how many examples are on their way (received, not learned): full batches while catching up.

        A barrier asked for now rides on the intake's next cut, after these: the learner asks that much early.
        """
        return self._inbox.qsize() * self._batch_size

    def _send(self, control: Control) -> None:
        try:
            self._conn.send_bytes(self._encoder.encode(control))
        except OSError:
            pass  # the intake is gone; batches() reports why

    def close(self) -> None:
        """Closes the socket (what was sent stays readable) and waits for the intake to finish."""
        self._conn.close()
        try:
            self._process.wait(FINAL_COMMIT_WAIT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class StopPatience:
    """After a stop: how long an intake that says nothing is waited for before it is abandoned (`STOP_PATIENCE`).

    An intake still starting can be held a minute by a broker that cannot be reached, and has no batch to
    answer the stop with: at the first silence the stop is said again (`request_stop`), then waited for.
    """

    def __init__(self, request_stop: Callable[[], None]) -> None:
        self._request_stop = request_stop
        self._since: Optional[float] = None

    def heard(self) -> None:
        self._since = None

    def exhausted(self) -> bool:
        """Called at each silence after the stop: whether the wait is over (with a warning, once)."""
        if self._since is None:
            self._since = time.monotonic()
            self._request_stop()
            return False
        if time.monotonic() - self._since < STOP_PATIENCE:
            return False
        log.warning("the intake did not answer the stop within %.0f s (still starting, or the broker cannot "
                    "be reached): stopping without its final batch", STOP_PATIENCE)
        return True


def _child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The intake child's environment: glibc's malloc told to hand large buffers straight back.

    Each barrier encodes the join state (megabytes, in a backlog) and frees it. glibc raises its mmap
    threshold to the largest block freed, so later ones come from the heap and its top ratchets up: the
    intake's RSS grew by a snapshot's size at a time. A fixed threshold keeps them mmapped, returned on
    free. (Other C libraries ignore the variable; a value the user set is kept.)
    """
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **env}


class ChildArgs(msgspec.Struct):
    config: Config
    resume: Resume
    share: Optional[Share] = None


def _intake_main(fd: int) -> None:
    # The learner's process owns signals; it tells the intake to stop and drains it. A signal to the whole
    # process group (Ctrl-C, `timeout`, a container runtime) must not end the intake before its final commit;
    # should the learner die instead, the socket's end tells the intake to go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ChildArgs)
    config = args.config
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s intake: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python narrates every connection at INFO
    conn = Connection(fd)
    try:
        intake = open_intake(config, args.resume, args.share)
    except ConfigError as err:   # one line (e.g. topics not co-partitioned for intake.processes), no traceback
        log.error("%s", err)
        sys.exit(2)
    controls = _ControlReader(conn, intake)
    intake.state_follows = True
    try:
        for batch in intake.batches(controls.stop_requested):
            conn.send_bytes(encode_batch(batch))
            if batch.barrier_follows:
                _send_state(conn, intake)
        controls.await_final_commit(FINAL_COMMIT_WAIT)
    except (OSError, EOFError):
        pass  # the learner went away; nothing to hand over to
    except ConfigError as err:   # found while reading: partitions added to one topic only
        log.error("%s", err)
        sys.exit(2)
    finally:
        intake.close()
        conn.close()


def _send_state(conn: Connection, intake: Intake) -> None:
    """Sends the intake's state as frames of about `STATE_FRAME_BYTES`, then an empty frame: the end.

    In a backlog the state is tens of MB (a ttl window of pending logs and closed ids); sent in pieces, the
    intake never holds it whole (the learner joins the frames).
    """
    frame: list[bytes | memoryview] = []
    size = 0
    for piece in intake.state_pieces():
        frame.append(piece)
        size += len(piece)
        if size >= STATE_FRAME_BYTES:
            conn.send_bytes(b"".join(frame))
            frame, size = [], 0
    if size:
        conn.send_bytes(b"".join(frame))
    conn.send_bytes(b"")


class _ControlReader:
    """The intake's side of the control messages: commits as they come, stop, the final commit."""

    def __init__(self, conn: Connection, intake: Intake) -> None:
        self.conn = conn
        self.intake = intake
        self.decoder = msgspec.msgpack.Decoder(Control)
        self.stopping = False
        self.finished = False

    def stop_requested(self) -> bool:
        while self.conn.poll():
            self._handle(self.decoder.decode(self.conn.recv_bytes()))
        return self.stopping

    def await_final_commit(self, timeout: float) -> None:
        """After the final batch: commits what the learner confirms, up to its final commit."""
        deadline = time.monotonic() + timeout
        while not self.finished and self.conn.poll(max(0.0, deadline - time.monotonic())):
            self._handle(self.decoder.decode(self.conn.recv_bytes()))
        if not self.finished:
            log.warning("no final commit from the learner within %.0f s; offsets stay where they were", timeout)

    def _handle(self, control: Control) -> None:
        if control.kind == "stop":
            self.stopping = True
            return
        if control.kind == "barrier":
            self.intake.barrier_requested = True
            return
        if control.kind == "reject":
            self.intake.reject(control.rejected)
            return
        self.intake.commit(control.offsets)
        self.finished = control.kind == "final_commit"


Channel = Union[InlineIntake, ProcessIntake, "FanInIntake"]


def start_intake(config: Config, resume: Optional[Resume] = None) -> Channel:
    """The configured intake: inline, one process, or `intake.processes` of them merged (`stream/fan_in.py`)."""
    resume = resume or Resume()
    if config.intake.processes > 1:
        from streamlearn.stream.fan_in import FanInIntake   # here, not above: it is built on `ProcessIntake`

        return FanInIntake(config, resume)
    check_intakes(resume.state, 1)   # a snapshot of several intakes: one line, not a traceback from the child
    share = intake_share(config.cluster.replicas, replica_rank(config), 1, 0)
    kind = ProcessIntake if config.intake.mode == "process" else InlineIntake
    return kind(config, resume, share)


if __name__ == "__main__":
    _intake_main(int(sys.argv[1]))
