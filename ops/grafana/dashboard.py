"""Generates the streamlearn Grafana dashboard (ops/grafana/streamlearn.json) with the Grafana Foundation SDK.

Run `python ops/grafana/dashboard.py` after changing a panel and commit both
files; `tests/test_ops.py` fails when the checked-in JSON differs from what this
script writes. Every query goes through the `datasource` variable, and the
per-model panels filter on the `model` variable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (BigValueGraphMode, GraphDrawStyle, LegendDisplayMode,
                                                   LegendPlacement, SortOrder, TooltipDisplayMode, VisibilityMode)
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef, GridPos, Threshold,
                                                     ThresholdsMode, VariableRefresh, VariableSort)

OUTPUT = Path(__file__).with_name("streamlearn.json")
UID = "streamlearn-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
MODEL = 'model=~"$model"'
RATE = "$__rate_interval"

Target = tuple[str, str]   # (PromQL, legend format)


class Layout:
    """Hands out panel ids and grid positions: rows across the full width, panels left to right."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = self.y = self.row_height = 0

    def take_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self) -> GridPos:
        """A full-width row header below everything placed so far."""
        top = self.y + self.row_height
        self.x, self.y, self.row_height = 0, top + 1, 0
        return GridPos(h=1, w=24, x=0, y=top)

    def place(self, width: int, height: int) -> GridPos:
        """The next free spot `width` columns wide; wraps to a new line when the grid's 24 columns are full."""
        if self.x + width > 24:
            self.y += self.row_height
            self.x = self.row_height = 0
        pos = GridPos(h=height, w=width, x=self.x, y=self.y)
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos


def _query(ref: str, expr: str, legend: str) -> prometheus.Dataquery:
    return (prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend).range()
            .datasource(DATASOURCE))


def _targets(panel, targets: list[Target]):
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_query(chr(ord("A") + i), expr, legend))
    return panel


def graph(layout: Layout, title: str, description: str, targets: list[Target], unit: str = "short",
          width: int = 8, bars: bool = False, minimum: Optional[float] = 0) -> timeseries.Panel:
    """A time-series panel; `bars` for counts per interval (drift markers, rollbacks)."""
    panel = (timeseries.Panel().id(layout.take_id()).title(title).description(description)
             .datasource(DATASOURCE).unit(unit).grid_pos(layout.place(width, 8))
             .line_width(1).fill_opacity(10).show_points(VisibilityMode.NEVER)
             .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
    if minimum is not None:
        panel = panel.min(minimum)
    if bars:
        panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(80)
    return _targets(panel, targets)


def single(layout: Layout, title: str, description: str, expr: str, unit: str,
           steps: list[tuple[Optional[float], str]]) -> stat.Panel:
    """A stat panel with absolute thresholds `steps` [(from value, colour)], the first from -inf (None)."""
    thresholds = (dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                  .steps([Threshold(value=v, color=c) for v, c in steps]))
    panel = (stat.Panel().id(layout.take_id()).title(title).description(description).datasource(DATASOURCE)
             .unit(unit).grid_pos(layout.place(6, 4)).thresholds(thresholds).graph_mode(BigValueGraphMode.AREA)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])))
    return _targets(panel, [(expr, "")])


def quantiles(metric: str, by: str, selector: str = "") -> list[Target]:
    """Median and 99th percentile of a `streamlearn_*_seconds` histogram, per `by` label (or overall)."""
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    series = f"streamlearn_{metric}_bucket" + (f"{{{selector}}}" if selector else "")
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({series}[{RATE}])))", f"{legend}p{label}")
            for q, label in (("0.5", "50"), ("0.99", "99"))]


