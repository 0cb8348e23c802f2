"""Catching up on a backlog: intake memory, catch-up speed, snapshots, tail latency, and equality with the file source.

A backlog (inference logs and delayed, out-of-order feedback for two models, some
feedback missing) is produced up front to the embedded broker, 4 partitions per
topic, keyed by request id so that a request's log and feedback share a partition
number; within a partition the arrival order is a little shuffled against event
time, as real producers do. Then `streamlearn run` (kafka source, default join and
intake settings, snapshots at their defaults) catches up on it, while the intake
process's RSS and the learner's are sampled and /metrics is polled until every
example is learned. Reported per backlog size: peak intake RSS, catch-up speed
(examples/s from the first learned to the last), snapshots written during the
catch-up, and the tail (last message consumed to last example learned). For the
`--compare` size the same events also go through the file source, and two Kafka
runs (two consumer groups) are compared with it: join outcomes, learned ids (the
audit log), as a sequence and as a set.

    .venv/bin/python bench/backlog.py [--requests 100000,1000000] [--compare 400000] [--partitions 4]

Prints progress to stderr, a table, then one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

import orjson

from streamlearn.demo.traffic import Message, TrafficGenerator, TrafficSpec
from streamlearn.stream.broker import EmbeddedBroker
from streamlearn.stream.events import INFERENCE_TOPIC
from streamlearn.testing import kafka_toml

MODELS = ("fraud", "churn")
START_TS = 1_763_800_000.0
SAMPLE_SECONDS = 0.1       # RSS sampling interval
SCRAPE_SECONDS = 0.2       # /metrics polling interval
MAX_MESSAGE_BYTES = 65_536


@dataclasses.dataclass(frozen=True)
class BacklogSpec:
    """What to produce: `requests` over both models, `rate` each per second of event time; a share `disorder`
    of the messages arrives up to `lateness` seconds (event time) late."""

    requests: int
    seed: int = 17
    partitions: int = 4
    disorder: float = 0.05
    lateness: float = 1.0
    rate: float = 50.0
    numeric: bool = False   # the logs' features without the string one (for numeric-only models)


def in_order(spec: BacklogSpec) -> str:
    """Config under which the learned order is a function of the events alone: the disorder within the bound.

    With the default `join.max_out_of_order = 0`, an example whose message arrived late is released at the
    next poll, and where that falls depends on how the polls fall; join outcomes and the set of learned
    examples do not. The file source's outcomes and learned set do not depend on the bound either.
    """
    return f"[join]\nmax_out_of_order = {spec.lateness}\n"


def backlog_messages(spec: BacklogSpec) -> Iterator[Message]:
    """The backlog in produce order: two models' traffic merged by event time, then mildly shuffled.

    The second model's request ids are `s-...` and its requests sit off the first's grid (a fifth of
    the interval), so no two logs share an event time. A share `disorder` of the messages is delayed by up to
    `lateness` seconds of event time (a bounded reorder: streamed, not sorted in memory).
    """
    first = spec.requests - spec.requests // 2
    a = TrafficGenerator(TrafficSpec(requests=first, seed=spec.seed, model=MODELS[0], malformed_rate=0.0,
                                     request_rate=spec.rate, start_ts=START_TS, max_message_bytes=MAX_MESSAGE_BYTES))
    b = TrafficGenerator(TrafficSpec(requests=spec.requests // 2, seed=spec.seed + 1, model=MODELS[1],
                                     malformed_rate=0.0, request_rate=spec.rate, start_ts=START_TS + 0.2 / spec.rate,
                                     max_message_bytes=MAX_MESSAGE_BYTES))
    merged = heapq.merge(a.messages(), map(_second_model, b.messages()), key=lambda m: m.ts)
    if spec.numeric:
        merged = map(_numeric_only, merged)
    rng = random.Random(spec.seed + 2)
    held: list[tuple[float, int, Message]] = []
    for n, message in enumerate(merged):
        late = rng.uniform(0.0, spec.lateness) if rng.random() < spec.disorder else 0.0
        heapq.heappush(held, (message.ts + late, n, message))
        while held and held[0][0] <= message.ts:
            yield heapq.heappop(held)[2]
    while held:
        yield heapq.heappop(held)[2]


def _second_model(m: Message) -> Message:
    return dataclasses.replace(m, key=b"s-" + m.key[2:],
                               value=m.value.replace(b'"request_id":"r-', b'"request_id":"s-', 1))


def _numeric_only(m: Message) -> Message:
    if m.topic != INFERENCE_TOPIC:
        return m
    log = orjson.loads(m.value)
    log["features"] = {k: v for k, v in log["features"].items() if not isinstance(v, str)}
    return dataclasses.replace(m, value=orjson.dumps(log))


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a request's messages, the same number in both topics."""
    return zlib.crc32(key) % partitions


