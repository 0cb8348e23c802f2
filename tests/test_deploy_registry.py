"""The registry, the artifacts, the loader and the CLI, on real SQLite files and real folders (no broker)."""

from __future__ import annotations

import json
import pickle
import sqlite3

import msgspec
import pytest
from typer.testing import CliRunner

from streamlearn.cli import app
from streamlearn.config import EncoderConfig, GateConfig, ModelConfig, parse_config
from streamlearn.deploy import ArtifactError, load_production, load_version
from streamlearn.deploy.artifacts import MANIFEST, ArtifactManifest, ArtifactStore, open_artifacts
from streamlearn.deploy.gate import Gate
from streamlearn.deploy.model_files import model_files
from streamlearn.deploy.publisher import UPDATES_FILE, open_publisher
from streamlearn.deploy.records import Comparison, GateScores, ModelUpdate, VersionRecord
from streamlearn.deploy.registry import RegistryError
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.records import Example

ROWS = [{"x": float(i % 2)} for i in range(10)]


def trained(flip: bool = False, seed: int = 0) -> RiverLearner:
    learner = RiverLearner("fraud", ModelConfig(model="logreg"), seed)
    learner.learn_batch([Example(f"r-{i}", "fraud", {"x": float(i % 2)}, (i % 2 == 1) != flip, 1.0, i, i)
                         for i in range(300)])
    return learner


def config(tmp_path, **publish):
    return parse_config({"source": f"file:{tmp_path / 'events.jsonl'}", "state_dir": str(tmp_path / "state"),
                         "models": {"fraud": {"model": "logreg"}}, "publish": {"enabled": True, **publish}}, env={})


def register(publisher, version: int, learner: RiverLearner) -> VersionRecord:
    kind, files = model_files(learner)
    written = publisher.artifacts.write(ArtifactManifest("fraud", version, kind, "classification", 1.0), files)
    record = VersionRecord("fraud", version, "candidate", float(version), written.url, written.manifest_sha256,
                           written.checksums)
    publisher.registry.add(record)
    return record


@pytest.fixture
def published(tmp_path):
    """v1 and v2 promoted in turn (v2 is production), v3 a candidate that learned the opposite concept."""
    cfg = config(tmp_path)
    publisher = open_publisher(cfg)
    for version, learner in ((1, trained()), (2, trained(seed=1)), (3, trained(flip=True))):
        register(publisher, version, learner)
    publisher.promote("fraud", 1, "promote", "gate")
    publisher.promote("fraud", 2, "promote", "gate")
    yield cfg, publisher
    publisher.close()


# --- registry ---------------------------------------------------------------------------------------------------

def test_promotion_retires_the_old_version_and_the_database_refuses_two_productions(published):
    cfg, publisher = published
    statuses = {r.version: r.status for r in publisher.registry.versions("fraud")}
    assert statuses == {1: "retired", 2: "production", 3: "candidate"}
    db = sqlite3.connect(publisher.registry.path)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("UPDATE versions SET status = 'production' WHERE model = 'fraud' AND version = 1")
    db.close()
    assert [c.status for c in publisher.registry.changes("fraud") if c.version == 1] == \
        ["candidate", "production", "retired"]
    with pytest.raises(RegistryError, match="already production"):
        publisher.promote("fraud", 2, "promote", "operator")
    with pytest.raises(RegistryError, match="no version 9"):
        publisher.promote("fraud", 9, "promote", "operator")


def test_a_failure_inside_the_transaction_changes_nothing(published, monkeypatch):
    cfg, publisher = published
    from streamlearn.deploy import registry as registry_module

    def fail(point):
        if point == "in-transaction":
            raise OSError("disk gone")

    monkeypatch.setattr(registry_module, "pause_point", fail)
    with pytest.raises(OSError):
        publisher.promote("fraud", 3, "promote", "operator")
    assert publisher.registry.production("fraud").version == 2
    assert publisher.registry.get("fraud", 3).status == "candidate"
    assert publisher.registry.unsent() == []


