"""Builds the whole report of one state folder: reads the inputs, draws the figures, writes the PNGs and the page.

>>> import tempfile, pathlib
>>> from streamlearn.telemetry.history import HistoryRecord, HistoryWriter
>>> state = pathlib.Path(tempfile.mkdtemp())
>>> with HistoryWriter(state / "history.jsonl") as writer:
...     for i in range(1, 4):
...         writer.append(HistoryRecord(model="m", time=i, position=100 * i, learned=100 * i,
...                                     scores={"accuracy": 0.5 + i / 10}))
>>> [path.name for path in build_report(state).written]
['scores.png', 'report.html']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from matplotlib.figure import Figure

from streamlearn.report.inputs import HISTORY_FILE, ReportError, check_state_dir, load_history, load_summary
from streamlearn.report.page import PageHeader, Panel, final_figures, render_page
from streamlearn.report.plots import plot_latency, plot_probes, plot_scores, png_bytes
from streamlearn.report.series import ModelSeries, by_model

PAGE_FILE = "report.html"


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: its file, how to draw it, and what the page says about it."""

    file: str
    title: str
    draw: Callable[[list[ModelSeries]], Optional[Figure]]
    caption: str
    missing: str   # why it may not be drawn


FIGURES = (
    FigureSpec("scores.png", "Prequential score over the stream", plot_scores,
               "Test-then-train score of each model: rolling window (solid; sampled every eval.sample_every "
               "examples) and cumulative (dashed; at each evaluation); vertical lines mark drift detections, "
               "named by detector; markers on the rolling line mark the drift policy's actions.",
               "the history records carry no scores"),
    FigureSpec("probes.png", "Probe accuracy per segment", plot_probes,
               "Accuracy on each segment's held-out probes as the model moves on; below, forgetting and "
               "backward transfer over the segments kept.",
               "no model recorded probe accuracies (probes are held out for classifiers when eval.probe_size > 0)"),
    FigureSpec("latency.png", "Latency over the stream", plot_latency,
               "The latency quantiles the history records carry, per model, on a log scale.",
               "the history records carry no latencies"),
)


@dataclass(frozen=True)
class Report:
    """What `build_report` wrote (in a fixed order: the PNGs, then the page) and what the user should know."""

    written: list[Path]
    notes: list[str] = field(default_factory=list)


def build_report(state_dir: Path, out_dir: Optional[Path] = None, summary_path: Optional[Path] = None) -> Report:
    """Writes `OUT/report.html` and the PNGs it embeds (OUT defaults to `STATE_DIR/report`); `ReportError` if it can't.

    A figure with nothing to draw is left out, and an old PNG of that name in
    OUT is removed, so that the folder never mixes figures of two reports.
    """
    state = check_state_dir(Path(state_dir))
    history_file = state / HISTORY_FILE
    history = load_history(history_file)
    records, samples = history.records, history.samples
    summary = load_summary(Path(summary_path)) if summary_path is not None else None
    notes: list[str] = []
    if not records and not samples:
        reason = "is missing" if not history_file.exists() else "has no readable records"
        if summary is None:
            raise ReportError(f"nothing to report: {history_file} {reason} "
                              "(the service writes it when eval.history is on; --summary FILE reports final figures alone)")
        notes.append(f"No history to plot: {history_file} {reason}; only the summary's final figures are shown.")
    models = by_model(records, samples)
    superseded = sum(m.superseded for m in models)
    if superseded:
        notes.append(f"{superseded} history record{'s' if superseded > 1 else ''} from before a rollback "
                     "left out (a later run rewrote those positions).")
    out = Path(out_dir) if out_dir is not None else state / "report"
    times = [r.time for r in records] + [s.time for s in samples]
    header = PageHeader(str(state), notes, records=len(records), models=len(models),
                        first_time=min(times, default=None), last_time=max(times, default=None), samples=len(samples),
                        summary_file=str(summary_path) if summary is not None else None, summary=summary)
    try:
        out.mkdir(parents=True, exist_ok=True)
        panels, written = [], []
        for spec in FIGURES:
            path = out / spec.file
            figure = spec.draw(models) if models else None
            if figure is None:
                path.unlink(missing_ok=True)
                panels.append(Panel(spec.title, spec.file, spec.caption, None,
                                    spec.missing if models else "no history"))
                continue
            png = png_bytes(figure)
            path.write_bytes(png)
            written.append(path)
            panels.append(Panel(spec.title, spec.file, spec.caption, png))
        page = out / PAGE_FILE
        page.write_text(render_page(header, panels, final_figures(models, summary)), encoding="utf-8")
        written.append(page)
    except OSError as err:
        raise ReportError(f"cannot write the report to {out}: {err.strerror or err}") from None
    return Report(written, notes)