@dataclasses.dataclass
class Produced:
    messages: int = 0
    requests: int = 0
    feedback: int = 0


def produce(bootstrap: str, topics: dict[str, str], messages: Iterable[Message], partitions: int,
            jsonl: Optional[Path] = None) -> Produced:
    """Produces every message to its topic and partition (and, given a path, writes the same order as JSONL)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000,
                         "queue.buffering.max.messages": 500_000, "message.max.bytes": 1 << 20})
    counts = Produced()
    out = jsonl.open("wb") if jsonl is not None else None
    try:
        for m in messages:
            while True:
                try:
                    producer.produce(topics[m.topic], value=m.value, key=m.key,
                                     partition=partition_of(m.key, partitions))
                    break
                except BufferError:   # the local queue is full: let the broker take some
                    producer.poll(0.05)
            producer.poll(0)
            if out is not None:
                out.write(m.value + b"\n")
            counts.messages += 1
            counts.requests += m.topic == "inference-logs"
            counts.feedback += m.topic == "feedback"
    finally:
        if out is not None:
            out.close()
    if producer.flush(120) != 0:
        raise RuntimeError("the broker did not take every message")
    return counts


def create_topics(broker: EmbeddedBroker, partitions: int) -> dict[str, str]:
    prefix = f"b{uuid.uuid4().hex[:8]}"
    names = {kind: f"{prefix}-{kind}" for kind in ("inference-logs", "feedback")}
    broker.create_topics(names.values(), partitions=partitions)
    broker.create_topics([n + ".dlq" for n in names.values()], partitions=1)
    return names


def write_config(path: Path, state_dir: Path, source: str, bootstrap: str, topics: dict[str, str], group: str,
                 every_examples: int = 100_000, metrics: bool = True, extra: str = "", batch_size: int = 1000,
                 processes: int = 1) -> Path:
    """A service config: default join and intake settings, snapshots with an audit log, two River models
    (`processes`: `intake.processes`)."""
    path.write_text(f"""
source = "{source}"
state_dir = "{state_dir}"
seed = 3
{kafka_toml(bootstrap, group, topics)}[intake]
max_message_bytes = {MAX_MESSAGE_BYTES}
batch_size = {batch_size}
processes = {processes}
[snapshot]
every_examples = {every_examples}
audit_log = "{state_dir}/learned.log"
[models.{MODELS[0]}]
model = "logreg"
[models.{MODELS[1]}]
model = "logreg"
[metrics]
enabled = {"true" if metrics else "false"}
host = "127.0.0.1"
port = 0
{extra}
""")
    return path


def rss_mb(pid: int) -> Optional[float]:
    """Resident set size of a process in MB (VmRSS), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def intake_pid(parent: int) -> Optional[int]:
    """The service's intake child (`python -m streamlearn.stream.channel`), found through /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if b"streamlearn.stream.channel" in cmdline.read():
                    return int(entry)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return None


class RssSampler(threading.Thread):
    """Samples the learner's and the intake's RSS every `SAMPLE_SECONDS` and keeps the peaks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_intake = 0.0
        self.peak_learner = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        child = None
        while not self.done.wait(SAMPLE_SECONDS):
            learner = rss_mb(self.pid)
            if learner is None:
                return
            self.peak_learner = max(self.peak_learner, learner)
            child = child if child is not None and rss_mb(child) is not None else intake_pid(self.pid)
            intake = rss_mb(child) if child is not None else None
            if intake is not None:
                self.peak_intake = max(self.peak_intake, intake)