def overview(layout: Layout) -> list:
    return [
        single(layout, "Examples learned /s", "All models.",
               f"sum(rate(streamlearn_examples_learned_total{{{MODEL}}}[{RATE}]))", "short",
               [(None, "red"), (0.001, "green")]),
        single(layout, "Consumer lag", "Messages behind the partitions' ends, all topics.",
               "sum(streamlearn_consumer_lag)", "short", [(None, "green"), (10000, "orange"), (100000, "red")]),
        single(layout, "Forgetting (worst model)", "Best earlier probe accuracy minus accuracy now.",
               f"max(streamlearn_forgetting{{{MODEL}}})", "percentunit",
               [(None, "green"), (0.05, "orange"), (0.1, "red")]),
        single(layout, "Newest snapshot age", "Seconds since the newest durable snapshot (of the replica whose newest "
               "is oldest: a restart goes back to the newest epoch every replica has); /readyz fails past "
               "snapshot.max_age_seconds (600 s by default).",
               "time() - min(streamlearn_snapshot_last_success_timestamp_seconds)", "s",
               [(None, "green"), (300, "orange"), (600, "red")]),
    ]


def throughput(layout: Layout) -> list:
    return [
        graph(layout, "Examples learned /s", "Examples learned per second, by model, and examples refused "
              "(dead letters learn_error), by model and error.",
              [(f"sum by (model) (rate(streamlearn_examples_learned_total{{{MODEL}}}[{RATE}]))", "{{model}}"),
               (f"sum by (model, error) (rate(streamlearn_learn_errors_total{{{MODEL}}}[{RATE}]))",
                "{{model}} refused: {{error}}")],
              unit="ops"),
        graph(layout, "Events consumed /s", "Messages read, by topic and outcome (ok, dead_letter).",
              [(f"sum by (topic, outcome) (rate(streamlearn_events_total[{RATE}]))", "{{topic}} {{outcome}}")],
              unit="ops"),
        graph(layout, "Dead letters /s", "Messages refused as bad input, by topic and reason.",
              [(f"sum by (topic, reason) (rate(streamlearn_dead_letters_total[{RATE}]))", "{{topic}} {{reason}}")],
              unit="ops"),
    ]


def joins(layout: Layout) -> list:
    return [
        graph(layout, "Join outcomes /s", "Inference logs and feedback: matched, expired, late, duplicate, "
              "evicted.", [(f"sum by (outcome) (rate(streamlearn_join_total[{RATE}]))", "{{outcome}}")],
              unit="ops"),
        graph(layout, "Pending joins", "Logs and feedback waiting for their other half (bounded by "
              "join.max_pending).", [("sum(streamlearn_join_pending)", "pending")]),
        graph(layout, "Consumer lag", "Messages behind each partition's end (approximate on Tansu).",
              [("sum by (topic, partition) (streamlearn_consumer_lag)", "{{topic}}/{{partition}}")]),
    ]


def latency(layout: Layout) -> list:
    return [
        graph(layout, "Loop latency", "Feedback event time to model updated.",
              quantiles("loop_latency_seconds", "model", MODEL), unit="s"),
        graph(layout, "Feedback delay", "Feedback event time minus inference event time.",
              quantiles("feedback_delay_seconds", ""), unit="s"),
        graph(layout, "Queueing", "Broker timestamp of a message to the intake reading it, by topic.",
              quantiles("queueing_seconds", "topic"), unit="s"),
        graph(layout, "Processing", "Intake read the completing message to model updated (join wait, "
              "hand-off, micro-batch wait, update).", quantiles("processing_seconds", "model", MODEL), unit="s"),
        graph(layout, "Where the time goes", "Per example, by stage of the feedback loop: kafka, join (waiting for "
              "the watermark), batch, handoff, queue, learn.", quantiles("stage_seconds", "stage"), unit="s"),
        graph(layout, "Update duration", "One learner update (one micro-batch).",
              quantiles("update_seconds", "model", MODEL), unit="s"),
    ]


