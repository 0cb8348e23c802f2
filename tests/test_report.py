"""`streamlearn report`: figures and page from a history file, score samples and policy actions, error paths,
and the report of a real run."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import orjson
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from streamlearn.cli import app
from streamlearn.report.series import by_model
from streamlearn.learners.plasticity import PolicyAction
from streamlearn.telemetry.history import (DriftMark, HistoryRecord, HistoryWriter, ScoreSample, read_history,
                                           read_history_file)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("scores.png", "probes.png", "latency.png")
runner = CliRunner()


def history_records() -> list[HistoryRecord]:
    """Two classifiers and a regressor, evaluated every 1000 examples: drifts, probes, latency, a restore."""
    records = []
    for model, task, drift_at in (("fraud", "classification", {12_000: "adwin", 13_000: "page_hinkley"}),
                                  ("churn", "classification", {7_000: "adwin"}),
                                  ("eta", "regression", {})):
        for step in range(1, 21):
            position = 1000 * step
            drifted = position > 12_000 and model == "fraud"
            if task == "classification":
                rolling = {"accuracy": 0.9 - 0.25 * drifted + 0.01 * math.sin(step), "log_loss": 0.3 + 0.4 * drifted}
                cumulative = {"accuracy": 0.85 - 0.005 * step * drifted, "log_loss": 0.35}
                probes = {s: 0.92 - 0.02 * (step - 2 * s) * (s < 6) for s in range(max(0, step // 2 - 5), step // 2)}
                forgetting = 0.01 * step if step > 3 else None
                transfer = -0.008 * step if step > 3 else None
            else:
                rolling, cumulative = {"mae": 3.0 / step, "rmse": 4.0 / step}, {"mae": 5.0 / step, "rmse": 6.0 / step}
                probes, forgetting, transfer = {}, None, None
            records.append(HistoryRecord(
                model=model, time=1_700_000_000.0 + step, position=position, learned=position - 10 * step,
                scores=rolling, scores_all=cumulative, probe_accuracy=probes, forgetting=forgetting,
                backward_transfer=transfer,
                drifts=[DriftMark(d, p) for p, d in drift_at.items() if position - 1000 < p <= position],
                latency={"loop_p50": 0.004 * (1 + step / 10), "loop_p99": 0.05, "processing_p50": 0.002,
                         "processing_p99": 0.03 + 0.002 * step, "queueing_p99": 0.01, "label_delay_p50": 600.0}))
    return records


def write_history(state, records=None) -> None:
    """The records, then a restore that rewrites fraud's position 20000, then a line cut short by a crash."""
    records = history_records() if records is None else records
    with HistoryWriter(state / "history.jsonl") as writer:
        for record in records:
            writer.append(record)
        writer.append(HistoryRecord(model="fraud", time=1_700_000_100.0, position=20_000, learned=19_800,
                                    scores={"accuracy": 0.99}, scores_all={"accuracy": 0.9}))
    with open(state / "history.jsonl", "ab") as file:
        file.write(b'{"model": "fraud", "time": 1700000200.0, "posi')


def check_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = imread(io.BytesIO(data), format="png")
    assert image.shape[1] >= 800 and image.shape[0] >= 300   # a readable figure, not a thumbnail
    assert np.ptp(image[..., :3]) > 0.5                      # something was drawn on the white
    return image


def test_report_draws_every_figure_and_embeds_them(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    write_history(state)
    result = runner.invoke(app, ["report", "--state", str(state)])
    assert result.exit_code == 0, result.output
    out = state / "report"
    expected = [str(out / name) for name in FIGURES + ("report.html",)]
    assert result.stdout.splitlines() == expected
    for name in FIGURES:
        check_png(out / name)
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(data) for data in embedded] == [(out / name).read_bytes() for name in FIGURES]
    for model in ("fraud", "churn", "eta"):
        assert f"<td>{model}</td>" in page
    assert "accuracy (rolling)" in page and "mae (cumulative)" in page
    assert "http" not in page.replace("http-equiv", "")   # self-contained: nothing fetched from elsewhere


def test_newest_record_per_position_and_broken_line_skipped(tmp_path):
    write_history(tmp_path)
    records = read_history(tmp_path / "history.jsonl")
    fraud = [r for r in records if r.model == "fraud"]
    assert len(fraud) == 20 and fraud[-1].scores == {"accuracy": 0.99}
    [churn, eta, fraud_series] = by_model(records)
    assert [m.model for m in (churn, eta, fraud_series)] == ["churn", "eta", "fraud"]
    assert [(d.detector, d.position) for d in fraud_series.drifts] == [("adwin", 12_000), ("page_hinkley", 13_000)]
    assert not eta.has_probes and churn.has_probes
    assert sorted(churn.probes) == list(range(10))


