"""Snapshots: a broken one is skipped with its reason, a failed write keeps the old one, operators can inspect.

No broker here: the file source carries offsets just like Kafka offsets do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import subprocess
import sys
import time

import msgspec
import pytest

from streamlearn.checkpoints import store as store_module
from streamlearn.checkpoints.store import MANIFEST, SnapshotError, SnapshotStore
from streamlearn.config import ConfigError, parse_config
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec, write_jsonl
from streamlearn.service import Service
from tests.conftest import http_get, wait_for


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A small labeled stream on disk (inference logs + feedback)."""
    path = tmp_path_factory.mktemp("stream") / "stream.jsonl"
    write_jsonl(list(TrafficGenerator(TrafficSpec(requests=2000, seed=4, model="fraud")).messages()), path)
    return path


def config(stream, state_dir, metrics: bool = False, **snapshot):
    return parse_config({
        "source": f"file:{stream}", "state_dir": str(state_dir),
        "intake": {"mode": "inline", "batch_size": 100, "poll_records": 500},
        "snapshot": {"every_examples": 200, **snapshot},
        "models": {"fraud": {"model": "logreg"}},
        "metrics": {"enabled": metrics, "port": 0},
    }, env={})


def folder(state_dir, seq: int):
    return state_dir / "snapshots" / f"snap-{seq:08d}"


# --- the store alone -------------------------------------------------------------------------------------------

def write_two(root, key=None) -> SnapshotStore:
    store = SnapshotStore(root, key=key)
    store.write({"model.pkl": b"first" * 100}, offsets={"feedback:0": 10}, fingerprint="f")
    store.write({"model.pkl": b"second" * 100}, offsets={"feedback:0": 20}, fingerprint="f")
    return store


def folder_of(store: SnapshotStore, seq: int):
    return store.root / f"snap-{seq:08d}"


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda snap: truncate(snap / "model.pkl"), "model.pkl truncated: 593 of 600 bytes"),
    (lambda snap: flip_byte(snap / "model.pkl"), "model.pkl checksum mismatch"),
    (lambda snap: (snap / MANIFEST).unlink(), "manifest missing"),
    (lambda snap: (snap / "model.pkl").unlink(), "model.pkl missing"),
    (lambda snap: (snap / MANIFEST).write_bytes(b'{"seq": 2'), "manifest unreadable"),
])
def test_a_damaged_snapshot_gives_its_reason_and_the_previous_one_is_next(tmp_path, damage, reason):
    store = write_two(tmp_path)
    damage(folder_of(store, 2))
    found = dict(store.newest_valid())
    assert isinstance(found[2], SnapshotError) and str(found[2]).startswith(reason)
    assert found[1].files["model.pkl"] == b"first" * 100


def test_hmac_refuses_another_key_an_edited_manifest_and_no_signature(tmp_path):
    store = write_two(tmp_path / "keyed", key=b"right")
    assert SnapshotStore(tmp_path / "keyed", key=b"right").load(2).manifest.offsets == {"feedback:0": 20}
    with pytest.raises(SnapshotError, match="HMAC does not verify"):
        SnapshotStore(tmp_path / "keyed", key=b"wrong").load(2)

    # Moving the offsets back would make the service learn examples twice: the HMAC catches it.
    path = folder_of(store, 2) / MANIFEST
    manifest = json.loads(path.read_bytes())
    manifest["offsets"] = {"feedback:0": 0}
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="HMAC does not verify"):
        store.load(2)

    write_two(tmp_path / "unkeyed")
    with pytest.raises(SnapshotError, match="not signed"):
        SnapshotStore(tmp_path / "unkeyed", key=b"right").load(2)


def test_keep_prunes_old_snapshots_and_abandoned_temporary_folders(tmp_path):
    store = SnapshotStore(tmp_path, keep=3)
    (tmp_path / ".tmp-9-999999").mkdir()  # a writer that crashed mid-write
    for i in range(6):
        store.write({"m": bytes([i])}, offsets={}, fingerprint="f")
    assert store.sequences() == [4, 5, 6]
    assert (tmp_path / "LATEST").read_text() == "6\n"
    assert not list(tmp_path.glob(".tmp-*"))
    assert store.load(5).manifest.parent == 4


# --- the service -----------------------------------------------------------------------------------------------

