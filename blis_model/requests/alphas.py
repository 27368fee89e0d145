"""BLIS's request overheads (the alphas) fit from a request table (``ingest.requests``).

* α0 (µs): API arrival → engine queue (``pre_queue_us``), optionally plus a per-prompt-
  token term (µs/token; not part of BLIS's basis, reported for diagnosis).
* α1 + α2·output_tokens (µs, µs/token): engine finish → API departure (``post_finish_us``).

Both signals are heavy-tailed, so the default fit is median (least-absolute-deviation)
regression by iteratively reweighted least squares; ``method="mean"`` is ordinary least
squares, kept for comparison. Coefficients are ≥ 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from blis_model.errors import CorpusError
from blis_model.metrics import summary

METHODS = ("median", "mean")


def _nonneg_lstsq(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares with coefficients clipped to ≥ 0 by dropping them (active set)."""
    active = np.ones(X.shape[1], bool)
    coef = np.zeros(X.shape[1])
    sw = np.sqrt(w)
    while active.any():
        sol, *_ = np.linalg.lstsq(X[:, active] * sw[:, None], y * sw, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            return coef
        idx = np.flatnonzero(active)
        active[idx[np.argmin(sol)]] = False
    return coef


def robust_linear_fit(X: np.ndarray, y: np.ndarray, method: str = "median",
                      iterations: int = 200, tol: float = 1e-10) -> np.ndarray:
    """Non-negative coefficients minimizing Σ|y − Xβ| (``median``) or Σ(y − Xβ)² (``mean``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    coef = _nonneg_lstsq(X, y, np.ones(len(y)))
    if method == "mean":
        return coef
    scale = max(float(np.median(np.abs(y))), 1e-12)
    for _ in range(iterations):
        r = np.abs(y - X @ coef)
        new = _nonneg_lstsq(X, y, 1.0 / np.maximum(r, 1e-6 * scale))
        if np.max(np.abs(new - coef)) <= tol * max(1.0, float(np.max(np.abs(coef)))):
            return new
        coef = new
    return coef


@dataclass(frozen=True)
class AlphaFit:
    """Fitted overheads. µs, µs/prompt token, µs, µs/output token; row counts used."""

    method: str
    alpha0_us: float
    alpha0_per_prompt_token_us: float
    alpha1_us: float
    alpha2_us: float
    n_pre_queue: int
    n_post_finish: int

    @property
    def blis_alphas(self) -> tuple[float, float, float]:
        """BLIS order: (α0 queueing µs, α1 post-decode µs, α2 µs per output token)."""
        return (self.alpha0_us, self.alpha1_us, self.alpha2_us)

    def predict_pre_queue_us(self, prompt_tokens: np.ndarray) -> np.ndarray:
        prompt = np.asarray(prompt_tokens, np.float64)
        return self.alpha0_us + self.alpha0_per_prompt_token_us * prompt

    def predict_post_finish_us(self, output_tokens: np.ndarray) -> np.ndarray:
        return self.alpha1_us + self.alpha2_us * np.asarray(output_tokens, np.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlphaFit:
        return cls(**data)


def _frame(requests: pa.Table | pd.DataFrame) -> pd.DataFrame:
    return requests.to_pandas() if isinstance(requests, pa.Table) else requests


def _usable(frame: pd.DataFrame, target: str, regressor: str) -> pd.DataFrame:
    """Rows with the target and regressor present and a non-negative target."""
    rows = frame[[target, regressor]].dropna()
    return rows[rows[target] >= 0]


def fit_alphas(requests: pa.Table | pd.DataFrame, method: str = "median",
               prompt_term: bool = False) -> AlphaFit:
    """Fit α0 (optionally + per-prompt-token term) and α1 + α2·output_tokens.

    Raises CorpusError when no request has both timestamps of an overhead.
    """
    frame = _frame(requests)
    pre = _usable(frame, "pre_queue_us", "prompt_tokens")
    post = _usable(frame, "post_finish_us", "output_tokens")
    if pre.empty or post.empty:
        raise CorpusError("cannot fit alphas: no request has both API and journey timestamps "
                          f"({len(pre)} with arrival→queued, {len(post)} with finished→departed)")
    X0 = np.ones((len(pre), 1))
    if prompt_term:
        X0 = np.column_stack([X0, pre["prompt_tokens"].to_numpy(np.float64)])
    c0 = robust_linear_fit(X0, pre["pre_queue_us"].to_numpy(np.float64), method)
    X1 = np.column_stack([np.ones(len(post)), post["output_tokens"].to_numpy(np.float64)])
    c1 = robust_linear_fit(X1, post["post_finish_us"].to_numpy(np.float64), method)
    return AlphaFit(method=method, alpha0_us=float(c0[0]),
                    alpha0_per_prompt_token_us=float(c0[1]) if prompt_term else 0.0,
                    alpha1_us=float(c1[0]), alpha2_us=float(c1[1]),
                    n_pre_queue=len(pre), n_post_finish=len(post))


def _errors(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    keep = actual > 0
    out: dict[str, float] = summary(predicted[keep], actual[keep])
    abs_ms = np.abs(predicted - actual) / 1e3
    out["mae_ms"] = float(abs_ms.mean()) if len(abs_ms) else float("nan")
    out["median_ae_ms"] = float(np.median(abs_ms)) if len(abs_ms) else float("nan")
    return out


def alpha_errors(fit: AlphaFit, requests: pa.Table | pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per overhead: MAPE / median / p90 APE (%, over positive actuals) and mean / median
    absolute error (ms, over all usable rows)."""
    frame = _frame(requests)
    pre = _usable(frame, "pre_queue_us", "prompt_tokens")
    post = _usable(frame, "post_finish_us", "output_tokens")
    return {
        "pre_queue": _errors(fit.predict_pre_queue_us(pre["prompt_tokens"]),
                             pre["pre_queue_us"].to_numpy(np.float64)),
        "post_finish": _errors(fit.predict_post_finish_us(post["output_tokens"]),
                               post["post_finish_us"].to_numpy(np.float64)),
    }


def compare_alpha_fits(requests: pa.Table | pd.DataFrame, prompt_term: bool = False,
                       evaluate_on: pa.Table | pd.DataFrame | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Median vs mean fit: coefficients and errors (on ``evaluate_on``, default the same
    requests — pass a held-out table for honest numbers)."""
    target = requests if evaluate_on is None else evaluate_on
    out = {}
    for method in METHODS:
        fit = fit_alphas(requests, method, prompt_term)
        out[method] = {"fit": fit.to_dict(), "errors": alpha_errors(fit, target)}
    return out
