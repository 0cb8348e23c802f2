"""Decides when to snapshot and writes snapshots off the learning loop.

Serializing the models is the expensive part (pickling a 100 MB River model
takes seconds), and it must see one consistent state. So by default the loop
only forks: the child process holds a copy-on-write image of the state at the
barrier, pickles and writes it (tmp → fsync → rename → LATEST) and exits, while
the parent goes on learning; the loop stalls for the fork alone, milliseconds.
With `snapshot.serialize = "inline"` the loop pickles and a thread writes.

A failed write leaves the last good snapshot in place, is counted and logged in
one line, and the next trigger tries again. No trigger fires while a write is in
flight, so a slow disk stretches the interval instead of stalling the loop.

Here are steps 4 (fork and write) and 5 (durable) of the cut procedure that `checkpoints.cut` numbers.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

import msgspec

from streamlearn.checkpoints.store import Manifest, SnapshotStore
from streamlearn.config import Config, SnapshotConfig
from streamlearn.telemetry.histogram import LATENCY_BUCKETS, Histogram
from streamlearn.triggers import Trigger

log = logging.getLogger(__name__)
Serialize = Callable[[], dict[str, bytes]]   # the state as files, called where the writing happens


def config_fingerprint(config: Config) -> str:
    """Hash of the config a snapshot's state depends on: the models, the join, the source."""
    relevant = {"models": config.models, "join": [config.join.ttl, config.join.early_ttl],
                "source": config.source if config.file_path else "kafka",
                "topics": [config.kafka.inference_topic, config.kafka.feedback_topic, config.kafka.examples_topic]}
    return hashlib.sha256(msgspec.json.encode(relevant)).hexdigest()[:16]


class WriteOutcome(msgspec.Struct):
    """What the writer (thread or forked child) reports back."""

    manifest: Optional[Manifest] = None
    error: str = ""
    errno: int = 0


