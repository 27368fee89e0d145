"""Accuracy metrics on relative error. All take arrays of predictions and truths (µs)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def ape(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Absolute percentage error per item, %."""
    actual = np.asarray(actual, dtype=np.float64)
    return np.abs(np.asarray(predicted, dtype=np.float64) - actual) / actual * 100.0


def summary(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """MAPE, median and p90 absolute percentage error (%), and the count."""
    errors = ape(predicted, actual)
    if not len(errors):
        return {"mape": float("nan"), "median_ape": float("nan"), "p90_ape": float("nan"),
                "n": 0}
    return {"mape": float(errors.mean()), "median_ape": float(np.median(errors)),
            "p90_ape": float(np.percentile(errors, 90)), "n": int(len(errors))}


def per_experiment(frame: pd.DataFrame, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """``summary`` per experiment of ``frame`` (aligned with ``predicted``)."""
    out = {}
    predicted = np.asarray(predicted)
    for name, idx in frame.groupby("experiment", sort=True).indices.items():
        out[str(name)] = summary(predicted[idx], frame["duration_us"].to_numpy()[idx])
    return out