def test_rejection_keeps_scores_and_reasons_and_only_applies_to_candidates(published):
    cfg, publisher = published
    scores = GateScores(historical=Comparison(0.2, 0.9, 500))
    assert publisher.registry.reject("fraud", 3, scores, ["historical: worse"], "gate")
    assert not publisher.registry.reject("fraud", 3, scores, ["again"], "gate")
    record = publisher.registry.get("fraud", 3)
    assert (record.status, record.reasons, record.scores) == ("rejected", ["historical: worse"], scores)


def test_rollback_goes_to_the_previous_production_and_keeps_every_artifact(published, tmp_path):
    cfg, publisher = published
    event = publisher.rollback("fraud")
    assert (event.version, event.previous, event.action) == (1, 2, "rollback")
    assert open_artifacts(cfg).production("fraud").version == 1
    assert load_production("fraud", store=open_artifacts(cfg)).version == 1
    assert publisher.rollback("fraud", to=2).version == 2
    for version in (1, 2, 3):
        open_artifacts(cfg).load("fraud", version)   # all still there and intact
    lines = (tmp_path / "state" / UPDATES_FILE).read_bytes().splitlines()
    assert [msgspec.json.decode(line, type=ModelUpdate).version for line in lines] == [1, 2, 1, 2]


# --- artifacts and the loader -------------------------------------------------------------------------------------

def test_load_production_verifies_and_predicts(published):
    cfg, publisher = published
    model = load_production("fraud", store=cfg.state_dir + "/artifacts")
    assert model.version == 2 and model.kind == "river"
    assert model.predict_many(ROWS) == [i % 2 == 1 for i in range(10)]
    assert model.model.predict_one({"x": 1.0}) is True   # the River estimator itself


def test_load_production_refuses_an_artifact_whose_checksum_does_not_match(published, tmp_path):
    cfg, publisher = published
    folder = tmp_path / "state" / "artifacts" / "fraud" / "v000002"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "model.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ArtifactError, match="fraud v2: model.pkl (truncated|checksum mismatch)"):
        load_production("fraud", store=open_artifacts(cfg))
    assert not marker.exists(), "nothing is unpickled before it verifies"


def test_an_edited_manifest_or_another_key_is_refused(published, tmp_path):
    cfg, publisher = published
    path = tmp_path / "state" / "artifacts" / "fraud" / "v000002" / MANIFEST
    manifest = json.loads(path.read_bytes())
    manifest["files"][0]["sha256"] = "0" * 64       # someone "fixes" the checksum of a swapped file
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest checksum mismatch"):
        load_production("fraud", store=open_artifacts(cfg))

    keyed = ArtifactStore(tmp_path / "keyed", key=b"right")
    written = keyed.write(ArtifactManifest("fraud", 1, "river", "classification", 0.0),
                          model_files(trained())[1])
    keyed.point_production("fraud", 1, written.manifest_sha256)
    assert load_production("fraud", store=tmp_path / "keyed", key=b"right").version == 1
    with pytest.raises(ArtifactError, match="HMAC does not verify"):
        load_production("fraud", store=tmp_path / "keyed", key=b"wrong")
    with pytest.raises(ArtifactError, match="no production version"):
        load_production("other", store=tmp_path / "keyed", key=b"right")


def test_an_fsspec_url_stores_artifacts_too():
    store = ArtifactStore("memory://streamlearn-test/artifacts")
    kind, files = model_files(trained())
    written = store.write(ArtifactManifest("fraud", 4, kind, "classification", 0.0), files)
    assert written.url == "memory://streamlearn-test/artifacts/fraud/v000004"
    store.point_production("fraud", 4, written.manifest_sha256)
    assert load_production("fraud", store="memory://streamlearn-test/artifacts").predict_many(ROWS)[:2] == [False, True]


