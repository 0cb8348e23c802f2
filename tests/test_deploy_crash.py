"""Kill -9 during a promotion: exactly one production version, consistent with the registry and the artifacts.

A promotion is a registry transaction, then the production pointer, then the
`model-updates` event. These tests SIGKILL real processes in the middle of it:
paused at each step in turn (`STREAMLEARN_DEPLOY_PAUSE`), and at random moments of
a loop of promotions. After every kill the registry has one production row whose
artifact verifies; once the service starts again (it reconciles), the pointer
that serving reads names that version and its event has been sent.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from streamlearn.config import ModelConfig, load_config
from streamlearn.deploy import load_production
from streamlearn.deploy.artifacts import ArtifactManifest, open_artifacts
from streamlearn.deploy.faults import PAUSE_ENV, POINTS
from streamlearn.deploy.model_files import model_files
from streamlearn.deploy.publisher import UPDATES_FILE, open_publisher
from streamlearn.deploy.records import ModelUpdate, VersionRecord
from streamlearn.deploy.registry import REGISTRY_FILE
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example
from streamlearn.service import Service
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent

LOOP = """
import itertools, sys
from streamlearn.config import load_config
from streamlearn.deploy.publisher import open_publisher
publisher = open_publisher(load_config(sys.argv[1]))
print("ready", flush=True)
for version in itertools.cycle([2, 3, 1]):
    if publisher.registry.production("fraud").version != version:
        publisher.promote("fraud", version, "promote", "operator")
"""


@pytest.fixture
def state(tmp_path) -> Path:
    """A config (file source, publishing on) whose registry holds fraud v1 (production), v2 and v3 (candidates)."""
    events = tmp_path / "events.jsonl"
    events.write_text("")
    path = tmp_path / "config.toml"
    path.write_text(f'source = "file:{events}"\nstate_dir = "{tmp_path / "state"}"\n[models.fraud]\nmodel = "logreg"\n'
                    '[publish]\nenabled = true\n[snapshot]\nenabled = false\n[metrics]\nenabled = false\n')
    cfg = load_config(path, env={})
    publisher = open_publisher(cfg)
    for version in (1, 2, 3):
        learner = RiverLearner("fraud", ModelConfig(model="logreg"))
        learner.learn_batch([Example(f"r-{i}", "fraud", {"x": float(i % 3)}, i % 3 == version % 3, 1.0, i, i)
                             for i in range(100)])
        kind, files = model_files(learner)
        written = publisher.artifacts.write(ArtifactManifest("fraud", version, kind, "classification", 0.0), files)
        publisher.registry.add(VersionRecord("fraud", version, "candidate", 0.0, written.url,
                                             written.manifest_sha256, written.checksums))
    publisher.promote("fraud", 1, "promote", "operator")
    publisher.close()
    return path


def productions(path: Path) -> list[int]:
    """The production rows, read with plain SQL after checking the database's integrity."""
    with sqlite3.connect(Path(load_config(path, env={}).state_dir) / REGISTRY_FILE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute("SELECT version FROM versions WHERE model = 'fraud' AND status = 'production'")
        return [v for (v,) in rows]


def the_one_production(path: Path) -> int:
    """Asserts exactly one production version whose artifact verifies against the registry; returns it."""
    [version] = productions(path)
    cfg = load_config(path, env={})
    publisher = open_publisher(cfg)
    record = publisher.registry.get("fraud", version)
    publisher.close()
    open_artifacts(cfg).load("fraud", version, record.manifest_sha256)   # raises unless every checksum matches
    return version


def restart_and_check(path: Path) -> int:
    """Starts the service (it reconciles) and checks that serving now reads the registry's production version."""
    cfg = load_config(path, env={})
    Service(cfg).close()
    version = the_one_production(path)
    assert open_artifacts(cfg).production("fraud").version == version
    assert load_production("fraud", store=open_artifacts(cfg)).version == version
    events = [msgspec.json.decode(line, type=ModelUpdate)
              for line in (Path(cfg.state_dir) / UPDATES_FILE).read_bytes().splitlines()]
    assert events[-1].version == version, "the newest event names the production version"
    return version


def events_for(path: Path, version: int) -> int:
    lines = (Path(load_config(path, env={}).state_dir) / UPDATES_FILE).read_bytes().splitlines()
    return sum(msgspec.json.decode(line, type=ModelUpdate).version == version for line in lines)


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_step_of_a_promotion(state, point):
    log = state.parent / "promote.log"
    process = subprocess.Popen([sys.executable, "-m", "streamlearn", "models", "promote", "2", "--config", str(state)],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=ROOT,
                               env={**os.environ, PAUSE_ENV: point})
    try:
        wait_for(lambda: f"paused at {point}" in log.read_text() or process.poll() is not None, timeout=60,
                 what=f"the promotion to pause at {point}")
        assert process.poll() is None, log.read_text()
    finally:
        process.kill()
        process.wait(30)
    committed = point != "in-transaction"
    assert the_one_production(state) == (2 if committed else 1)
    pointer = open_artifacts(load_config(state, env={})).production("fraud").version
    assert pointer == (2 if point == "after-pointer" else 1)   # the kill left serving on the old one, or the new
    assert restart_and_check(state) == (2 if committed else 1)
    assert events_for(state, 2) == (1 if committed else 0)


def test_kill_at_random_moments_of_a_loop_of_promotions(state):
    rng = random.Random(2026)
    seen = set()
    for round_ in range(8):
        process = subprocess.Popen([sys.executable, "-c", LOOP, str(state)], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
        try:
            assert process.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.02, 0.4))   # not a timing assertion: where the kill lands is the point
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        seen.add(the_one_production(state))
        restart_and_check(state)
    assert len(seen) >= 2, "the kills landed in different promotions"
