"""Read one experiment's trace object into its step table (and its request table), streaming."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from blis_model.configuration.experiment import Experiment
from blis_model.ingest.blocks import SEQ_SHIFT, scan_block
from blis_model.ingest.otlp import API_SCOPE, JOURNEY_SCOPE, LineStats, Problem, iter_lines
from blis_model.ingest.requests import REQUEST_EVENTS, RequestTableBuilder
from blis_model.ingest.scan import scan_with_events
from blis_model.ingest.steps import STEP_EVENTS, STEP_SCHEMA, StepTableBuilder
from blis_model.storage import filesystem

OPEN_BLOCK_SIZE = 8 << 20  # fsspec read-ahead, bytes
REQUEST_SCOPES = (JOURNEY_SCOPE, API_SCOPE)


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


BLOCK_BYTES = 4 << 20  # lines decoded together by the block decoder (a longer line: alone)


def _line_blocks(raw, label: str, stats: LineStats
                 ) -> Iterator[tuple[list[tuple[int, bytes]], list[Problem]]]:
    """Consecutive lines in blocks of about :data:`BLOCK_BYTES`, each with the problems
    reading them raised (a truncated or corrupt gzip stream: with the block it ends)."""
    problems: list[Problem] = []
    block: list[tuple[int, bytes]] = []
    size = 0
    for lineno, line in iter_lines(raw, label, problems, stats):
        block.append((lineno, line))
        size += len(line)
        if size >= BLOCK_BYTES:
            yield block, problems[:]
            problems.clear()
            block, size = [], 0
    if block or problems:
        yield block, problems


def stream_tables(raw, label: str, builder: StepTableBuilder, report: IngestReport,
                  requests: RequestTableBuilder | None = None, fast: bool = True) -> None:
    """Stream the lines of the open trace file ``raw`` into ``builder`` and, when given,
    their journey and API events into ``requests``: each line is decoded once for both
    (``fast``: in blocks by ``ingest.blocks``, request events as columns; else line by
    line by the generic decoder). Malformed lines and truncated compression go to
    ``report.problems`` (``label`` names the file), once, in line order."""
    scopes = REQUEST_SCOPES if requests is not None else ()
    stats = LineStats()
    if not fast:
        for lineno, line in iter_lines(raw, label, report.problems, stats):
            try:
                columns, events = scan_with_events(line, STEP_EVENTS, scopes, fast=False)
            except ValueError as exc:
                report.problems.append(Problem(label, lineno, str(exc)))
                report.lines_malformed += 1
                continue
            for cols in columns:
                builder.add_columns(cols)
            if events:
                base = lineno << SEQ_SHIFT
                for i, event in enumerate(events):
                    requests.add(event, base | i)  # type: ignore[union-attr]
    else:
        wanted = STEP_EVENTS + (REQUEST_EVENTS if requests is not None else ())
        for lines, read_problems in _line_blocks(raw, label, stats):
            scanned = scan_block(lines, wanted, scopes)
            found = [(p.line, 0, p) for p in read_problems] + [
                (lineno, 1, Problem(label, lineno, reason))
                for lineno, reason in scanned.problems]
            for _, _, problem in sorted(found, key=lambda item: item[:2]):
                report.problems.append(problem)
            report.lines_malformed += len(scanned.problems)
            for w, chunks in zip(wanted, scanned.columns, strict=True):
                for cols in chunks:
                    if w.scope in scopes:
                        requests.add_columns(cols)  # type: ignore[union-attr]
                    else:
                        builder.add_columns(cols)
            for seq, event in scanned.events:
                requests.add(event, seq)  # type: ignore[union-attr]
    report.lines_read += stats.lines
    report.bytes_uncompressed += stats.bytes


def read_tables(experiment: Experiment, options: dict | None = None, *, fast: bool = True
                ) -> tuple[pa.Table, IngestReport, pa.Table]:
    """Stream ``experiment``'s traces once into its step table and its request table:
    ``(steps, report, requests)``, each table as :func:`read_step_table` and
    ``requests.read_request_table`` give it. ``report.problems`` lists every malformed
    line once (it concerns both tables)."""
    requests = RequestTableBuilder(experiment.name)
    steps, report = _read(experiment, options, requests, fast)
    return steps, report, requests.table()


def read_step_table(experiment: Experiment, options: dict | None = None, *, fast: bool = True
                    ) -> tuple[pa.Table, IngestReport]:
    """Stream ``experiment``'s traces into a step table (see ``ingest.steps``).

    Malformed lines and truncated compression are reported, never raised. An experiment
    without a trace file yields an empty table and a problem. ``fast=False`` decodes
    every line with the generic (orjson) decoder; the table is the same.
    """
    return _read(experiment, options, None, fast)


def _read(experiment: Experiment, options: dict | None, requests: RequestTableBuilder | None,
          fast: bool) -> tuple[pa.Table, IngestReport]:
    report = IngestReport(experiment.name)
    if experiment.trace_url is None:
        report.problems.append(Problem(f"{experiment.name}/traces.json", 0, "no trace file"))
        return STEP_SCHEMA.empty_table(), report
    builder = StepTableBuilder(experiment.name, block_size=experiment.server.block_size)
    fs, path = filesystem(experiment.trace_url, options)
    label = f"{experiment.name}/{path.rsplit('/', 1)[-1]}"
    with fs.open(path, "rb", block_size=OPEN_BLOCK_SIZE) as raw:
        stream_tables(raw, label, builder, report, requests, fast=fast)
        report.bytes_read = int(raw.tell()) if hasattr(raw, "tell") else 0
    table, counts = builder.table()
    report.counts = counts
    return table, report
