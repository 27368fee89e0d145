"""Step-time accuracy on a corpus (default: the real sample ``corpus/h100-real-steps``).

Two protocols, MAPE and median APE (%) per experiment:

* leave-one-experiment-out: fit on the other experiments (the held-out configuration is
  never seen), predict every step of the held-out one;
* temporal holdout: fit on the first 70% of every experiment's steps (by step id),
  predict the last 30%.

Three predictors:

* ``PICF``: ``blis_model.models.picf.PICF`` with its defaults (global + per-configuration);
* ``BLIS NNLS``: one global non-negative fit of BLIS's 11 ``blis_*`` basis columns on
  relative error (``models.solvers``, no prior, no ridge): what BLIS could load today;
* ``BLIS iter29``: BLIS's shipped default betas, no fit (reference).

Usage::

    python benchmarks/accuracy.py [CORPUS]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from blis_model.calibration.featurize import featurize, load_experiments, training_frame
from blis_model.configuration.defaults import BLIS_SHIPPED_BETAS
from blis_model.features.blis_parity import BETA_NAMES, blis_step_time
from blis_model.features.frame import BLIS_COLUMNS, loo_split, temporal_split
from blis_model.metrics import per_experiment, summary
from blis_model.models.picf import PICF
from blis_model.models.solvers import RelativeGram, nonneg_ridge

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
ITER29_BETAS = np.array(BLIS_SHIPPED_BETAS)

FitPredict = Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]


def blis_nnls_betas(train: pd.DataFrame) -> np.ndarray:
    """argmin_{β ≥ 0} Σ (basis·β / y − 1)² over the training steps (11 BLIS betas)."""
    X = train.loc[:, list(BLIS_COLUMNS)].to_numpy(np.float64)
    stats = RelativeGram.from_rows(X, train["duration_us"].to_numpy(np.float64))
    zeros = np.zeros(len(BLIS_COLUMNS))
    return nonneg_ridge(stats, prior=zeros, penalty=zeros)


def blis_predict(frame: pd.DataFrame, beta: np.ndarray) -> np.ndarray:
    return blis_step_time(frame.loc[:, list(BLIS_COLUMNS)].to_numpy(np.float64), beta)


PREDICTORS: dict[str, FitPredict] = {
    "PICF": lambda train, test: PICF().fit(train).predict(test),
    "BLIS NNLS": lambda train, test: blis_predict(test, blis_nnls_betas(train)),
    "BLIS iter29": lambda train, test: blis_predict(test, ITER29_BETAS),
}


def leave_one_out(frame: pd.DataFrame, fit_predict: FitPredict) -> dict[str, dict]:
    out = {}
    for name in sorted(frame["experiment"].unique()):
        train, test = loo_split(frame, name)
        out[name] = summary(fit_predict(train, test), test["duration_us"].to_numpy())
    return out


def temporal(frame: pd.DataFrame, fit_predict: FitPredict) -> dict[str, dict]:
    train, test = temporal_split(frame)
    return per_experiment(test, fit_predict(train, test))


def markdown(results: dict[str, dict[str, dict]], names: list[str]) -> str:
    head = "| experiment | steps | " + " | ".join(
        f"{p} MAPE | {p} median APE" for p in results) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(results)]
    for name in names:
        n = next(iter(results.values()))[name]["n"]
        cells = [f"{r[name]['mape']:.1f}% | {r[name]['median_ape']:.1f}%"
                 for r in results.values()]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    means = [f"**{np.mean([r[n]['mape'] for n in names]):.1f}%** | "
             f"**{np.mean([r[n]['median_ape'] for n in names]):.1f}%**" for r in results.values()]
    lines.append("| **mean** | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", nargs="?", default=str(DEFAULT_CORPUS))
    args = parser.parse_args(argv)
    items = [featurize(e) for e in load_experiments(args.corpus)]
    frame = training_frame(items)
    names = sorted(frame["experiment"].unique())
    print(f"corpus {args.corpus}: {len(names)} experiments, {len(frame)} steps",
          file=sys.stderr)
    print("### Leave-one-experiment-out (fit on the others, predict the held-out one)\n")
    print(markdown({p: leave_one_out(frame, fp) for p, fp in PREDICTORS.items()}, names))
    print("\n### Temporal holdout (fit on the first 70% of each experiment, predict the "
          "last 30%)\n")
    print(markdown({p: temporal(frame, fp) for p, fp in PREDICTORS.items()}, names))
    beta = blis_nnls_betas(frame)
    print("\n### BLIS NNLS betas fit on every step\n")
    print("| beta | " + " | ".join(f"b{i} {n}" for i, n in enumerate(BETA_NAMES)) + " |")
    print("|---|" + "---:|" * len(beta))
    print("| value | " + " | ".join(f"{b:.4g}" for b in beta) + " |")


if __name__ == "__main__":
    main()
