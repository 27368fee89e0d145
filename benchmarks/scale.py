"""Scale benchmark: generate a bulk corpus, calibrate it through shards on Ray with 1 and
with 2 workers, then add one experiment and recalibrate incrementally.

Reports wall time, steps/s, peak RSS per Ray worker and for the driver, the corpus size
(gzip and uncompressed), ingest MB/s of one worker against a plain ``json.loads`` parse
of the same objects in the same run (and the gunzip floor), and the incremental time
ratio. Each flow runs in its own subprocess (a clean driver RSS and a fresh local Ray
with ``--workers`` CPUs; Prefect's temporary server is started by that subprocess
unless ``PREFECT_API_URL`` is set). With ``--s3`` the corpus and the store live in a real
S3-compatible server on this machine (SeaweedFS, ``deploy/s3_local.py``)::

    python benchmarks/scale.py --experiments 8 --steps-per-experiment 20000 --s3
    python benchmarks/scale.py --experiments 100 --steps-per-experiment 100000 --s3
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------ one flow (subprocess)


def run_flow(corpus: str, store: str, workers: int, family: str = "picf") -> dict[str, Any]:
    """Run the scale flow in this process; its wall time, manifest numbers, driver RSS."""
    from blis_model.releases.read import read_manifest
    from flows.calibrate_at_scale import run_at_scale

    start = time.perf_counter()
    url = run_at_scale(corpus, store, num_cpus=workers, family=family)
    wall = time.perf_counter() - start
    manifest = read_manifest(url)
    scale = manifest["metrics"]["scale"]
    return {"url": url, "wall_s": wall, "workers": workers, "family": manifest["family"],
            "fit": scale.get("fit", ""),
            "steps": scale["total_steps"], "experiments": manifest["corpus"]["experiments"],
            "featurized": scale["experiments_featurized"], "reused": scale["experiments_reused"],
            "worker_peak_rss_mb": scale["worker_peak_rss_mb"], "driver_peak_rss_mb": _rss_mb(),
            "summary": manifest["metrics"]["summary"]}


def flow_in_subprocess(corpus: str, store: str, workers: int, env: dict[str, str],
                       family: str = "picf") -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--run-flow", corpus, store, str(workers),
                           family],
                          env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"flow run failed ({proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---------------------------------------------------------------------------- ingest


def ingest_rates(corpus: str, names: list[str]) -> dict[str, float]:
    """MB/s (uncompressed) of one process over the objects of ``names``: gunzip floor,
    plain json.loads of every line, read_step_table, pipeline.featurize."""
    from blis_model.calibration.featurize import featurize
    from blis_model.configuration.experiment import load_experiment
    from blis_model.ingest.otlp import LineStats, iter_lines
    from blis_model.ingest.reader import read_step_table
    from blis_model.storage import filesystem

    experiments = [load_experiment(corpus, n) for n in names]
    size = 0

    def floor() -> None:
        nonlocal size
        stats = LineStats()
        for e in experiments:
            fs, path = filesystem(e.trace_url)
            with fs.open(path, "rb", block_size=8 << 20) as fh:
                for _ in iter_lines(fh, e.name, [], stats):
                    pass
        size = stats.bytes

    def plain_json() -> None:
        for e in experiments:
            fs, path = filesystem(e.trace_url)
            with fs.open(path, "rb", block_size=8 << 20) as raw, gzip.open(raw) as fh:
                for line in fh:
                    if line.strip():
                        json.loads(line)

    paths = {"gunzip + split lines (floor)": floor, "json.loads (gunzip + json)": plain_json,
             "read_step_table": lambda: [read_step_table(e) for e in experiments],
             "featurize (+ journeys, reconstruction, features)":
                 lambda: [featurize(e) for e in experiments]}
    out = {}
    for name, fn in paths.items():
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start
    return {name: size / 1e6 / t for name, t in out.items()} | {"MB": size / 1e6}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--steps-per-experiment", type=int, default=20_000)
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--s3", action="store_true", help="corpus and store in a local S3")
    parser.add_argument("--out", default=None, help="working folder (default: a temp dir)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="processes writing the corpus")
    parser.add_argument("--ingest-experiments", type=int, default=2)
    parser.add_argument("--family", default="picf",
                        help="family the flow calibrates (picf: exact statistics; others "
                             "and auto: fit on a bounded sample)")
    parser.add_argument("--run-flow", nargs=4, metavar=("CORPUS", "STORE", "WORKERS", "FAMILY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_flow:
        corpus, store, workers, family = args.run_flow
        print("RESULT " + json.dumps(run_flow(corpus, store, int(workers), family)), flush=True)
        return

    from blis_model.synth.bulk import corpus_size, write_bulk_corpus

    out = Path(args.out or tempfile.mkdtemp(prefix="blis-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    server = None
    if args.s3:
        from deploy.s3_local import start_s3_server

        server = start_s3_server(out / "s3")
        env = server.env
        os.environ.update(env)
        base = f"s3://{server.make_bucket('scale')}"
    else:
        base = str(out)
    corpus = f"{base}/corpus"
    report: dict[str, Any] = {"command": " ".join(sys.argv), "cpus": os.cpu_count(),
                              "family": args.family}
    try:
        start = time.perf_counter()
        written = write_bulk_corpus(corpus, args.experiments, args.steps_per_experiment,
                                    processes=args.processes)
        report["generate_s"] = time.perf_counter() - start
        report["corpus"] = corpus_size(written)
        log(f"corpus {corpus}: {report['corpus']} written in {report['generate_s']:.0f} s")

        names = [w.name for w in written[:args.ingest_experiments]]
        report["ingest_mb_s"] = ingest_rates(corpus, names)
        log(f"ingest (one process, {len(names)} experiment(s)): {report['ingest_mb_s']}")

        runs = []
        for workers in [int(w) for w in args.workers.split(",")]:
            run = flow_in_subprocess(corpus, f"{base}/store-w{workers}", workers, env,
                                     args.family)
            runs.append(run)
            log(f"{workers} worker(s): {run['wall_s']:.1f} s, {run['steps'] / run['wall_s']:,.0f} "
                f"steps/s; worker peak RSS {max(run['worker_peak_rss_mb'].values()):.0f} MB, "
                f"driver {run['driver_peak_rss_mb']:.0f} MB")
        report["runs"] = runs

        last = runs[-1]
        write_bulk_corpus(corpus, 1, args.steps_per_experiment, first=args.experiments)
        inc = flow_in_subprocess(corpus, f"{base}/store-w{last['workers']}", last["workers"],
                                 env, args.family)
        report["incremental"] = inc | {"ratio": inc["wall_s"] / last["wall_s"]}
        log(f"incremental (+1 experiment): {inc['wall_s']:.1f} s, featurized {inc['featurized']},"
            f" reused {inc['reused']}; {inc['wall_s'] / last['wall_s']:.2f}x the full run")
    finally:
        if server is not None:
            server.stop()
    (out / "scale-report.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def markdown(r: dict[str, Any]) -> str:
    c = r["corpus"]
    lines = [f"`{r['command']}` ({r['cpus']} CPUs)", "",
             f"corpus: {c['experiments']} experiments, {c['steps']:,} steps, "
             f"{c['requests']:,} requests; {c['bytes_compressed'] / 1e6:,.0f} MB gzip, "
             f"{c['bytes_uncompressed'] / 1e6:,.0f} MB uncompressed; generated in "
             f"{r['generate_s']:.0f} s", "",
             f"family {r['runs'][0]['family']}: {r['runs'][0]['fit']}", "",
             "| workers | wall s | steps/s | peak RSS per worker MB | driver peak RSS MB |",
             "|---:|---:|---:|---:|---:|"]
    for run in r["runs"]:
        peaks = sorted(run["worker_peak_rss_mb"].values())
        lines.append(f"| {run['workers']} | {run['wall_s']:.1f} | "
                     f"{run['steps'] / run['wall_s']:,.0f} | {max(peaks):.0f} "
                     f"(of {len(peaks)} processes) | {run['driver_peak_rss_mb']:.0f} |")
    if len(r["runs"]) > 1:
        lines.append(f"\nspeed-up {r['runs'][0]['workers']} → {r['runs'][-1]['workers']} "
                     f"workers: {r['runs'][0]['wall_s'] / r['runs'][-1]['wall_s']:.2f}x")
    inc = r["incremental"]
    lines.append(f"\nincremental (+1 experiment): {inc['wall_s']:.1f} s, {inc['featurized']} "
                 f"featurized, {inc['reused']} reused: {inc['ratio']:.2f}x the full run's time")
    ing = r["ingest_mb_s"]
    lines += ["", f"ingest, one process ({ing['MB']:.0f} MB uncompressed):", "",
              "| path | MB/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in ing.items() if k != "MB"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
