"""Ingest throughput: our parser against a plain ``json``-module parse of the same files.

For every experiment of each corpus and in the same run, repeated ``--reps`` times
(median reported, paths interleaved so drift hits them alike):

* ``gunzip``: our streaming decompression (ISA-L when ``isal`` is installed) + line
  split alone (the physical floor);
* ``json.loads``: the standard ``gzip`` module + ``json.loads`` of every line (the
  baseline, as a user would write it), and
  ``json.loads`` alone on already-decompressed lines (a stricter baseline);
* ``read_step_table``: parse + step table (fast decoder), and the generic orjson decoder;
* ``read_tables``: parse + step table + request table in one pass, against the two
  passes ``read_step_table`` + ``read_request_table`` (they differ only when the traces
  hold journey/API spans);
* ``featurize``: parse + step table + feature frame (``pipeline.featurize``; with journey
  spans also the request table, its validation and the journey reconstruction).

Three corpus shapes by default: the real step-only sample ``corpus/h100-real-steps``; a
``blis-model synth`` journey corpus (3 experiments, 300 requests each: snapshots on every
step but for one 1-in-5-sampled experiment); a ``synth/bulk.py`` journey corpus (2 × 50k
steps: every step's BATCH_SUMMARY, snapshots on 1 step in 100, journey + API spans for
every request — the shape of ``benchmarks/scale.py``). The generated ones are written to
a temporary folder (or ``--work``). Throughput is MB/s of uncompressed trace and traced
steps/s. Usage::

    python benchmarks/ingest.py [CORPUS ...] [--reps 5] [--shapes real,synth,bulk]
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
import tempfile
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


def shape_corpora(shapes: list[str], work: Path) -> list[tuple[str, str]]:
    """(label, corpus path) of the default shapes, generating the journey corpora."""
    out = []
    for shape in shapes:
        if shape == "real":
            out.append(("real step-only traces (`corpus/h100-real-steps`)", str(DEFAULT_CORPUS)))
        elif shape == "synth":
            from blis_model.synth import demo_configs, write_corpus

            path = work / "synth"
            if not path.exists():
                write_corpus(str(path), demo_configs(seed=0, num_requests=300))
            out.append(("`blis-model synth OUT --experiments 3` journey corpus", str(path)))
        elif shape == "bulk":
            from blis_model.synth.bulk import write_bulk_corpus

            path = work / "bulk"
            if not path.exists():
                write_bulk_corpus(str(path), 2, 50_000, processes=1)
            out.append(("`synth/bulk.py` journey corpus (2 × 50k steps, as `scale.py`)",
                        str(path)))
        else:
            raise SystemExit(f"unknown shape {shape!r} (real, synth, bulk)")
    return out


def bench(label: str, corpus: str, reps: int) -> dict[str, float]:
    """Print one corpus's table; returns the ratios of featurize to the two baselines."""
    experiments = [e for e in load_experiments(corpus) if e.trace_url]
    size = steps = 0
    lines: dict[str, list[bytes]] = {}
    for exp in experiments:
        stats = LineStats()
        with _open(exp) as fh:
            lines[exp.name] = [line for _, line in iter_lines(fh, exp.name, [], stats)]
        size += stats.bytes
        steps += read_step_table(exp)[0].num_rows
    print(f"\n{label}: {corpus}, {len(experiments)} experiments, {size / 1e6:.1f} MB "
          f"uncompressed, {steps:,} traced steps; median of {reps} runs; "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs\n")

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
    for _ in range(reps):  # interleaved, so drift hits every path alike
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
    sys.stdout.flush()
    return {"vs_json": baseline / ours, "vs_json_alone": strict / ours}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", nargs="*", help="corpora (default: the --shapes)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", default="real,synth,bulk",
                        help="comma-separated default corpora: real, synth, bulk")
    parser.add_argument("--work", default=None,
                        help="folder for the generated corpora (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="blis-ingest-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpora = ([(c, c) for c in args.corpus] if args.corpus
                   else shape_corpora(args.shapes.split(","), work))
        ratios = {label: bench(label, corpus, args.reps) for label, corpus in corpora}
    print("\nfeaturize vs json.loads (gunzip + json / already decompressed):")
    for label, r in ratios.items():
        print(f"- {label}: {r['vs_json']:.2f}x / {r['vs_json_alone']:.2f}x")


if __name__ == "__main__":
    main()
