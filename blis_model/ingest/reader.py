"""Read one experiment's trace object into its step table, streaming."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from blis_model.experiment import Experiment
from blis_model.ingest.otlp import LineStats, Problem, iter_lines
from blis_model.ingest.scan import scan_line
from blis_model.ingest.steps import STEP_EVENTS, STEP_SCHEMA, StepTableBuilder
from blis_model.storage import filesystem

OPEN_BLOCK_SIZE = 8 << 20  # fsspec read-ahead, bytes


@dataclass
class IngestReport:
    """What ingestion of one experiment saw: counts and the problems it skipped."""

    experiment: str
    bytes_read: int = 0  # bytes of the trace object as stored (compressed if gzip)
    bytes_uncompressed: int = 0
    lines_read: int = 0
    lines_malformed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self, max_problems: int = 20) -> dict:
        return {"experiment": self.experiment, "bytes_read": self.bytes_read,
                "bytes_uncompressed": self.bytes_uncompressed, "lines_read": self.lines_read,
                "lines_malformed": self.lines_malformed, **self.counts,
                "problems": [str(p) for p in self.problems[:max_problems]]}


def build_step_table(raw, label: str, builder: StepTableBuilder, report: IngestReport,
                     fast: bool = True) -> None:
    """Stream the lines of the open trace file ``raw`` into ``builder``. Malformed lines
    and truncated compression go to ``report.problems`` (``label`` names the file)."""
    stats = LineStats()
    for lineno, line in iter_lines(raw, label, report.problems, stats):
        try:
            columns = scan_line(line, STEP_EVENTS, fast=fast)
        except ValueError as exc:
            report.problems.append(Problem(label, lineno, str(exc)))
            report.lines_malformed += 1
            continue
        for cols in columns:
            builder.add_columns(cols)
    report.lines_read += stats.lines
    report.bytes_uncompressed += stats.bytes


def read_step_table(experiment: Experiment, options: dict | None = None, *, fast: bool = True
                    ) -> tuple[pa.Table, IngestReport]:
    """Stream ``experiment``'s traces into a step table (see ``ingest.steps``).

    Malformed lines and truncated compression are reported, never raised. An experiment
    without a trace file yields an empty table and a problem. ``fast=False`` decodes
    every line with the generic (orjson) decoder; the table is the same.
    """
    report = IngestReport(experiment.name)
    builder = StepTableBuilder(experiment.name, block_size=experiment.server.block_size)
    if experiment.trace_url is None:
        report.problems.append(Problem(f"{experiment.name}/traces.json", 0, "no trace file"))
        return STEP_SCHEMA.empty_table(), report
    fs, path = filesystem(experiment.trace_url, options)
    label = f"{experiment.name}/{path.rsplit('/', 1)[-1]}"
    with fs.open(path, "rb", block_size=OPEN_BLOCK_SIZE) as raw:
        build_step_table(raw, label, builder, report, fast=fast)
        report.bytes_read = int(raw.tell()) if hasattr(raw, "tell") else 0
    table, counts = builder.table()
    report.counts = counts
    return table, report
