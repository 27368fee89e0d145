"""Read one experiment's trace object into its step table, streaming."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from blis_model.experiment import Experiment
from blis_model.ingest.otlp import Problem, iter_events
from blis_model.ingest.steps import STEP_SCHEMA, StepTableBuilder
from blis_model.storage import filesystem


@dataclass
class IngestReport:
    """What ingestion of one experiment saw: counts and the problems it skipped."""

    experiment: str
    bytes_read: int = 0
    lines_malformed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self, max_problems: int = 20) -> dict:
        return {"experiment": self.experiment, "bytes_read": self.bytes_read,
                "lines_malformed": self.lines_malformed, **self.counts,
                "problems": [str(p) for p in self.problems[:max_problems]]}


def read_step_table(experiment: Experiment, options: dict | None = None
                    ) -> tuple[pa.Table, IngestReport]:
    """Stream ``experiment``'s traces into a step table (see ``ingest.steps``).

    Malformed lines and truncated compression are reported, never raised. An experiment
    without a trace file yields an empty table and a problem.
    """
    report = IngestReport(experiment.name)
    builder = StepTableBuilder(experiment.name, block_size=experiment.server.block_size)
    if experiment.trace_url is None:
        report.problems.append(Problem(f"{experiment.name}/traces.json", 0, "no trace file"))
        return STEP_SCHEMA.empty_table(), report
    fs, path = filesystem(experiment.trace_url, options)
    label = f"{experiment.name}/{path.rsplit('/', 1)[-1]}"
    with fs.open(path, "rb", block_size=8 << 20) as raw:
        builder.add_all(iter_events(raw, label, report.problems))
        report.bytes_read = int(raw.tell()) if hasattr(raw, "tell") else 0
    table, counts = builder.table()
    report.counts = counts
    report.lines_malformed = sum(1 for p in report.problems if "malformed" in p.reason)
    return table, report
