"""The report's HTML page: one file, the figures embedded as data URIs, and a table of final figures per model.

(Named `page`, not `html`, so that `import html` here is the standard library's.)

>>> row = FinalFigures(model="fraud<1>", task="classification", learned=1200, errors=0,
...                    scores={"accuracy": 0.91234}, forgetting=None, backward_transfer=None, drifts=2)
>>> text = render_page(PageHeader("state", []), [], [row])
>>> "fraud&lt;1&gt;" in text, "0.9123" in text, "1,200" in text
(True, True, True)
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Union

from streamlearn.report.inputs import RunSummary
from streamlearn.report.series import ModelSeries


@dataclass(frozen=True)
class Panel:
    """One figure of the page: its PNG, or why there is none."""

    title: str
    file: str                 # the PNG's name next to the page, e.g. "scores.png"
    caption: str
    png: Optional[bytes]      # None: not drawn
    missing: str = ""         # why it was not drawn


@dataclass(frozen=True)
class FinalFigures:
    """One model's row of the final-figures table."""

    model: str
    task: str
    learned: Optional[int]               # None: the history has score samples of the model only
    errors: Optional[int]
    scores: dict[str, Optional[float]]   # summary names: "accuracy" (cumulative), "accuracy_rolling", ...
    forgetting: Optional[float]
    backward_transfer: Optional[float]
    drifts: Optional[int]                # counted in the history; the summary has no list of drifts
    actions: Optional[int] = None        # the drift policy's actions, counted in the history


@dataclass(frozen=True)
class PageHeader:
    """What the page is about: the state folder, the history's extent, the notes to show first."""

    state_dir: str
    notes: list[str]                        # shown in a box above everything (e.g. "no history to plot")
    records: int = 0
    samples: int = 0                        # score samples (eval.sample_every)
    models: int = 0
    first_time: Optional[float] = None      # unix seconds of the oldest and newest history record
    last_time: Optional[float] = None
    summary_file: Optional[str] = None
    summary: Optional[RunSummary] = None


def final_figures(models: list[ModelSeries], summary: Optional[RunSummary]) -> list[FinalFigures]:
    """A row per model: from the summary where it has the model, else from the model's newest history record."""
    history = {m.model: m for m in models}
    rows = []
    for name in sorted(set(history) | set(summary.models if summary else ())):
        series = history.get(name)
        drifts = len(series.drifts) if series else None
        actions = len(series.actions) if series else None
        if summary and name in summary.models:
            s = summary.models[name]
            rows.append(FinalFigures(name, s.task, s.learned, s.errors, dict(s.scores), s.forgetting,
                                     s.backward_transfer, drifts, actions))
        elif series.last is None:   # a run shorter than eval.every: its score samples only
            scores = {f"{metric}_rolling": value for metric, value in series.last_sample.scores.items()}
            rows.append(FinalFigures(name, "", None, None, scores, None, None, drifts, actions))
        else:
            last = series.last
            scores: dict[str, Optional[float]] = {}
            for metric in dict.fromkeys(list(last.scores_all) + list(last.scores)):
                scores[metric] = last.scores_all.get(metric)
                scores[f"{metric}_rolling"] = last.scores.get(metric)
            if series.last_sample is not None and series.last_sample.position > last.position:
                scores.update({f"{m}_rolling": v for m, v in series.last_sample.scores.items()})
            rows.append(FinalFigures(name, "", last.learned, None, scores, last.forgetting,
                                     last.backward_transfer, drifts, actions))
    return rows


def render_page(header: PageHeader, panels: list[Panel], rows: list[FinalFigures]) -> str:
    """The whole HTML document."""
    parts = [_HEAD, "<h1>streamlearn report</h1>", _intro(header)]
    if header.notes:
        parts.append('<div class="note">' + "<br>".join(html.escape(n) for n in header.notes) + "</div>")
    parts.append("<h2>Final figures</h2>")
    parts.append(_table(rows) if rows else "<p>No models.</p>")
    source = (f"from the summary {html.escape(header.summary_file)}" if header.summary_file
              else "from each model's newest history record")
    parts.append(f'<p class="small">Final figures {source}; drifts and policy actions counted in the history.</p>')
    for panel in panels:
        parts.append(f"<h2>{html.escape(panel.title)}</h2>")
        if panel.png is None:
            parts.append(f'<p class="missing">Not drawn: {html.escape(panel.missing)}</p>')
            continue
        data = base64.b64encode(panel.png).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(panel.title)}">'
                     f"<figcaption>{html.escape(panel.caption)} ({html.escape(panel.file)})</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _intro(header: PageHeader) -> str:
    lines = [f"State folder <code>{html.escape(header.state_dir)}</code>."]
    if header.records or header.samples:
        span = ""
        if header.first_time is not None and header.last_time is not None:
            span = f", recorded {_utc(header.first_time)} to {_utc(header.last_time)} UTC"
        lines.append(f"History: {header.records:,} records and {header.samples:,} score samples of "
                     f"{header.models} model{'' if header.models == 1 else 's'}{span}.")
    if header.summary is not None:
        s = header.summary
        dead = sum(s.dead_letters.values())
        lines.append(f"Run: {s.learned:,} examples learned in {s.elapsed_seconds:,.1f} s "
                     f"({s.examples_per_second:,.0f}/s), {dead:,} dead letter{'' if dead == 1 else 's'}.")
    return "<p>" + "<br>".join(lines) + "</p>"


def _table(rows: list[FinalFigures]) -> str:
    metrics = list(dict.fromkeys(name for row in rows for name in row.scores))
    heads = ["model", "task", "learned", "errors"] + [_metric_head(m) for m in metrics]
    heads += ["forgetting", "backward transfer", "drifts", "policy actions"]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr></thead><tbody>"]
    for row in rows:
        cells = [row.model, row.task or None, row.learned, row.errors] + [row.scores.get(m) for m in metrics]
        cells += [row.forgetting, row.backward_transfer, row.drifts, row.actions]
        out.append("<tr>" + "".join(_cell(c) for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _metric_head(name: str) -> str:
    """`accuracy_rolling` -> `accuracy (rolling)`; the summary's bare name is the cumulative score."""
    if name.endswith("_rolling"):
        return f"{name[:-len('_rolling')].replace('_', ' ')} (rolling)"
    return f"{name.replace('_', ' ')} (cumulative)"


def _cell(value: Union[str, int, float, None]) -> str:
    if isinstance(value, str):
        return f"<td>{html.escape(value)}</td>"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num">–</td>'
    text = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    return f'<td class="num">{text}</td>'


def _utc(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>streamlearn report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0 0 2em 0; }
img { max-width: 100%; height: auto; }
figcaption, .small { color: #555; font-size: 0.9em; }
.note { background: #fff6d6; border: 1px solid #e0c060; padding: 0.6em 1em; margin: 1em 0; }
.missing { color: #777; font-style: italic; }
</style></head><body>"""