class Snapshotter:
    """The snapshot trigger (examples, seconds, drift, score; see `triggers`) and the off-loop writer."""

    def __init__(self, config: SnapshotConfig, store: SnapshotStore, fingerprint: str) -> None:
        self.config = config
        self.store = store
        self.fingerprint = fingerprint
        self.seconds = Histogram(LATENCY_BUCKETS)   # duration of each successful write
        self.stall = Histogram(LATENCY_BUCKETS)     # learning-loop time each snapshot took
        self.failures = 0
        self.last_success: Optional[float] = None   # unix time of the newest durable snapshot
        self.durable_offsets: dict[str, int] = {}
        # The newest durable snapshot's offsets and figures (a replica's epoch) together: one reference, read whole.
        self.newest_durable: tuple[dict[str, int], dict[str, float]] = ({}, {})
        self.parent: Optional[int] = None           # the restored snapshot the next one grows from
        self.trigger = Trigger("snapshot", config, time.monotonic())   # and always at clean shutdown
        self._idle = threading.Event()
        self._idle.set()
        self._die_with_parent = _parent_death_signal()  # resolved here: the child must not import

    @property
    def idle(self) -> bool:
        """No write in flight (a new snapshot may be asked for)."""
        return self._idle.is_set()

    def submit(self, serialize: Serialize, offsets: dict[str, int], meta: dict[str, float]) -> None:
        """Cut step 4: starts writing the state `serialize` returns; waits first if the previous write still goes."""
        self._idle.wait()   # no timeout: no barrier is asked for while a write is in flight, so rarely waits
        self._idle.clear()
        started = time.perf_counter()
        wait = None
        if self.config.serialize == "fork":   # 4. fork: the child's copy-on-write image is the state at the barrier
            try:
                wait = self._fork_writer(serialize, dict(offsets), meta)
            except OSError as err:  # no memory or processes left for a child: serialize here this time
                log.warning("snapshot: cannot fork a writer (%s); serializing in the loop", err)
        if wait is None:   # 4. or pickle here, now, while the state is the barrier's; a thread writes
            state = _serialized_now(serialize)
            wait = lambda: self._write(state, offsets, meta)  # noqa: E731
        threading.Thread(target=self._finish, args=(wait, offsets, meta, started), name="snapshot-writer",
                         daemon=True).start()

    def wait(self) -> None:
        """Blocks until no write is in flight."""
        self._idle.wait()

    def age(self, now: float) -> Optional[float]:
        return None if self.last_success is None else now - self.last_success

    def _write(self, serialize: Serialize, offsets: dict[str, int], meta: dict[str, float]) -> WriteOutcome:
        try:
            files = serialize()
            return WriteOutcome(self.store.write(files, offsets, self.fingerprint, meta, parent=self.parent))
        except Exception as err:  # disk full, permission, I/O: any failure keeps the old snapshot and retries
            return WriteOutcome(error=str(err), errno=getattr(err, "errno", None) or 0)

    def _fork_writer(self, serialize: Serialize, offsets: dict[str, int],
                     meta: dict[str, float]) -> Callable[[], WriteOutcome]:
        """Forks a child that serializes and writes; returns how to wait for its outcome."""
        read_end, write_end = os.pipe()
        parent_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # the child: only pickling and file I/O from here, then _exit
            code = 1
            try:
                os.close(read_end)
                for sig in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C to the group must not cut the write
                    signal.signal(sig, signal.SIG_IGN)
                self._die_with_parent()
                if os.getppid() == parent_pid:
                    outcome = self._write(serialize, offsets, meta)
                    with os.fdopen(write_end, "wb") as out:
                        out.write(msgspec.msgpack.encode(outcome))
                    code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        return lambda: _child_outcome(pid, read_end)

    def _finish(self, wait: Callable[[], WriteOutcome], offsets: dict[str, int], meta: dict[str, float],
                started: float) -> None:
        """Cut step 5: once the store has named the snapshot latest, its offsets become the ones to commit."""
        try:
            outcome = wait()
        except Exception as err:
            outcome = WriteOutcome(error=f"snapshot writer: {err}")
        try:
            if outcome.manifest is None:
                self.failures += 1
                room = "; older ones pruned to make room" if outcome.errno == errno.ENOSPC else ""
                log.error("snapshot failed (%d so far), the last good one stays%s: %s",
                          self.failures, room, outcome.error)
                return
            took = time.perf_counter() - started
            self.seconds.observe(took)
            self.parent = None
            # 5. Durable (tmp → fsync → rename → LATEST, in `SnapshotStore.write`): only now may the group follow.
            self.durable_offsets = dict(offsets)  # one reference swap: readers see old or new
            self.newest_durable = (self.durable_offsets, dict(meta))
            self.last_success = outcome.manifest.created
            log.info("snapshot %d written in %.3f s", outcome.manifest.seq, took)
        finally:
            self._idle.set()


def _serialized_now(serialize: Serialize) -> Serialize:
    """Runs `serialize` at once (the state is consistent only now); returns its result, or its error, for later."""
    try:
        files = serialize()
    except Exception as err:
        error = err   # `err` itself is unbound when the except block ends; the closure keeps `error`

        def fail() -> dict[str, bytes]:
            raise error
        return fail
    return lambda: files


def _child_outcome(pid: int, read_end: int) -> WriteOutcome:
    """Reads a forked writer's report and reaps it."""
    with os.fdopen(read_end, "rb") as report:
        raw = report.read()
    _, status = os.waitpid(pid, 0)
    if raw:
        return msgspec.msgpack.decode(raw, type=WriteOutcome)
    if os.WIFSIGNALED(status):
        return WriteOutcome(error=f"snapshot writer killed by signal {os.WTERMSIG(status)} (out of memory?)")
    return WriteOutcome(error=f"snapshot writer exited with status {os.waitstatus_to_exitcode(status)}")


def _parent_death_signal() -> Callable[[], None]:
    """On Linux, a way for a forked writer to die with its parent (no orphan finishes a stale snapshot)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return lambda: None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
