"""The report's figures, one function each: the models' series in, a matplotlib `Figure` out (None: nothing to draw).

Figures are built on the Agg canvas directly, not through pyplot, so drawing
needs no display, opens no windows and leaves no global figure state behind.
Legends sit to the right of the axes, outside them, so they never cover a line.

>>> import numpy as np
>>> from streamlearn.report.series import by_model
>>> from streamlearn.telemetry.history import HistoryRecord
>>> records = [HistoryRecord(model="m", time=i, position=100 * i, learned=100 * i, scores={"accuracy": 0.8},
...                          latency={"loop_p50": 0.01, "loop_p99": 0.2}) for i in range(1, 4)]
>>> models = by_model(records)
>>> png_bytes(plot_latency(models))[:8] == b"\\x89PNG\\r\\n\\x1a\\n", plot_probes(models) is None
(True, True)
"""

from __future__ import annotations

import io
import re
from typing import Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator

from streamlearn.report.series import Curve, ModelSeries

WIDTH = 11.0            # inches; at DPI 100 a 1100-pixel-wide image, readable in a browser without zooming
DPI = 100
PALETTE = colormaps["tab10"].colors
HIGHER_IS_BETTER = {"accuracy": True, "log_loss": False, "mae": False, "rmse": False}
DETECTOR_STYLES = (":", "-.", (0, (5, 2, 1, 2)), (0, (1, 3)))
QUANTILE_STYLES = {"p50": "-", "p90": "-.", "p95": "-.", "p99": "--", "p999": ":"}
ACTION_MARKERS = ("v", "^", "D", "s", "P", "X", "*", "h")   # one per policy action name, in order of appearance
MAX_SEGMENT_LEGEND = 8   # more segments than this get a colour bar instead of one legend entry each
X_LABEL = "position in the model's stream (examples taken)"


