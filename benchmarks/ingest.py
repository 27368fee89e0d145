"""Ingest throughput: our parser against a plain ``json``-module parse of the same files.

For every experiment of a corpus (default: the real sample ``corpus/h100-real-steps``)
and in the same run, repeated ``--reps`` times (median reported):

* ``gunzip``: streaming decompression + line split alone (the physical floor);
* ``json.loads``: gunzip + ``json.loads`` of every line (the baseline), and
  ``json.loads`` alone on already-decompressed lines (a stricter baseline);
* ``read_step_table``: parse + step table (fast decoder), and the generic orjson decoder;
* ``read_tables``: parse + step table + request table in one pass, against the two
  passes ``read_step_table`` + ``read_request_table`` (they differ only when the traces
  hold journey/API spans, e.g. a ``blis-model synth`` corpus);
* ``featurize``: parse + step table + feature frame (``pipeline.featurize``; with journey
  spans also the request table, its validation and the journey reconstruction).

Throughput is MB/s of uncompressed trace and traced steps/s. Usage::

    python benchmarks/ingest.py [CORPUS] [--reps 7]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from blis_model.calibration.featurize import featurize, load_experiments
from blis_model.configuration.experiment import Experiment
from blis_model.ingest.otlp import LineStats, iter_lines
from blis_model.ingest.reader import read_step_table, read_tables
from blis_model.ingest.requests import read_request_table

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"


def _open(exp: Experiment):
    return open(exp.trace_url.removeprefix("file://"), "rb")  # noqa: SIM115


def gunzip(exp: Experiment) -> None:
    with _open(exp) as fh:
        for _ in iter_lines(fh, exp.trace_url, []):
            pass


def json_baseline(exp: Experiment) -> None:
    with gzip.open(exp.trace_url.removeprefix("file://")) as fh:
        for line in fh:
            if line.strip():
                json.loads(line)


def json_only(chunks: list[list[bytes]]) -> None:
    for lines in chunks:
        for line in lines:
            json.loads(line)


def measure(fn: Callable[[], object], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", nargs="?", default=str(DEFAULT_CORPUS))
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    experiments = [e for e in load_experiments(args.corpus) if e.trace_url]
    size = steps = 0
    lines: dict[str, list[bytes]] = {}
    for exp in experiments:
        stats = LineStats()
        with _open(exp) as fh:
            lines[exp.name] = [line for _, line in iter_lines(fh, exp.name, [], stats)]
        size += stats.bytes
        steps += read_step_table(exp)[0].num_rows
    print(f"corpus {args.corpus}: {len(experiments)} experiments, "
          f"{size / 1e6:.1f} MB uncompressed, {steps} steps; median of {args.reps} runs; "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
          file=sys.stderr)

    def each(fn: Callable[[Experiment], object]) -> Callable[[], None]:
        def run() -> None:
            for exp in experiments:
                fn(exp)  # results dropped at once, as a streaming consumer would
        return run

    paths = {
        "gunzip + split lines (floor)": each(gunzip),
        "json.loads every line (gunzip + json)": each(json_baseline),
        "json.loads every line (already decompressed)": lambda: json_only(list(lines.values())),
        "read_step_table, generic orjson decoder": each(lambda e: read_step_table(e, fast=False)),
        "read_step_table (parse + step table)": each(read_step_table),
        "read_step_table + read_request_table (two passes)": each(
            lambda e: (read_step_table(e), read_request_table(e))),
        "read_tables (steps + requests, one pass)": each(read_tables),
        "featurize (parse + step table + features)": each(featurize),
    }
    for fn in paths.values():  # warm-up (imports, regex compilation, caches)
        fn()
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):  # interleaved, so drift hits every path alike
        for name, fn in paths.items():
            runs[name] += measure(fn, 1)
    median = {name: statistics.median(t) for name, t in runs.items()}
    baseline = median["json.loads every line (gunzip + json)"]
    strict = median["json.loads every line (already decompressed)"]
    print("| path | median ms (best) | MB/s | steps/s | vs json (gunzip + json) "
          "| vs json.loads alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in median.items():
        print(f"| {name} | {t * 1e3:.1f} ({min(runs[name]) * 1e3:.1f}) | {size / 1e6 / t:.0f} "
              f"| {steps / t:,.0f} | {baseline / t:.2f}x | {strict / t:.2f}x |")
    floor = median["gunzip + split lines (floor)"]
    ours = median["featurize (parse + step table + features)"]
    print(f"\nparse + featurize runs at {floor / ours:.0%} of the gunzip floor's speed "
          f"({ours / floor:.1f}x its time).")


if __name__ == "__main__":
    main()
