"""The `streamlearn` command line: `run` the service, or play the embedded `demo`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from streamlearn.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Keeps production ML models current from their own feedback.")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python narrates every connection at INFO


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config file (env STREAMLEARN_* overrides)."),
    summary: Optional[Path] = typer.Option(None, help="Where to write the summary JSON (default: STATE_DIR/summary.json)."),
) -> None:
    """Run the service until the source ends (file) or SIGTERM/SIGINT (Kafka)."""
    from streamlearn.service import Service

    try:
        cfg = load_config(config)
        service = Service(cfg)
        metrics = service.start_metrics()
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)
    _setup_logging(cfg.log_level)
    if metrics is not None:
        logging.getLogger("streamlearn").info("metrics on http://%s:%d/metrics", cfg.metrics.host, metrics.port)
    try:
        result = service.run()
    finally:
        service.close()
    path = summary or Path(cfg.state_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"learned {result['learned']} examples; summary in {path}", err=True)


@app.command()
def demo(
    events: int = typer.Option(20_000, help="Inference requests to simulate."),
    metrics_port: int = typer.Option(9108, help="Port of /metrics, /healthz, /readyz (0 = any free port)."),
    seed: int = typer.Option(42, help="Seed of the simulated traffic and the model."),
    rate: float = typer.Option(2_000.0, help="Requests per second to play (0 = as fast as possible)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON only."),
    record: Optional[Path] = typer.Option(None, help="Also write the traffic to this JSONL file (for the file source)."),
) -> None:
    """Start an embedded Kafka-compatible broker, play drifting traffic through the service, summarize."""
    from streamlearn.demo.run import DemoOptions, print_summary, run_demo

    _setup_logging("warning")
    options = DemoOptions(requests=events, metrics_port=metrics_port, seed=seed, rate=rate, record=record,
                          progress=not as_json)
    try:
        result = run_demo(options)
    except ConfigError as err:
        typer.echo(str(err).replace("metrics.port", "--metrics-port"), err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_summary(result)
