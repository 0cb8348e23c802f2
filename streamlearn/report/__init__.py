"""`streamlearn report`: a state folder's history drawn as PNGs and one self-contained HTML page.

The service appends one `HistoryRecord` per model and evaluation to
`STATE_DIR/history.jsonl` (see `streamlearn.telemetry.history`). This package
reads that file (and, optionally, the run's summary JSON) and draws:

- `scores.png`: rolling and cumulative prequential scores, with drift markers;
- `probes.png`: probe accuracy per segment, forgetting and backward transfer;
- `latency.png`: the latency quantiles the records carry;
- `report.html`: the three figures embedded, and a table of final figures.

Modules: `inputs` (reading and checking the files), `series` (records grouped
into lines per model), `plots` (one function per figure), `page` (the HTML),
`build` (all of it, for the CLI).
"""

from streamlearn.report.build import Report, build_report
from streamlearn.report.inputs import ReportError

__all__ = ["Report", "ReportError", "build_report"]
