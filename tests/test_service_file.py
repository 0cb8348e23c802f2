"""The whole pipeline on the file source: routing, bounds, dead letters, the CLI's summary."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import orjson
import pytest

from streamlearn.config import parse_config
from streamlearn.service import Service


def write_lines(path, events) -> None:
    path.write_bytes(b"".join((e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n" for e in events))


def file_config(path, **sections):
    data = {"source": f"file:{path}", "state_dir": str(path.parent / "state"), "metrics": {"enabled": False}}
    for name, values in sections.items():
        data[name] = values
    return parse_config(data, env={})


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_examples_are_routed_to_their_model(tmp_path, mode):
    path = tmp_path / "examples.jsonl"
    events = [{"id": f"e-{i}", "ts": i, "model": "a" if i % 3 else "b", "features": {"x": float(i % 2)},
               "label": i % 2} for i in range(600)]
    events.append({"id": "e-x", "ts": 1, "model": "c", "features": {}, "label": 0})
    write_lines(path, events)
    models = {"a": {"model": "logreg"}, "b": {"model": "hoeffding_tree"}}
    summary = Service(file_config(path, models=models, intake={"mode": mode})).run()
    for model, taken in (("a", 400), ("b", 200)):   # 1 in 100 is held out as a probe (eval.probe_size)
        assert summary["models"][model]["learned"] + summary["models"][model]["held_out"] == taken
        assert summary["models"][model]["held_out"] == taken // 100
    assert summary["dead_letters"] == {"unknown_model": 1}
    assert summary["models"]["a"]["scores"]["accuracy_rolling"] > 0.9


def test_pending_join_state_stops_at_its_bound(tmp_path):
    path = tmp_path / "logs.jsonl"
    write_lines(path, [{"request_id": f"r-{i}", "ts": 1000.0 + i, "features": {"x": 1.0}} for i in range(5000)])
    seen_pending = []
    service = Service(file_config(path, join={"max_pending": 100, "ttl": 1e6}, intake={"batch_size": 50}))
    summary = service.run(on_batch=lambda s, b: seen_pending.append(b.stats.join_pending))
    assert max(seen_pending) <= 100
    assert summary["join_pending"] == 100
    assert summary["join"]["evicted"] == 4900
    assert summary["learned"] == 0


def test_dead_letter_file_keeps_original_bytes_and_reason(tmp_path):
    path = tmp_path / "events.jsonl"
    bad = [b'{"request_id": "r-1", "ts": 1, "features": {"x": NaN}}', b"[1, 2]", b'{"request_id": 5}', b"{nope"]
    write_lines(path, bad + [{"request_id": "r-2", "ts": 2, "label": 1}])
    summary = Service(file_config(path)).run()
    assert summary["dead_letters"] == {"invalid_json": 1, "non_finite": 1, "not_object": 1, "schema": 1}
    letters = [json.loads(line) for line in (tmp_path / "events.jsonl.dlq.jsonl").read_text().splitlines()]
    assert [base64.b64decode(letter["raw_b64"]) for letter in letters] == bad
    assert [letter["line"] for letter in letters] == [1, 2, 3, 4]
    assert all(letter["detail"] for letter in letters)


def test_learn_many_end_to_end(tmp_path):
    path = tmp_path / "examples.jsonl"
    write_lines(path, [{"id": f"e-{i}", "ts": i, "features": {"x": float(i % 2), "c": "ab"[i % 2]},
                        "label": i % 2} for i in range(3000)])
    summary = Service(file_config(path, models={"default": {"model": "logreg", "learn_mode": "many"}})).run()
    assert summary["learned"] == 2970 and summary["models"]["default"]["held_out"] == 30
    assert summary["models"]["default"]["scores"]["accuracy_rolling"] > 0.9


def test_cli_run_on_a_file_writes_the_summary(tmp_path):
    path = tmp_path / "examples.jsonl"
    write_lines(path, [{"id": f"e-{i}", "ts": i, "features": {"x": float(i)}, "label": float(2 * i)}
                       for i in range(100)])
    config = tmp_path / "backfill.toml"
    config.write_text(f'source = "file:{path}"\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nenabled = false\n'
                      '[models.default]\nmodel = "linreg"\ntask = "regression"\n')
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "streamlearn", "run", "--config", str(config), "--summary", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["learned"] == 100
    assert summary["models"]["default"]["scores"]["mae"] >= 0
    assert (tmp_path / "state" / "snapshots" / "snap-00000001" / "manifest.json").exists()  # the final snapshot
