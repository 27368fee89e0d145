"""Release plots as PNG bytes (matplotlib, Agg backend): what a reviewer looks at before
promoting a release.

* ``predicted_vs_measured.png`` — every step, predicted vs measured step time (µs,
  log-log), one colour per experiment, with the y = x line;
* ``error_by_regime.png`` — signed relative error (%) of the prediction per batch regime
  (decode only, prefill only, mixed) and experiment, as box plots;
* ``learning_curve.png`` — temporal-holdout MAPE (%) against the number of training steps
  (points computed by ``calibration.evaluation.learning_curve``), when given.

:func:`release_plots` returns them as ``{"plots/<name>.png": bytes}``, ready to be added
to a release's files. Drawing only (nothing is fitted here); pure library code: no
Prefect, no Ray, nothing printed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit: safe in workers and servers

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from blis_model.metrics import per_experiment, summary  # noqa: E402
from blis_model.releases.files import PLOTS_DIR  # noqa: E402

REGIMES: tuple[str, ...] = ("decode only", "prefill only", "mixed")
DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # Fixed metadata: the same data gives the same bytes (reproducible releases).
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def regimes(frame: pd.DataFrame) -> pd.Series:
    """Batch regime of every step: decode only, prefill only or mixed."""
    prefill = frame["num_prefill_reqs"].to_numpy() > 0
    decode = frame["num_decode_reqs"].to_numpy() > 0
    labels = np.where(prefill & decode, "mixed", np.where(prefill, "prefill only",
                                                          "decode only"))
    return pd.Series(labels, index=frame.index, name="regime")


def predicted_vs_measured(frame: pd.DataFrame, predicted: np.ndarray, title: str = ""
                          ) -> bytes:
    """Scatter of predicted vs measured step time (µs), log-log, per experiment."""
    measured = frame["duration_us"].to_numpy(dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for name, idx in frame.groupby("experiment", sort=True).indices.items():
        ax.scatter(measured[idx], predicted[idx], s=6, alpha=0.6, label=str(name))
    ok = np.isfinite(predicted) & (predicted > 0) & (measured > 0)
    if ok.any():
        lo = float(min(measured[ok].min(), predicted[ok].min()))
        hi = float(max(measured[ok].max(), predicted[ok].max()))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    pooled = summary(predicted, measured)["mape"]
    means = [r["mape"] for r in per_experiment(frame, predicted).values() if r["n"]]
    ax.set_xlabel("measured step time (µs)")
    ax.set_ylabel("predicted step time (µs)")
    ax.set_title(title or (f"predicted vs measured, in-sample: MAPE {np.mean(means):.2f}% "
                           f"(mean over {len(means)} experiments, as in the model card); "
                           f"{pooled:.2f}% pooled over {len(frame)} steps"), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def error_by_regime(frame: pd.DataFrame, predicted: np.ndarray, title: str = "") -> bytes:
    """Box plots of signed relative error (%) per regime, one box per experiment."""
    measured = frame["duration_us"].to_numpy(dtype=np.float64)
    error = (np.asarray(predicted, dtype=np.float64) - measured) / measured * 100.0
    data = pd.DataFrame({"experiment": frame["experiment"].astype(str).to_numpy(),
                         "regime": regimes(frame).to_numpy(), "error": error})
    experiments = sorted(data["experiment"].unique())
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(experiments) * len(REGIMES)), 4.5))
    width = 0.8 / max(len(experiments), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, name in enumerate(experiments):
        part = data[data["experiment"] == name]
        groups = [part.loc[part["regime"] == r, "error"].to_numpy() for r in REGIMES]
        positions = [i - 0.4 + width * (j + 0.5) for i in range(len(REGIMES))]
        kept = [(p, g) for p, g in zip(positions, groups, strict=True) if len(g)]
        if not kept:
            continue
        box = ax.boxplot([g for _, g in kept], positions=[p for p, _ in kept], widths=width * 0.9,
                         showfliers=False, patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(colours[j % len(colours)])
            patch.set_alpha(0.6)
        ax.plot([], [], color=colours[j % len(colours)], linewidth=6, alpha=0.6, label=name)
    counts = data.groupby("regime").size().to_dict()
    ax.set_xticks(range(len(REGIMES)))
    ax.set_xticklabels([f"{r}\n({counts.get(r, 0)} steps)" for r in REGIMES])
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_ylabel("(predicted − measured) / measured (%)")
    ax.set_title(title or "step-time error by batch regime (boxes: quartiles, whiskers 1.5 IQR)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def learning_curve_plot(points: Sequence[Mapping[str, float]], title: str = "") -> bytes:
    """MAPE and median APE (%) on the held-out steps against training steps."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    steps = [p["train_steps"] for p in points]
    ax.plot(steps, [p["mape"] for p in points], marker="o", label="MAPE")
    ax.plot(steps, [p["median_ape"] for p in points], marker="s", label="median APE")
    ax.set_xlabel("training steps (earliest of each experiment)")
    ax.set_ylabel("error on the last 30% of steps (%)")
    ax.set_title(title or "calibration learning curve (temporal holdout)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _png(fig)


LATENCY_TITLES = {"ttft": "TTFT", "itl": "ITL (per output token)", "e2e": "E2E"}


def latency_cdfs(data: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """Simulated (dashed) vs measured (solid) CDFs of TTFT, ITL and E2E (ms, log x), one
    colour per experiment: ``data[experiment][metric] = (simulated µs, measured µs)``."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, LATENCY_TITLES, strict=True):
        for j, (name, series) in enumerate(sorted(data.items())):
            sim, meas = (np.sort(np.asarray(v, np.float64)[np.isfinite(v)]) / 1e3
                         for v in series[metric])
            colour = colours[j % len(colours)]
            for values, style, who in ((meas, "-", "measured"), (sim, "--", "simulated")):
                if len(values):
                    ax.plot(values, np.arange(1, len(values) + 1) / len(values), style,
                            color=colour, linewidth=1.2,
                            label=f"{name} ({who})" if metric == "ttft" else None)
        ax.set_xscale("log")
        ax.set_xlabel(f"{LATENCY_TITLES[metric]} (ms)")
        ax.set_ylabel("share of requests")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("replayed (dashed) vs measured (solid) request latencies")
    return _png(fig)


def release_plots(frame: pd.DataFrame, predictions: np.ndarray,
                  learning: Sequence[Mapping[str, float]] | None = None) -> dict[str, bytes]:
    """The plots of a release: ``{"plots/<name>.png": PNG bytes}`` (see module doc)."""
    out = {f"{PLOTS_DIR}/predicted_vs_measured.png": predicted_vs_measured(frame, predictions),
           f"{PLOTS_DIR}/error_by_regime.png": error_by_regime(frame, predictions)}
    if learning:
        out[f"{PLOTS_DIR}/learning_curve.png"] = learning_curve_plot(learning)
    return out


__all__ = ["PLOTS_DIR", "REGIMES", "error_by_regime", "latency_cdfs", "learning_curve_plot",
           "predicted_vs_measured", "regimes", "release_plots"]