def quality(layout: Layout) -> list:
    return [
        graph(layout, "Prequential score", "Test-then-train score, cumulative (window=all) and rolling (replicas: "
              "their mean).",
              [(f'avg by (model, metric, window) (streamlearn_prequential_score{{{MODEL}, model_version=""}})',
                "{{model}} {{metric}} window={{window}}")],
              width=12, minimum=None),
        graph(layout, "Forgetting and backward transfer", "Forgetting: best earlier probe accuracy minus now "
              "(higher is worse). Backward transfer: probe accuracy now minus just after the segment.",
              [(f"avg by (model) (streamlearn_forgetting{{{MODEL}}})", "{{model}} forgetting"),
               (f"avg by (model) (streamlearn_backward_transfer{{{MODEL}}})", "{{model}} backward transfer")],
              unit="percentunit", width=12, minimum=None),
        graph(layout, "Probe accuracy by segment", "Accuracy now on the probes of recent segments "
              "(0 is the newest complete one).",
              [(f"avg by (model, segment) (streamlearn_probe_accuracy{{{MODEL}}})", "{{model}} segment {{segment}}")],
              unit="percentunit", width=12),
        graph(layout, "Drifts detected", "Detections on each model's prequential error, per interval.",
              [(f"sum by (model, detector) (increase(streamlearn_drift_detected_total{{{MODEL}}}[{RATE}]))",
                "{{model}} {{detector}}")], width=12, bars=True),
        graph(layout, "Drift policy actions", "What each model's drift policy decided and did: kind change "
              "(suspect, confirm, release_ewc, ...), new_classes (keep, consolidate) or burst (dismiss, restore), "
              "per interval.",
              [(f"sum by (model, kind, action) (increase(streamlearn_drift_actions_total{{{MODEL}}}[{RATE}]))",
                "{{model}} {{kind}} {{action}}")], width=12, bars=True),
    ]


def neural(layout: Layout) -> list:
    return [
        graph(layout, "Replay buffer size", "Examples held in each torch model's replay buffer.",
              [(f"sum by (model) (streamlearn_replay_buffer_size{{{MODEL}}})", "{{model}}")]),
        graph(layout, "Update rollbacks", "Updates undone because the loss, a gradient or the weights were "
              "not finite, per interval.",
              [(f"sum by (model) (increase(streamlearn_update_rollbacks_total{{{MODEL}}}[{RATE}]))", "{{model}}")],
              bars=True),
        graph(layout, "Triggers fired", "Snapshot, consolidation and publish triggers, by action and reason, per "
              "interval.", [(f"sum by (action, reason) (increase(streamlearn_triggers_fired_total[{RATE}]))",
                             "{{action}} {{reason}}")], bars=True),
    ]


def snapshots(layout: Layout) -> list:
    return [
        graph(layout, "Snapshot age", "Seconds since the newest durable snapshot.",
              [("time() - min(streamlearn_snapshot_last_success_timestamp_seconds)", "age")], unit="s"),
        graph(layout, "Snapshot write and stall", "Write duration (off the loop) and the loop stall it "
              "caused.", quantiles("snapshot_seconds", "") + [
                  (f"histogram_quantile(0.99, sum by (le) (rate(streamlearn_snapshot_stall_seconds_bucket"
                   f"[{RATE}])))", "stall p99")], unit="s"),
        graph(layout, "Snapshot failures", "Snapshot writes that failed, per interval (the last good one "
              "stays).", [(f"sum(increase(streamlearn_snapshot_failures_total[{RATE}]))", "failures")], bars=True),
    ]


def handoff(layout: Layout) -> list:
    return [
        graph(layout, "Production version", "The version serving should load, per model (from the registry).",
              [(f"max by (model) (streamlearn_model_version{{{MODEL}}})", "{{model}}")], minimum=None),
        graph(layout, "Gate decisions", "Candidate versions promoted or rejected by the gate, and publishing "
              "failures (registry, artifact store, event sink), per interval.",
              [(f"sum by (model, outcome) (increase(streamlearn_gate_decisions_total{{{MODEL}}}[{RATE}]))",
                "{{model}} {{outcome}}"),
               (f"sum(increase(streamlearn_publish_failures_total[{RATE}]))", "publishing failures")], bars=True),
        graph(layout, "Score by serving version", "How the predictions each serving version made fared once "
              "their labels came (inference logs' model_version; the last few versions).",
              [(f'streamlearn_prequential_score{{{MODEL}, model_version!=""}}', "{{model}} v{{model_version}} "
                "{{metric}}")], minimum=None),
    ]