def plot_scores(models: list[ModelSeries]) -> Optional[Figure]:
    """Rolling (solid) and cumulative (dashed) prequential scores, one panel per metric, drifts as vertical lines.

    The drift policy's actions are markers on the model's rolling line, one shape per action.
    """
    metrics = _ordered(list(m.rolling) + list(m.cumulative) for m in models)
    if not metrics:
        return None
    fig = _figure(0.9 + 2.8 * len(metrics))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    colors = _model_colors(models)
    detectors = {d: DETECTOR_STYLES[i % len(DETECTOR_STYLES)]
                 for i, d in enumerate(_ordered([mark.detector for mark in m.drifts] for m in models))}
    actions = {a: ACTION_MARKERS[i % len(ACTION_MARKERS)]
               for i, a in enumerate(_ordered([act.action for act in m.actions] for m in models))}
    labelled: set[str] = set()   # drift labels go on the first panel of each model only: the lines say the rest
    for ax, metric in zip(axes, metrics):
        shown = [m for m in models if metric in m.rolling or metric in m.cumulative]
        for m in shown:
            rolling = m.rolling.get(metric)
            _line(ax, rolling, color=colors[m.model], lw=1.4 if m.sampled else 1.6,
                  **({} if m.sampled or rolling is None or len(rolling) > 60 else {"marker": "."}))
            _line(ax, m.cumulative.get(metric), color=colors[m.model], lw=1.2, ls="--")
            _action_markers(ax, m, rolling, colors[m.model], actions)
        _drift_lines(ax, [m for m in shown if m.model not in labelled], [m for m in shown if m.model in labelled],
                     colors, detectors)
        labelled.update(m.model for m in shown)
        better = HIGHER_IS_BETTER.get(metric)
        ax.set_ylabel(metric.replace("_", " ") + ("" if better is None else f"\n({'higher' if better else 'lower'}"
                                                                           " is better)"))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes[-1].set_xlabel(X_LABEL)
    fig.suptitle("Prequential score over the stream", fontweight="bold")
    handles = [Line2D([], [], color=colors[m.model], lw=2, label=m.model) for m in models]
    handles += [Line2D([], [], color="0.3", lw=1.6, label="rolling window"),
                Line2D([], [], color="0.3", lw=1.2, ls="--", label="cumulative")]
    handles += [Line2D([], [], color="0.3", lw=1.2, ls=style, label=f"drift: {name}")
                for name, style in detectors.items()]
    kinds = {a: _ordered([[act.kind for act in m.actions if act.action == a] for m in models]) for a in actions}
    handles += [Line2D([], [], color="0.3", marker=marker, ls="", markeredgecolor="k",
                       label=f"policy: {action.replace('_', ' ')} ({', '.join(kinds[action])})")
                for action, marker in actions.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    return fig


def plot_probes(models: list[ModelSeries]) -> Optional[Figure]:
    """Per model: accuracy on each segment's held-out probes over the stream, and forgetting / backward transfer below."""
    shown = [m for m in models if m.has_probes]
    if not shown:
        return None
    fig = _figure(0.9 + 4.6 * len(shown))
    grid = fig.add_gridspec(2 * len(shown), 1, height_ratios=[2.8, 1.6] * len(shown))
    for i, m in enumerate(shown):
        top = fig.add_subplot(grid[2 * i])
        bottom = fig.add_subplot(grid[2 * i + 1], sharex=top)
        _segment_lines(top, m)
        top.set_title(f"{m.model}: accuracy on each segment's held-out probes "
                      "(an old segment's line falling = forgetting)", fontsize=10, loc="left")
        top.set_ylabel("probe accuracy")
        top.tick_params(labelbottom=False)
        _line(bottom, m.forgetting, color="tab:red", lw=1.6, marker=".", label="forgetting")
        _line(bottom, m.backward_transfer, color="tab:blue", lw=1.6, marker=".", label="backward transfer")
        bottom.axhline(0.0, color="0.5", lw=0.8)
        bottom.set_ylabel("accuracy change")
        bottom.set_title(f"{m.model}: forgetting (> 0: lost) and backward transfer (< 0: lost)", fontsize=10,
                         loc="left")
        bottom.set_xlabel(X_LABEL)
        if bottom.lines[:-1]:   # the zero line alone needs no legend
            _legend_right(bottom)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle("Probe accuracy per segment, forgetting and backward transfer", fontweight="bold")
    return fig


def plot_latency(models: list[ModelSeries]) -> Optional[Figure]:
    """Per model: every latency the records carry (p50 solid, p99 dashed; one colour per kind), log scale."""
    shown = [m for m in models if any(np.any(c.y > 0) for c in m.latency.values())]
    if not shown:
        return None
    families = _ordered([_split_quantile(k)[0] for k in m.latency] for m in shown)
    colors = {family: PALETTE[i % len(PALETTE)] for i, family in enumerate(families)}
    fig = _figure(0.9 + 2.8 * len(shown))
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, m in zip(axes, shown):
        for key, curve in sorted(m.latency.items(), key=lambda kv: _latency_order(kv[0], families)):
            family, quantile = _split_quantile(key)
            positive = curve.y > 0   # a log axis cannot show 0 (no observations yet)
            if positive.any():
                ax.plot(curve.x[positive], curve.y[positive], color=colors[family], lw=1.5,
                        ls=QUANTILE_STYLES.get(quantile or "p50", ":"), label=key.replace("_", " "),
                        marker="." if positive.sum() < 60 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: duration(v)))
        ax.set_ylabel("seconds (log scale)")
        ax.set_title(m.model, fontsize=10, loc="left")
        ax.grid(alpha=0.3, which="both")
        _legend_right(ax)
    axes[-1].set_xlabel(X_LABEL)
    fig.suptitle("Latency over the stream", fontweight="bold")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def duration(seconds: float) -> str:
    """A short tick label for a duration in seconds.

    >>> [duration(s) for s in (2e-6, 0.0025, 1.0, 90.0, 7200.0)]
    ['2 µs', '2.5 ms', '1 s', '1.5 min', '2 h']
    """
    for unit, size in (("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1e6:.3g} µs"


def _figure(height: float) -> Figure:
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _line(ax: Axes, curve: Optional[Curve], **style) -> None:
    if curve is not None and len(curve):
        if len(curve) == 1 and "marker" not in style:   # a single point draws no line: show it as a dot
            style["marker"] = "o"
        ax.plot(curve.x, curve.y, **style)


def _segment_lines(ax: Axes, m: ModelSeries) -> None:
    """One line per segment, coloured from dark (oldest) to light (newest)."""
    if not m.probes:
        ax.text(0.5, 0.5, "no probe accuracies recorded", transform=ax.transAxes, ha="center", color="0.4")
        return
    numbers = sorted(m.probes)
    norm = Normalize(min(numbers), max(max(numbers), min(numbers) + 1))
    cmap = colormaps["viridis"]
    for number in numbers:
        curve = m.probes[number]
        ax.plot(curve.x, curve.y, color=cmap(norm(number)), lw=1.4, label=f"segment {number}",
                marker="." if len(curve) < 60 else None)
    if len(numbers) <= MAX_SEGMENT_LEGEND:
        _legend_right(ax)
    else:
        ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label="segment (0 = first)", pad=0.01)


def _drift_lines(ax: Axes, labelled: list[ModelSeries], unlabelled: list[ModelSeries], colors: dict[str, tuple],
                 detectors: dict[str, object]) -> None:
    """A vertical line per drift; `labelled` models' drifts also get their detector's name, where there is room."""
    for m in labelled + unlabelled:
        for mark in m.drifts:
            ax.axvline(mark.position, color=colors[m.model], lw=1.1, ls=detectors[mark.detector], alpha=0.8)
    marks = sorted(((mark.position, mark.detector, m.model) for m in labelled for mark in m.drifts))
    if not marks:
        return
    # names go in a band of headroom above the data, on two staggered rows, and a name that would
    # overlap its neighbour is left out (its line stays): better a few names than an unreadable smear
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.25 * (high - low))
    left, right = ax.get_xlim()
    gap = 0.07 * (right - left)
    last = [-np.inf, -np.inf]
    for position, detector, model in marks:
        for row in (0, 1):
            if position - last[row] >= gap:
                ax.annotate(detector, xy=(position, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(2, -3 - 11 * row), textcoords="offset points", va="top", fontsize=7,
                            color=colors[model])
                last[row] = position
                break


def _action_markers(ax: Axes, m: ModelSeries, rolling: Optional[Curve], color: tuple,
                    markers: dict[str, str]) -> None:
    """A marker per policy action, on the model's rolling line where it acted (at the bottom if there is none)."""
    if not m.actions:
        return
    x = np.array([a.position for a in m.actions], dtype=float)
    if rolling is not None and len(rolling):
        y, where = np.interp(x, rolling.x, rolling.y), ax.transData
    else:
        y, where = np.full(len(x), 0.03), ax.get_xaxis_transform()   # x in data, y in axes fraction
    for action, marker in markers.items():
        chosen = np.array([a.action == action for a in m.actions])
        if chosen.any():
            ax.plot(x[chosen], y[chosen], ls="", marker=marker, ms=8, color=color, markeredgecolor="k",
                    transform=where, zorder=5)


def _legend_right(ax: Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def _model_colors(models: list[ModelSeries]) -> dict[str, tuple]:
    return {m.model: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def _ordered(groups) -> list:
    """Distinct items over all groups, in order of first appearance."""
    return list(dict.fromkeys(item for group in groups for item in group))


def _split_quantile(key: str) -> tuple[str, Optional[str]]:
    """`"loop_p99"` -> `("loop", "p99")`; a key without a quantile suffix is its own family."""
    match = re.fullmatch(r"(.+)_(p\d+)", key)
    return (match[1], match[2]) if match else (key, None)


def _latency_order(key: str, families: list[str]) -> tuple[int, int]:
    family, quantile = _split_quantile(key)
    return families.index(family), int(quantile[1:]) if quantile else 0
