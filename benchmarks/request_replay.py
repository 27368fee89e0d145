"""Fitting step-time coefficients from REAL client-side request measurements, by replay.

Reads the ten real vLLM experiments of ``../shared/corpus/vllm-h100-requests`` in place
(not ours to redistribute: never copied into the repository; ``--corpus`` points
elsewhere) and prints markdown tables:

* accuracy per experiment — TTFT / ITL / E2E MAPE % of the replayed requests against the
  measured ones: leave one experiment out (fit on the others), leave one MODEL out (its
  configuration never seen: the global law), in-sample, an oracle (fit on the experiment
  itself: the floor) and BLIS's shipped trained-physics coefficients (iter29) through the
  same replay;
* the overloaded experiments: completed requests and TTFT percentiles, replayed vs real;
* speed: the whole fit (every experiment replayed each round) and one replay of the
  largest workload, in simulated steps per second.

Run: ``.venv/bin/python benchmarks/request_replay.py [--corpus DIR] [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from blis_model.calibration.featurize import experiment_names
from blis_model.configuration.defaults import BLIS_SHIPPED_ALPHAS, BLIS_SHIPPED_BETAS
from blis_model.requests.latency import LATENCIES, latency_table, run_replay
from blis_model.requests.measured import MeasuredExperiment, load_measured
from blis_model.requests.replay_fit import (
    ReplayFitSettings,
    fit_from_requests,
    replay_all,
)
from blis_model.requests.step_time import compile_blis

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "corpus" / "vllm-h100-requests"


def load(corpus: Path) -> list[MeasuredExperiment]:
    return [load_measured(str(corpus), n) for n in experiment_names(str(corpus))]


def short(name: str) -> str:
    return name.split("-", 2)[-1]


def mapes(table: dict) -> list[str]:
    return [f"{table['accuracy'][m]['mape']:.1f}" if table else "–" for m in LATENCIES]


def blis_shipped(item: MeasuredExperiment) -> dict:
    step = compile_blis(item.experiment, BLIS_SHIPPED_BETAS, item.limits.max_num_batched_tokens)
    return latency_table(item, run_replay(item, lambda a: max(step(a), 1.0),
                                          BLIS_SHIPPED_ALPHAS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT)
    parser.add_argument("--quick", action="store_true", help="in-sample, LOO and speed only")
    args = parser.parse_args()
    if not args.corpus.is_dir():
        print(f"no request-measurement corpus at {args.corpus} (the shared real data is "
              "read in place and not redistributed): nothing to measure")
        return 0
    items = load(args.corpus)
    train = [i for i in items if not i.overloaded]
    settings = ReplayFitSettings()

    t0 = time.perf_counter()
    fit = fit_from_requests(train, settings)
    full = {i.name: latency_table(i, r) for i, r in zip(items, replay_all(items, fit.law),
                                                        strict=True)}
    fit_s = time.perf_counter() - t0
    rounds = len(fit.iterations) - 1

    loo, lomo, oracle, blis = {}, {}, {}, {}
    for held in train:
        others = [i for i in train if i.name != held.name]
        fold = fit_from_requests(others, settings, start=fit.law)
        loo[held.name] = latency_table(held, replay_all(
            [held], fold.law.with_config(held.config_key))[0])
    if not args.quick:
        for key in sorted({i.config_key for i in train}):
            others = [i for i in train if i.config_key != key]
            fold = fit_from_requests(others, settings, start=fit.law)
            for held in (i for i in train if i.config_key == key):
                lomo[held.name] = latency_table(held, replay_all(
                    [held], fold.law.with_config(key))[0])
        for held in train:
            own = fit_from_requests([held], settings, start=fit.law)
            oracle[held.name] = latency_table(held, replay_all([held], own.law)[0])
        blis = {i.name: blis_shipped(i) for i in items}

    print(f"### Request measurements by replay ({len(items)} real vLLM experiments on H100, "
          f"{sum(len(i.workload) for i in items):,} requests)\n")
    print("MAPE % of TTFT / ITL / E2E, replayed vs measured, per experiment that is not "
          "overloaded:\n")
    header = ["experiment", "LOO", "leave-one-model-out", "in-sample", "oracle (floor)",
              "BLIS iter29"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for i in train:
        cells = [" / ".join(mapes(t.get(i.name, {}))) for t in (loo, lomo, full, oracle, blis)]
        print(f"| {short(i.name)} | " + " | ".join(cells) + " |")
    means = []
    for t in (loo, lomo, full, oracle, blis):
        rows = [t[i.name] for i in train if i.name in t]
        means.append(" / ".join(f"{np.mean([r['accuracy'][m]['mape'] for r in rows]):.1f}"
                                if rows else "–" for m in LATENCIES))
    print("| **mean** | " + " | ".join(f"**{m}**" for m in means) + " |\n")

    print("Overloaded experiments (the queue never drained): completed requests and TTFT "
          "percentiles (s), replayed with the fitted law vs measured:\n")
    print("| experiment | completed replayed / measured | TTFT p50 | TTFT p90 | TTFT p99 |")
    print("|---|---|---|---|---|")
    for i in (i for i in items if i.overloaded):
        d = full[i.name]["distribution_ms"]["ttft"]
        cells = [f"{(d[f'simulated_{k}'] or 0) / 1e3:.1f} / {(d[f'measured_{k}'] or 0) / 1e3:.1f}"
                 for k in ("p50", "p90", "p99")]
        print(f"| {short(i.name)} | {full[i.name]['completed_simulated']} / "
              f"{full[i.name]['completed_measured']} | " + " | ".join(cells) + " |")
    largest = max(items, key=lambda i: len(i.workload))
    rep = replay_all([largest], fit.law)[0]
    print(f"\nSpeed: the fit ({rounds} rounds of replaying {len(train)} experiments, "
          f"{sum(len(i.workload) for i in train):,} requests) and the in-sample replay of all "
          f"{len(items)}: **{fit_s:.0f} s**; one replay of {short(largest.name)} "
          f"({len(largest.workload):,} requests, {rep.steps:,} steps): {rep.seconds:.2f} s = "
          f"{rep.steps / rep.seconds:,.0f} simulated steps/s (BLIS's Go replay of it: "
          "108–160 s on this machine).")
    print(f"\nFit: {fit.stopped}; objective per round: "
          + " → ".join(f"{it.objective:.2f}" for it in fit.iterations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
