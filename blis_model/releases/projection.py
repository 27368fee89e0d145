"""A release in BLIS's trained-physics basis: the 11 betas (≥ 0) that best reproduce the
release's own predictions, and what that projection costs in accuracy.

The betas are the non-negative least squares on relative error of BLIS's basis columns
(``features.blis_parity``) onto the MODEL's predictions; the alphas are BLIS's shipped
defaults unless request-level data fit them (``requests.stage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from blis_model.configuration.defaults import BLIS_SHIPPED_ALPHAS, BLIS_SHIPPED_BETAS
from blis_model.errors import ReleaseError
from blis_model.features.blis_parity import ALPHA_NAMES, BETA_NAMES, BETA_UNITS, blis_step_time
from blis_model.features.frame import BLIS_COLUMNS
from blis_model.metrics import summary
from blis_model.models.base import StepTimeModel
from blis_model.models.solvers import RelativeGram, nonneg_ridge

ALPHA_UNITS: tuple[str, ...] = ("µs", "µs", "µs/output token")
ALPHA_SOURCE = ("BLIS shipped defaults (iter29), NOT fit: the corpus has no request-level "
                "(journey + API) traces")
BETA_SOURCE = ("non-negative relative-error least squares of BLIS's trained-physics basis onto "
               "this release's model predictions (the model's best projection onto BLIS)")


@dataclass(frozen=True)
class BlisProjection:
    """The release expressed in BLIS's trained-physics basis, and what that costs."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    per_experiment: dict[str, dict[str, Any]]  # model / projection / shipped summaries
    summary: dict[str, float]
    alpha_source: str = ALPHA_SOURCE

    def coefficient_block(self) -> dict[str, Any]:
        """Names, units and values (for coefficients.json)."""
        return {
            "alpha_coeffs": [{"index": i, "name": n, "unit": u, "value": v} for i, (n, u, v)
                             in enumerate(zip(ALPHA_NAMES, ALPHA_UNITS, self.alphas, strict=True))],
            "alpha_source": self.alpha_source,
            "beta_coeffs": [{"index": i, "name": n, "unit": u, "value": v} for i, (n, u, v)
                            in enumerate(zip(BETA_NAMES, BETA_UNITS, self.betas, strict=True))],
            "beta_source": BETA_SOURCE,
        }


def _mean(results: Mapping[str, Mapping[str, Any]], key: str) -> float:
    values = [r[key] for r in results.values() if r.get("n")]
    return float(np.mean(values)) if values else float("nan")


def project_onto_blis(model: StepTimeModel, frame: pd.DataFrame) -> BlisProjection:
    """Fit BLIS's 11 betas (≥ 0) to the model's predictions on ``frame`` by relative-error
    least squares, and measure per experiment the MAPE vs measured of the model, of the
    projection and of BLIS's shipped betas."""
    basis = frame.loc[:, list(BLIS_COLUMNS)].to_numpy(dtype=np.float64)
    predicted = np.asarray(model.predict(frame), dtype=np.float64)
    usable = np.isfinite(predicted) & (predicted > 0) & np.isfinite(basis).all(axis=1)
    if not usable.any():
        raise ReleaseError("cannot project onto BLIS's basis: the model predicts no positive "
                           "step time")
    stats = RelativeGram.from_rows(basis[usable], predicted[usable])
    zeros = np.zeros(len(BLIS_COLUMNS))
    betas = np.maximum(nonneg_ridge(stats, zeros, zeros), 0.0)
    if not np.isfinite(betas).all():
        raise ReleaseError("BLIS projection produced non-finite betas")
    projected = blis_step_time(basis, betas)
    shipped = blis_step_time(basis, np.asarray(BLIS_SHIPPED_BETAS))
    measured = frame["duration_us"].to_numpy(dtype=np.float64)
    per_exp: dict[str, dict[str, Any]] = {}
    for name, idx in frame.groupby("experiment", sort=True).indices.items():
        m, p = summary(predicted[idx], measured[idx]), summary(projected[idx], measured[idx])
        per_exp[str(name)] = {
            "model": m, "projection": p,
            "projection_vs_model": summary(projected[idx], predicted[idx]),
            "blis_shipped": summary(shipped[idx], measured[idx]),
            "mape_loss": p["mape"] - m["mape"],
        }
    models = {k: v["model"] for k, v in per_exp.items()}
    projections = {k: v["projection"] for k, v in per_exp.items()}
    shipped_all = {k: v["blis_shipped"] for k, v in per_exp.items()}
    overall = {"model_mape": _mean(models, "mape"), "projection_mape": _mean(projections, "mape"),
               "blis_shipped_mape": _mean(shipped_all, "mape")}
    overall["mape_loss"] = overall["projection_mape"] - overall["model_mape"]
    return BlisProjection(tuple(float(a) for a in BLIS_SHIPPED_ALPHAS),
                          tuple(float(b) for b in betas), per_exp, overall)


__all__ = ["ALPHA_SOURCE", "ALPHA_UNITS", "BETA_SOURCE", "BlisProjection",
           "project_onto_blis"]