def test_restore_skips_a_corrupt_newest_snapshot_for_the_previous_good_one(stream, tmp_path, caplog):
    Service(config(stream, tmp_path)).run()
    newest = SnapshotStore(tmp_path / "snapshots").latest_seq()
    assert newest >= 2
    flip_byte(folder(tmp_path, newest) / "learners.pkl")
    with caplog.at_level(logging.WARNING, logger="streamlearn.service"):
        service = Service(config(stream, tmp_path))
    assert service.restored_from == newest - 1
    assert f"snapshot {newest} skipped: learners.pkl checksum mismatch" in caplog.text


def test_a_tampered_pickle_is_never_unpickled(stream, tmp_path):
    Service(config(stream, tmp_path)).run()
    newest = SnapshotStore(tmp_path / "snapshots").latest_seq()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder(tmp_path, newest) / "learners.pkl").write_bytes(pickle.dumps(Payload()))
    assert Service(config(stream, tmp_path)).restored_from == newest - 1
    assert not marker.exists()


def test_a_snapshot_under_another_key_is_skipped(stream, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STREAMLEARN_SNAPSHOT_KEY", "first-key")
    Service(config(stream, tmp_path)).run()
    assert Service(config(stream, tmp_path)).restored_from is not None
    monkeypatch.setenv("STREAMLEARN_SNAPSHOT_KEY", "second-key")
    with caplog.at_level(logging.WARNING, logger="streamlearn.service"):
        assert Service(config(stream, tmp_path)).restored_from is None
    assert "HMAC does not verify" in caplog.text


def test_from_snapshot_rolls_back_to_an_older_one_and_refuses_a_missing_one(stream, tmp_path):
    Service(config(stream, tmp_path)).run()
    store = SnapshotStore(tmp_path / "snapshots")
    oldest, newest = store.sequences()[0], store.latest_seq()
    wanted, learned = store.load(oldest), store.load(newest).manifest.meta["learned"]
    service = Service(config(stream, tmp_path), from_snapshot=oldest)
    assert service.restored_from == oldest
    assert service.offsets == wanted.manifest.offsets
    rollback = store.load(newest + 1)  # written at once: a crash before the next snapshot keeps the rollback
    assert rollback.manifest.parent == oldest and rollback.files == wanted.files
    summary = service.run()  # learns again from the older offsets on
    assert summary["learned"] == learned
    with pytest.raises(ConfigError, match="no snapshot 999"):
        Service(config(stream, tmp_path), from_snapshot=999)


def failing_writes(monkeypatch, failing: list[bool]):
    """Makes every snapshot file write fail with ENOSPC while `failing[0]` is true."""
    real = store_module.write_durably

    def write(path, data):
        if failing[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(store_module, "write_durably", write)


def scrape(service, path: str) -> tuple[int, str]:
    return http_get(service.metrics.port, path)


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize("serialize", ["fork", "inline"])
def test_a_failing_disk_keeps_the_old_snapshot_and_learning_goes_on(stream, tmp_path, monkeypatch, caplog, serialize):
    failing = [False]
    failing_writes(monkeypatch, failing)
    service = Service(config(stream, tmp_path, metrics=True, max_age_seconds=0.5, serialize=serialize))
    seen = {}

    def on_batch(service, batch):
        snapshots = service.snapshots
        snapshots.wait()
        if snapshots.last_success is not None and not failing[0] and "good" not in seen:
            seen["good"] = snapshots.store.latest_seq()
            seen["files"] = {p.name: p.read_bytes() for p in folder(tmp_path, seen["good"]).iterdir()}
            failing[0] = True
        if snapshots.failures >= 2 and "unready" not in seen:
            wait_for(lambda: snapshots.age(time.time()) > 0.5, timeout=10, what="the snapshot to age")
            seen["unready"] = scrape(service, "/readyz")
            seen["metrics"] = scrape(service, "/metrics")[1]
            failing[0] = False  # the disk has room again: the next trigger succeeds

    with caplog.at_level(logging.ERROR, logger="streamlearn.checkpoints.snapshotter"):
        summary = service.run(on_batch=on_batch)
    service.close()

    assert summary["learned"] == Service(config(stream, tmp_path / "reference")).run()["learned"]
    assert seen["unready"][0] == 503 and "snapshot" in seen["unready"][1]
    assert metric(seen["metrics"], "streamlearn_snapshot_failures_total") >= 2
    assert "snapshot failed (1 so far), the last good one stays; older ones pruned to make room: [Errno 28] No space left on device" in caplog.text
    kept = {p.name: p.read_bytes() for p in folder(tmp_path, seen["good"]).iterdir()}
    assert kept == seen["files"]
    store = SnapshotStore(tmp_path / "snapshots")
    assert store.load(seen["good"] + 1).manifest.parent == seen["good"]  # failed writes left no half-snapshot
    assert store.load(store.latest_seq()).manifest.meta["learned"] == summary["learned"]
    assert not list((tmp_path / "snapshots").glob(".tmp-*"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (needs mount rights; the test is skipped elsewhere)."""
    path = tmp_path / "tiny"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1024k", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_a_really_full_disk_keeps_the_old_snapshot_then_makes_room(tiny_disk):
    store = SnapshotStore(tiny_disk, keep=5)
    state = {"model.pkl": os.urandom(300 * 1024)}
    for _ in range(3):
        store.write(state, offsets={}, fingerprint="f")
    with pytest.raises(OSError) as failed:  # a fourth does not fit next to three
        store.write(state, offsets={}, fingerprint="f")
    assert failed.value.errno == errno.ENOSPC
    assert store.sequences() == [3]  # the newest good one stays; older ones went to make room
    assert store.load(3).files == state
    assert not list(tiny_disk.glob(".tmp-*"))
    assert store.write(state, offsets={}, fingerprint="f").seq == 4  # the retry fits
    assert store.load(4).manifest.parent == 3


def test_cli_lists_shows_and_verifies(stream, tmp_path):
    config_path = tmp_path / "service.toml"
    config_path.write_text(f'source = "file:{stream}"\nstate_dir = "{tmp_path}"\n[intake]\nmode = "inline"\n'
                           'poll_records = 500\n[snapshot]\nevery_examples = 200\n[models.fraud]\nmodel = "logreg"\n'
                           '[metrics]\nenabled = false\n')
    Service(config(stream, tmp_path)).run()
    newest = SnapshotStore(tmp_path / "snapshots").latest_seq()
    flip_byte(folder(tmp_path, newest) / "intake.msgpack")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "streamlearn", *args, "--config", str(config_path)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})

    listed = cli("snapshots", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[1].split()[0] == str(newest) and lines[1].endswith("intake.msgpack checksum mismatch")
    assert lines[2].endswith("ok")

    verified = cli("snapshots", "verify")
    assert verified.returncode == 1
    assert f"snapshot {newest}: intake.msgpack checksum mismatch" in verified.stdout
    assert cli("snapshots", "verify", str(newest - 1)).returncode == 0

    shown = cli("snapshots", "show", str(newest - 1))
    manifest = msgspec.json.decode(shown.stdout)
    assert manifest["status"] == "ok" and manifest["seq"] == newest - 1
    assert {f["name"] for f in manifest["files"]} == {"learners.pkl", "intake.msgpack", "service.json"}

    rolled_back = cli("run", "--from-snapshot", str(newest))
    assert rolled_back.returncode == 2
    assert "snapshot " + str(newest) + " cannot be used: intake.msgpack checksum mismatch" in rolled_back.stderr


def test_a_failing_fork_serializes_in_the_loop_instead(stream, tmp_path, monkeypatch, caplog):
    def no_fork():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with caplog.at_level(logging.WARNING, logger="streamlearn.checkpoints.snapshotter"):
        summary = Service(config(stream, tmp_path)).run()
    assert "cannot fork a writer" in caplog.text
    store = SnapshotStore(tmp_path / "snapshots")
    assert store.load(store.latest_seq()).manifest.meta["learned"] == summary["learned"]


def test_a_state_that_fails_to_serialize_reports_its_own_error_later():
    """`serialize = "inline"` pickles at the barrier; a failure is raised where the write happens, unchanged."""
    from streamlearn.checkpoints.snapshotter import _serialized_now

    def broken() -> dict[str, bytes]:
        raise ValueError("cannot pickle this model")

    deferred = _serialized_now(broken)
    with pytest.raises(ValueError, match="cannot pickle this model"):
        deferred()