def test_rollback_leftovers_are_left_out(tmp_path):
    """Positions beyond where a rolled-back run stopped, written before the rollback, are not drawn."""
    old = [HistoryRecord(model="m", time=float(t), position=100 * t, learned=100 * t, scores={"accuracy": 0.5})
           for t in range(1, 11)]
    new = [HistoryRecord(model="m", time=100.0 + t, position=100 * t, learned=100 * t, scores={"accuracy": 0.9})
           for t in range(6, 9)]
    write_history(tmp_path, old + new)
    [m] = by_model(r for r in read_history(tmp_path / "history.jsonl") if r.model == "m")
    assert m.rolling["accuracy"].x.tolist() == [100 * t for t in range(1, 9)]
    assert m.superseded == 2
    result = runner.invoke(app, ["report", "--state", str(tmp_path)])
    assert result.exit_code == 0 and "2 history records from before a rollback" in result.stderr


def test_summary_table_and_out_folder(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    write_history(state)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"learned": 60_000, "elapsed_seconds": 12.5, "examples_per_second": 4800.0,
                                   "dead_letters": {"schema": 3}, "something_new": [1],
                                   "models": {"fraud": {"model": "fraud", "task": "classification",
                                                        "learned": 19_812, "errors": 1,
                                                        "scores": {"accuracy": 0.8765, "accuracy_rolling": math.nan},
                                                        "forgetting": 0.125, "backward_transfer": None}}}))
    out = tmp_path / "elsewhere"
    result = runner.invoke(app, ["report", "--state", str(state), "--out", str(out), "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == str(out / "report.html")
    page = (out / "report.html").read_text()
    row = re.search(r"<tr><td>fraud</td>.*?</tr>", page).group(0)
    assert "19,812" in row and "0.8765" in row and "0.125" in row and "classification" in row
    assert "<td>churn</td>" in page            # not in the summary: from its history
    assert "3 dead letters" in page and "60,000 examples learned" in page
    assert not (state / "report").exists()


def test_summary_without_history_writes_the_table_only(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"models": {"default": {"task": "regression", "learned": 5,
                                                          "scores": {"mae": 0.5, "mae_rolling": 0.4}}}}))
    (tmp_path / "report" / "scores.png").parent.mkdir()
    (tmp_path / "report" / "scores.png").write_bytes(b"stale")   # from an earlier report: must not linger
    result = runner.invoke(app, ["report", "--state", str(tmp_path), "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / "report" / "report.html")]
    assert "No history to plot" in result.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<td>default</td>" in page and "No history to plot" in page and "data:image/png" not in page
    assert not (tmp_path / "report" / "scores.png").exists()


def test_figures_without_data_are_left_out(tmp_path):
    """A regression model alone holds out no probes: no probes.png, and the page says why."""
    write_history(tmp_path, [r for r in history_records() if r.model == "eta"])
    result = runner.invoke(app, ["report", "--state", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = [line.rsplit("/", 1)[-1] for line in result.stdout.splitlines()]
    assert names == ["scores.png", "latency.png", "report.html"]
    assert "Not drawn: no model recorded probe accuracies" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.parametrize("case", ["no_dir", "not_a_dir", "no_history", "empty_history", "broken_only",
                                  "no_summary_file", "bad_summary", "not_a_summary"])
def test_unusable_inputs_exit_2_with_one_line(tmp_path, case):
    state = tmp_path / "state"
    args = ["report", "--state", str(state)]
    if case != "no_dir":
        state.mkdir()
    if case == "not_a_dir":
        args[2] = str(tmp_path / "file")
        (tmp_path / "file").write_text("x")
    if case == "empty_history":
        (state / "history.jsonl").write_bytes(b"")
    if case == "broken_only":
        (state / "history.jsonl").write_bytes(b"{nope\n[1, 2]\n")
    if case in ("no_summary_file", "bad_summary", "not_a_summary"):
        write_history(state)
        summary = tmp_path / "summary.json"
        if case == "bad_summary":
            summary.write_text("{\"models\": ")
        if case == "not_a_summary":
            summary.write_text('{"models": {"m": {"learned": "many"}}}')
        args += ["--summary", str(summary)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = [line for line in result.stderr.splitlines() if line.startswith("report:")]
    assert len(message) == 1 and "Traceback" not in result.output, result.output
    assert result.stdout == ""
    if case in ("no_history", "empty_history", "broken_only"):
        assert "history.jsonl" in message[0]


def test_report_of_a_real_run(tmp_path):
    """The service's own history.jsonl (written at every evaluation) makes a report with scores and probes."""
    from streamlearn.config import parse_config
    from streamlearn.service import Service

    path = tmp_path / "examples.jsonl"
    rng = np.random.default_rng(3)
    lines = []
    for i in range(4000):
        x = float(rng.normal())
        flip = i >= 2000   # the concept flips halfway: a drift, and the first segments get forgotten
        lines.append(orjson.dumps({"id": f"e-{i}", "ts": i, "model": "a" if i % 2 else "b",
                                   "features": {"x": x}, "label": int((x > 0) != flip)}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    state = tmp_path / "state"
    config = parse_config({"source": f"file:{path}", "state_dir": str(state), "metrics": {"enabled": False},
                           "intake": {"mode": "inline"},
                           "models": {"a": {"model": "logreg", "window": 200}, "b": {"model": "hoeffding_tree"}},
                           "eval": {"segment_size": 400, "probe_size": 40, "every": 200, "segments": 4,
                                    "history": True}}, env={})
    service = Service(config)
    try:
        summary = service.run()
    finally:
        service.close()
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert (state / "history.jsonl").exists(), "the service wrote no history.jsonl"
    result = runner.invoke(app, ["report", "--state", str(state), "--summary", str(tmp_path / "summary.json")])
    assert result.exit_code == 0, result.output
    for name in ("scores.png", "probes.png"):
        check_png(state / "report" / name)
    page = (state / "report" / "report.html").read_text()
    assert "<td>a</td>" in page and "<td>b</td>" in page
    records = read_history(state / "history.jsonl")
    assert {r.model for r in records} == {"a", "b"}
    assert any(r.probe_accuracy for r in records)


def sampled_history(actions: bool) -> tuple[list[HistoryRecord], list[ScoreSample]]:
    """A run of 35,000 examples: an evaluation every 10,000, a score sample every 100, a change at 21,000."""
    records, samples = [], []
    marks = [PolicyAction(21_400, 1_700_021_400.0, "change", "release_ewc"),
             PolicyAction(21_400, 1_700_021_400.0, "change", "expire_replay"),
             PolicyAction(30_000, 1_700_030_000.0, "burst", "hold")] if actions else []
    for position in range(100, 35_001, 100):
        accuracy = 0.95 if position < 21_000 else min(0.95, 0.3 + (position - 21_000) / 3000)
        samples.append(ScoreSample("fraud", position, 1_700_000_000.0 + position, {"accuracy": accuracy}))
        if position % 10_000 == 0:
            records.append(HistoryRecord(
                model="fraud", time=1_700_000_000.0 + position, position=position, learned=position,
                scores={"accuracy": accuracy}, scores_all={"accuracy": 0.9},
                drifts=[DriftMark("adwin", 21_150)] if position == 30_000 else [],
                actions=[a for a in marks if position - 10_000 < a.position <= position]))
    return records, samples


def test_score_samples_draw_the_curve_and_policy_actions_are_marked(tmp_path):
    """Hundreds of sampled points make the rolling line; the policy's actions are markers on it, counted on the page."""
    images = {}
    for actions in (True, False):
        state = tmp_path / f"state-{actions}"
        state.mkdir()
        records, samples = sampled_history(actions)
        with HistoryWriter(state / "history.jsonl") as writer:
            for line in samples + records:
                writer.append(line)
        result = runner.invoke(app, ["report", "--state", str(state)])
        assert result.exit_code == 0, result.output
        images[actions] = check_png(state / "report" / "scores.png")
        history = read_history_file(state / "history.jsonl")
        [fraud] = by_model(history.records, history.samples)
        assert fraud.sampled and len(fraud.rolling["accuracy"]) == 350 and len(fraud.cumulative["accuracy"]) == 3
        assert [(a.position, a.action) for a in fraud.actions] == \
            ([(21_400, "release_ewc"), (21_400, "expire_replay"), (30_000, "hold")] if actions else [])
        page = (state / "report" / "report.html").read_text()
        assert "<th>policy actions</th>" in page and "350 score samples" in page
        row = re.search(r"<tr><td>fraud</td>.*?</tr>", page).group(0)
        assert row.endswith(f'<td class="num">1</td><td class="num">{3 if actions else 0}</td></tr>'), row
    assert images[True].shape == images[False].shape and not np.array_equal(images[True], images[False])


def test_samples_alone_and_rolled_back_samples(tmp_path):
    """A run shorter than eval.every has samples only: still a curve and a row; a rollback's leftovers go."""
    old = [ScoreSample("m", 100 * t, float(t), {"accuracy": 0.5}) for t in range(1, 11)]
    new = [ScoreSample("m", 100 * t, 100.0 + t, {"accuracy": 0.9}) for t in range(6, 9)]
    with HistoryWriter(tmp_path / "history.jsonl") as writer:
        for sample in old + new:
            writer.append(sample)
    result = runner.invoke(app, ["report", "--state", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [line.rsplit("/", 1)[-1] for line in result.stdout.splitlines()] == ["scores.png", "report.html"]
    history = read_history_file(tmp_path / "history.jsonl")
    [m] = by_model(history.records, history.samples)
    assert m.rolling["accuracy"].x.tolist() == [100 * t for t in range(1, 9)] and m.superseded == 2
    row = re.search(r"<tr><td>m</td>.*?</tr>", (tmp_path / "report" / "report.html").read_text()).group(0)
    assert "0.9" in row
