"""Reads a report's inputs (the history file, the summary JSON) and turns every problem into one `ReportError` line.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "summary.json"
>>> _ = path.write_text('{"learned": 3, "models": {"m": {"task": "classification", "learned": 3,'
...                     ' "scores": {"accuracy": NaN}}}}')
>>> summary = load_summary(path)
>>> summary.models["m"].learned, summary.models["m"].scores
(3, {'accuracy': nan})
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import msgspec

from streamlearn.telemetry.history import History, read_history_file

HISTORY_FILE = "history.jsonl"


class ReportError(Exception):
    """An input the report cannot use; its message is one line for the user."""


class ModelSummary(msgspec.Struct):
    """One model's part of the service's summary (`Learner.summary()`); fields it lacks keep their defaults."""

    task: str = ""
    learned: int = 0
    errors: int = 0
    scores: dict[str, Optional[float]] = {}
    held_out: Optional[int] = None
    forgetting: Optional[float] = None
    backward_transfer: Optional[float] = None


class RunSummary(msgspec.Struct):
    """The parts of `Service.summary()` the report shows; unknown keys are ignored, so newer summaries still load."""

    models: dict[str, ModelSummary]
    learned: int = 0
    elapsed_seconds: float = 0.0
    examples_per_second: float = 0.0
    dead_letters: dict[str, int] = {}


def check_state_dir(state_dir: Path) -> Path:
    """`state_dir` itself, or a `ReportError` if it is not a folder."""
    if not state_dir.exists():
        raise ReportError(f"no state folder {state_dir}")
    if not state_dir.is_dir():
        raise ReportError(f"{state_dir} is not a folder (--state takes the service's state_dir)")
    return state_dir


def load_history(path: Path) -> History:
    """The lines of `path` (and its rotated part), newest per model and position; none if the file is missing."""
    if not path.exists():
        return History([], [])
    try:
        return read_history_file(path)
    except OSError as err:   # a folder in its place, no permission: say which file and why
        raise ReportError(f"cannot read {path}: {err.strerror or err}") from None


def load_summary(path: Path) -> RunSummary:
    """The summary JSON the `run` command wrote, or a `ReportError` saying what is wrong with it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"no summary file {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read summary {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        # the stdlib parser, not msgspec: `run` writes with json.dumps, which spells a NaN score as NaN
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"summary {path} is not JSON (line {err.lineno}: {err.msg})") from None
    try:
        return msgspec.convert(data, RunSummary)
    except msgspec.ValidationError as err:
        raise ReportError(f"summary {path} is not a service summary ({err})") from None