def replicas(layout: Layout) -> list:
    return [
        graph(layout, "Syncs", "Parameter averages per second, by replica (equal on every replica), and how many "
              "replicas learn together.",
              [(f"sum by (replica) (rate(streamlearn_cluster_syncs_total[{RATE}]))", "replica {{replica}} syncs/s"),
               ("max(streamlearn_cluster_replicas)", "replicas")]),
        graph(layout, "Sync wait", "Time a replica waited at a sync for the others: a replica that lags (more "
              "input, a slower machine) makes the others wait.", quantiles("cluster_sync_wait_seconds", "replica"),
              unit="s"),
        graph(layout, "Average duration", "One parameter average (the collectives over torch.distributed).",
              quantiles("cluster_average_seconds", ""), unit="s"),
    ]


def language_models(layout: Layout) -> list:
    return [
        graph(layout, "Tokens learned", "Answer tokens per second a language model learns, from feedback (new) and "
              "from its replay buffer.",
              [(f"sum by (model, kind) (rate(streamlearn_lm_tokens_learned_total{{{MODEL}}}[{RATE}]))",
                "{{model}} {{kind}}")], unit="short"),
        graph(layout, "Loss and lag", "The last step's loss per answer token, and the seconds from reading a "
              "conversation to learning it (grows while the learner cannot keep up; conversations waiting too).",
              [(f"avg by (model) (streamlearn_lm_loss{{{MODEL}}})", "{{model}} loss"),
               (f"max by (model) (streamlearn_lm_lag_seconds{{{MODEL}}})", "{{model}} lag s"),
               (f"sum by (model) (streamlearn_lm_pending_examples{{{MODEL}}})", "{{model}} waiting"),
               (f"sum by (model) (streamlearn_lm_pending_tokens{{{MODEL}}})", "{{model}} tokens waiting")]),
        graph(layout, "Capabilities", "Each capability set's score at the latest evaluation, and how far it lies "
              "below its best so far (forgetting).",
              [(f"avg by (model, capability) (streamlearn_lm_capability_score{{{MODEL}}})",
                "{{model}} {{capability}}"),
               (f"avg by (model, capability) (streamlearn_lm_capability_forgetting{{{MODEL}}})",
                "{{model}} {{capability}} forgetting")], minimum=None),
    ]


SECTIONS = [("Overview", overview), ("Throughput and dead letters", throughput), ("Join and lag", joins),
            ("Latency", latency), ("Learning quality", quality), ("Neural learners", neural),
            ("Snapshots", snapshots), ("Handoff to serving", handoff), ("Replicas", replicas),
            ("Language models", language_models)]


def variables() -> list:
    source = dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    model = (dashboard.QueryVariable("model").label("Model").datasource(DATASOURCE)
             .query("label_values(streamlearn_examples_learned_total, model)")
             .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
             .multi(True).include_all(True).all_value(".*"))
    return [source, model]


def drift_annotation() -> dashboard.AnnotationQuery:
    """Marks every interval in which a drift detector fired, on all time-series panels."""
    return (dashboard.AnnotationQuery().name("Drift detected").datasource(DATASOURCE).enable(True)
            .icon_color("red").expr(f"sum by (model, detector) (increase(streamlearn_drift_detected_total"
                                    f"{{{MODEL}}}[1m])) > 0"))


def build() -> dict:
    """The dashboard as the JSON object Grafana imports."""
    layout = Layout()
    board = (dashboard.Dashboard("streamlearn").uid(UID).tags(["streamlearn"]).editable()
             .description("Throughput, joins, latency, forgetting, drift, snapshots and the handoff to serving of a "
                          "streamlearn service.")
             .time("now-6h", "now").refresh("30s").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
             .variables(variables()).annotation(drift_annotation()))
    for title, section in SECTIONS:
        board = board.with_row(dashboard.Row(title).id(layout.take_id()).grid_pos(layout.row()))
        for panel in section(layout):
            board = board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    """The dashboard as committed: sorted keys and two-space indents, so that regenerating it is a no-op."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else OUTPUT
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