def scrape(port: int) -> Optional[tuple[float, float]]:
    """(examples learned, messages consumed) from /metrics; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    learned = consumed = 0.0
    for line in text.splitlines():
        if line.startswith("streamlearn_examples_learned_total{"):
            learned += float(line.rsplit(" ", 1)[1])
        elif line.startswith("streamlearn_events_total{"):
            consumed += float(line.rsplit(" ", 1)[1])
    return learned, consumed


@dataclasses.dataclass
class RunResult:
    """One service run over a backlog: the figures, the summary and the learned ids (audit log)."""

    summary: dict
    ids: list[str]
    peak_intake_mb: float = float("nan")
    peak_learner_mb: float = float("nan")
    eps: float = float("nan")
    snapshots: int = 0
    tail_s: float = float("nan")
    caught_up_s: float = float("nan")
    learned_before_stop: float = float("nan")   # examples learned when the run was stopped (the stop drains more)
    complete: bool = True                        # the target was learned before the stop


def start_service(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:   # a file: an unread pipe would block the service's logging
        return subprocess.Popen([sys.executable, "-m", "streamlearn", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=stderr)


def metrics_port(log: Path, process: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"metrics on http://[^:]+:(\d+)/metrics", log.read_text())
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"the service exited ({process.returncode}) before serving metrics:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError("no metrics endpoint line in the service log")


def snapshots_written(log: Path) -> int:
    return len(re.findall(r"snapshot \d+ written", log.read_text()))


def run_kafka(config: Path, state_dir: Path, produced: Produced, target: Optional[int],
              patience: float = 10.0, timeout: float = 900.0) -> RunResult:
    """Runs the service on the backlog until it has learned `target` examples (or learns no more), then SIGTERM.

    Without a target (or when it is never reached: lost joins) the run ends once every message has been
    consumed and the learned count has not moved for `patience` seconds.
    """
    log = state_dir.parent / f"{state_dir.name}.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    process = start_service(config, log)
    sampler = RssSampler(process.pid)
    sampler.start()
    try:
        port = metrics_port(log, process)
        first_learned = consumed_at = final_at = last_growth = None
        last = -1.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            figures = scrape(port)
            now = time.monotonic()
            if figures is not None:
                learned, consumed = figures
                if learned > 0 and first_learned is None:
                    first_learned = now
                if learned > last:
                    last, last_growth, final_at = learned, now, now
                if consumed >= produced.messages and consumed_at is None:
                    consumed_at = now
                if target is not None and learned >= target:
                    break
                if consumed_at is not None and now - last_growth >= patience:
                    break
            time.sleep(SCRAPE_SECONDS)
        snapshots = snapshots_written(log)
    finally:
        sampler.done.set()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        sampler.join()
    if code != 0:
        raise RuntimeError(f"the service exited {code} on SIGTERM:\n{log.read_text()[-3000:]}")
    summary = json.loads((state_dir / "summary.json").read_text())
    result = RunResult(summary, learned_ids(state_dir), sampler.peak_intake, sampler.peak_learner,
                       snapshots=snapshots, learned_before_stop=last, complete=target is None or last >= target)
    if first_learned is not None and last_growth is not None and last_growth > first_learned:
        result.eps = last / (last_growth - first_learned)
        result.caught_up_s = last_growth - first_learned
    if not result.complete:
        result.tail_s = float("inf")   # the tail was never learned while running
    elif consumed_at is not None and final_at is not None:
        result.tail_s = max(0.0, final_at - consumed_at)
    return result


def run_file(config: Path, state_dir: Path) -> RunResult:
    """The file source over the same events: runs to the end of the file by itself."""
    log = state_dir.parent / f"{state_dir.name}.log"
    process = start_service(config, log)
    if process.wait(timeout=900) != 0:
        raise RuntimeError(f"the file run failed:\n{log.read_text()[-3000:]}")
    summary = json.loads((state_dir / "summary.json").read_text())
    return RunResult(summary, learned_ids(state_dir), eps=summary["examples_per_second"],
                     snapshots=snapshots_written(log))


def learned_ids(state_dir: Path) -> list[str]:
    path = state_dir / "learned.log"
    return path.read_text().split() if path.exists() else []


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def backlog_on_broker(broker: EmbeddedBroker, spec: BacklogSpec, jsonl: Optional[Path]) -> tuple[dict, Produced]:
    topics = create_topics(broker, spec.partitions)
    started = time.monotonic()
    produced = produce(broker.bootstrap_servers, topics, backlog_messages(spec), spec.partitions, jsonl)
    progress(f"{spec.requests:,} requests: {produced.messages:,} messages produced in "
             f"{time.monotonic() - started:.0f} s")
    return topics, produced


def compare(broker: EmbeddedBroker, spec: BacklogSpec, tmp: Path, extra: str) -> dict:
    """File source vs Kafka over the same events: two runs at `extra` (two consumer groups), one in order.

    The file source runs with `in_order(spec)`, which changes neither its join outcomes nor its learned set,
    so that the third Kafka run, with it too, can be compared as a sequence.
    """
    jsonl = tmp / "compare.jsonl"
    topics, produced = backlog_on_broker(broker, spec, jsonl)
    bootstrap = broker.bootstrap_servers
    file_state = tmp / "compare-file"
    file_run = run_file(write_config(tmp / "file.toml", file_state, f"file:{jsonl}", bootstrap, topics, "unused",
                                     metrics=False, extra=extra + in_order(spec)), file_state)
    progress(f"file source: {file_run.summary['learned']:,} learned, join {file_run.summary['join']}")
    runs = []
    for n, settings in ((1, extra), (2, extra), (3, extra + in_order(spec))):
        state = tmp / f"compare-kafka-{n}"
        config = write_config(tmp / f"kafka-{n}.toml", state, "kafka", bootstrap, topics, f"bench-{uuid.uuid4().hex[:6]}",
                              extra=settings)
        runs.append(run_kafka(config, state, produced, file_run.summary["learned"]))
        progress(f"kafka run {n}{' (in order)' if n == 3 else ''}: {runs[-1].summary['learned']:,} learned, "
                 f"join {runs[-1].summary['join']}")
    return {"spec": spec, "produced": produced, "file": file_run, "kafka": runs}


def equality(a: RunResult, b: RunResult) -> dict:
    return {"join": a.summary["join"] == b.summary["join"], "learned": a.summary["learned"] == b.summary["learned"],
            "ids_set": set(a.ids) == set(b.ids) and len(a.ids) == len(b.ids), "ids_sequence": a.ids == b.ids}


def join_difference(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="100000,1000000", help="backlog sizes for the memory figures")
    parser.add_argument("--compare", type=int, default=400_000, help="backlog size for file vs Kafka (0: skip)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--disorder", type=float, default=0.05, help="share of messages that arrive late")
    parser.add_argument("--lateness", type=float, default=1.0, help="event-time seconds a late message is late by")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--config-extra", default="", help="TOML appended to every service config (not a [join] "
                        "table: the in-order run adds one)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.requests.split(",") if s]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="backlog-") as tmp_name, EmbeddedBroker() as broker:
        tmp = Path(tmp_name)
        spec_of = lambda n: BacklogSpec(n, args.seed, args.partitions, args.disorder, args.lateness)  # noqa: E731
        compared = compare(broker, spec_of(args.compare), tmp, args.config_extra) if args.compare else None
        for size in sizes:
            if compared is not None and size == args.compare:
                run, produced = compared["kafka"][0], compared["produced"]
            else:
                topics, produced = backlog_on_broker(broker, spec_of(size), None)
                state = tmp / f"memory-{size}"
                config = write_config(tmp / f"memory-{size}.toml", state, "kafka", broker.bootstrap_servers, topics,
                                      f"bench-{uuid.uuid4().hex[:6]}", extra=args.config_extra)
                run = run_kafka(config, state, produced, None)
            progress(f"{size:,} requests: peak intake RSS {run.peak_intake_mb:.0f} MB, {run.eps:,.0f} examples/s, "
                     f"{run.snapshots} snapshots, tail {run.tail_s:.2f} s")
            rows.append({"requests": size, "messages": produced.messages, "run": run})
    report(args, rows, compared)


def report(args, rows: list[dict], compared: Optional[dict]) -> None:
    print(f"\nCatching up on a backlog: embedded broker, {args.partitions} partitions per topic, two models, "
          f"default join/intake settings, snapshots every 100,000 examples or 60 s\n")
    print(f"{'requests':>10} {'messages':>10} {'learned':>9} {'intake MB':>10} {'learner MB':>11} {'ex/s':>8} "
          f"{'catch-up s':>11} {'snapshots':>10} {'tail s':>7}")
    for row in rows:
        r = row["run"]
        print(f"{row['requests']:>10,} {row['messages']:>10,} {r.summary['learned']:>9,} {r.peak_intake_mb:>10.0f} "
              f"{r.peak_learner_mb:>11.0f} {r.eps:>8,.0f} {r.caught_up_s:>11.1f} {r.snapshots:>10} {r.tail_s:>7.2f}")
    growth = None
    if len(rows) >= 2:
        growth = rows[-1]["run"].peak_intake_mb / rows[0]["run"].peak_intake_mb - 1
        print(f"\nintake RSS growth from {rows[0]['requests']:,} to {rows[-1]['requests']:,} requests: {100 * growth:+.1f}%")
    headline: dict = {
        "requests": [r["requests"] for r in rows],
        "learned": [r["run"].summary["learned"] for r in rows],
        "peak_intake_rss_mb": [round(r["run"].peak_intake_mb, 1) for r in rows],
        "peak_learner_rss_mb": [round(r["run"].peak_learner_mb, 1) for r in rows],
        "catch_up_eps": [round(r["run"].eps) for r in rows],
        "snapshots_during_catch_up": [r["run"].snapshots for r in rows],
        "tail_s": [round(r["run"].tail_s, 3) for r in rows],
        "intake_rss_growth": round(growth, 4) if growth is not None else None,
    }
    if compared is not None:
        file_run, (one, two, ordered) = compared["file"], compared["kafka"]
        vs_file, runs, in_sequence = equality(file_run, one), equality(one, two), equality(file_run, ordered)
        print(f"\n{compared['spec'].requests:,} requests, file source vs Kafka:")
        print(f"  {'':<14} {'learned':>9} {'matched':>9} {'expired':>8} {'exp_fb':>7} {'duplicate':>9} {'late':>6}")
        for name, run in (("file", file_run), ("kafka run 1", one), ("kafka run 2", two), ("kafka in order", ordered)):
            j = run.summary["join"]
            print(f"  {name:<14} {run.summary['learned']:>9,} {j.get('matched', 0):>9,} {j.get('expired', 0):>8,} "
                  f"{j.get('expired_feedback', 0):>7,} {j.get('duplicate', 0):>9,} {j.get('late', 0):>6,}")
        print(f"  kafka run 1 = file: {vs_file}")
        print(f"  kafka run 2 = run 1: {runs}")
        print(f"  kafka in order (join.max_out_of_order = {args.lateness:g}) = file: {in_sequence}")
        headline.update({
            "compare_requests": compared["spec"].requests,
            "file_learned": file_run.summary["learned"],
            "kafka_learned": [one.summary["learned"], two.summary["learned"]],
            "kafka_join_minus_file": join_difference(file_run.summary["join"], one.summary["join"]),
            "kafka_equals_file": vs_file, "two_runs_identical": runs, "in_order_equals_file": in_sequence,
            "compare_eps": [round(one.eps), round(two.eps)], "compare_tail_s": [round(one.tail_s, 3), round(two.tail_s, 3)],
            "compare_snapshots": [one.snapshots, two.snapshots],
            "compare_peak_intake_rss_mb": [round(one.peak_intake_mb, 1), round(two.peak_intake_mb, 1)],
        })
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