def test_a_torch_model_round_trips_through_safetensors(tmp_path):
    from streamlearn.learners.torch_learner import TorchLearner

    settings = ModelConfig(model="mlp", params={"hidden": [8]}, encoder=EncoderConfig(4, 4, 4))
    learner = TorchLearner("digits", settings, seed=1)
    learner.learn_batch([Example(f"r-{i}", "digits", {"x": float(i % 3)}, i % 3, 1.0, i, i) for i in range(600)])
    learner.flush()
    kind, files = model_files(learner)
    assert kind == "torch" and set(files) == {"weights.safetensors", "encoding.pkl"}
    store = ArtifactStore(tmp_path)
    written = store.write(ArtifactManifest("digits", 1, kind, "classification", 0.0, settings), files)
    loaded = load_version("digits", 1, store, manifest_sha256=written.manifest_sha256)
    rows = [{"x": float(i % 3)} for i in range(9)]
    assert loaded.predict_many(rows) == learner.predict_many(rows)
    assert not loaded.model.training   # the module itself, in eval mode


# --- the gate ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, promote, reason", [
    (GateScores(recent=Comparison(0.95, None, 10), shadow=Comparison(0.8, None, 10)), True,
     "passed: recent 0.9500, shadow 0.8000"),
    (GateScores(recent=Comparison(0.95, 0.97, 10), shadow=Comparison(0.9, 0.9, 10)), True, "passed: recent"),
    (GateScores(recent=Comparison(0.90, 0.97, 10)), False, "recent: 0.9000 is more than 0.05 below"),
    (GateScores(shadow=Comparison(0.60, None, 10)), False, "shadow: 0.6000 is below the minimum 0.7"),
    (GateScores(), False, "shadow: no examples to check the minimum 0.7 on"),
])
def test_gate_rules(scores, promote, reason):
    decision = Gate(GateConfig(regression_tolerance=0.05, min_shadow_score=0.7)).decide(scores)
    assert decision.promote is promote and decision.reasons[1].startswith(reason)
    assert decision.reasons[0] == "rule=standard" and decision.rule == "standard"   # no change: the rule names itself


# --- the CLI ----------------------------------------------------------------------------------------------------

def test_cli_lists_shows_diffs_promotes_and_rolls_back(published, tmp_path):
    cfg, publisher = published
    path = tmp_path / "service.toml"
    path.write_text(f'source = "file:{tmp_path / "events.jsonl"}"\nstate_dir = "{tmp_path / "state"}"\n'
                    '[models.fraud]\nmodel = "logreg"\n[publish]\nenabled = true\n')
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, ["models", *args, "--config", str(path)])

    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    assert [line.split()[1:3] for line in listed.output.splitlines()[1:]] == \
        [["3", "candidate"], ["2", "production"], ["1", "retired"]]
    shown = json.loads(cli("show", "2").output)
    assert shown["status"] == "production" and shown["artifact_check"] == "ok"
    assert [h["status"] for h in shown["history"]] == ["candidate", "production"]
    assert "files changed: model.pkl" in cli("diff", "2", "3").output

    promoted = cli("promote", "3")
    assert promoted.exit_code == 0 and "fraud v3 is production (was v2); model-updates event sent" in promoted.output
    assert cli("promote", "3").exit_code == 1
    assert "fraud v2 is production (was v3)" in cli("rollback").output
    assert "fraud v1 is production (was v2)" in cli("rollback", "--to", "1").output
    assert open_artifacts(cfg).production("fraud").version == 1

    (tmp_path / "state" / "artifacts" / "fraud" / "v000003" / "model.pkl").write_bytes(b"tampered")
    assert "model.pkl truncated" in json.loads(cli("show", "3").output)["artifact_check"]
    refused = cli("promote", "3")   # serving is never pointed at something it could not load
    assert refused.exit_code == 1 and "model.pkl truncated" in refused.output
    assert publisher.registry.production("fraud").version == 1 and open_artifacts(cfg).production("fraud").version == 1
    assert len((tmp_path / "state" / UPDATES_FILE).read_bytes().splitlines()) == 5   # 2 in the fixture, 3 here
