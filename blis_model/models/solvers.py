"""Shared solvers: non-negative least squares on relative error, from sufficient statistics.

Fitting works from the Gram matrix ``AᵀA`` and ``Aᵀb`` of the relative design
``A = X / y`` (rows scaled by 1/y, target 1), so memory does not grow with rows and a
fit can be assembled from shards by summing their statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cholesky
from scipy.optimize import lsq_linear, nnls


@dataclass
class RelativeGram:
    """Sufficient statistics of Σ w·(x·β/y − 1)² (MAPE-like squared relative error)."""

    gram: np.ndarray  # AᵀWA, (p, p)
    moment: np.ndarray  # AᵀW1, (p,)
    sum_w: float  # Σ w
    sq_norm: np.ndarray  # Σ w·A², (p,) — column scale for scale-free penalties

    @classmethod
    def from_rows(cls, X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None
                  ) -> RelativeGram:
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
        A = X / y[:, None]
        Aw = A * w[:, None]
        return cls(A.T @ Aw, Aw.sum(axis=0), float(w.sum()), (Aw * A).sum(axis=0))

    def __add__(self, other: RelativeGram) -> RelativeGram:
        return RelativeGram(self.gram + other.gram, self.moment + other.moment,
                            self.sum_w + other.sum_w, self.sq_norm + other.sq_norm)

    @property
    def column_scale(self) -> np.ndarray:
        """RMS of each relative-design column (0 for all-zero columns)."""
        return np.sqrt(self.sq_norm / max(self.sum_w, 1e-300))


def nonneg_ridge(stats: RelativeGram, prior: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """argmin_{β ≥ 0} Σ w(x·β/y − 1)² + Σ_k penalty_k·scale_k²·(β_k − prior_k)².

    ``penalty`` is in pseudo-observations (scale-free): 0 leaves a coefficient free.
    Columns that are identically zero get their prior (nothing in the data speaks).
    """
    scale = stats.column_scale
    active = scale > 0
    beta = np.asarray(prior, dtype=np.float64).copy()
    if not active.any():
        return np.maximum(beta, 0.0)
    idx = np.flatnonzero(active)
    pen = np.asarray(penalty, dtype=np.float64)[idx] * scale[idx] ** 2
    G = stats.gram[np.ix_(idx, idx)] + np.diag(pen)
    c = stats.moment[idx] + pen * beta[idx]
    # same minimiser as βᵀGβ − 2cᵀβ; columns normalised to unit RMS for conditioning
    beta[idx] = nonneg_quadratic(G, c, scale[idx])
    beta[~active] = np.maximum(beta[~active], 0.0)
    return beta


def bounded_ridge(stats: RelativeGram, prior: np.ndarray, penalty: np.ndarray,
                  lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """argmin_{lower ≤ β ≤ upper} Σ w(x·β/y − 1)² + Σ_k penalty_k·scale_k²·(β_k − prior_k)².

    :func:`nonneg_ridge` with box constraints (``lower`` ≥ 0; ``upper`` may be ``inf``):
    the per-configuration terms' physical ranges, enforced by the solver. Columns that are
    identically zero keep their prior (nothing in the data speaks for them). The prior
    need not lie inside the box.
    """
    scale = stats.column_scale
    active = scale > 0
    beta = np.asarray(prior, dtype=np.float64).copy()
    if not active.any():
        return beta
    idx = np.flatnonzero(active)
    pen = np.asarray(penalty, dtype=np.float64)[idx] * scale[idx] ** 2
    G = stats.gram[np.ix_(idx, idx)] + np.diag(pen)
    c = stats.moment[idx] + pen * beta[idx]
    beta[idx] = bounded_quadratic(G, c, np.asarray(lower, dtype=np.float64)[idx],
                                  np.asarray(upper, dtype=np.float64)[idx], scale[idx])
    return beta


def bounded_quadratic(H: np.ndarray, c: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                      scale: np.ndarray | None = None) -> np.ndarray:
    """argmin_{lower ≤ β ≤ upper} ½βᵀHβ − cᵀβ for symmetric positive (semi)definite ``H``.

    As :func:`nonneg_quadratic` (scaled variables, Cholesky) but solved as a bounded-
    variable least-squares problem (BVLS, exact active set). Coordinates with
    ``lower == upper`` are fixed there.
    """
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if np.any(lower > upper):
        raise ValueError("bounded_quadratic: a lower bound exceeds its upper bound")
    d = np.sqrt(np.maximum(np.diag(H), 1e-300)) if scale is None else np.asarray(scale)
    beta = lower.copy()
    fixed = np.isfinite(upper) & (upper - lower <= 1e-12 * np.maximum(np.abs(upper), 1.0))
    free = np.flatnonzero(~fixed)
    if not len(free):
        return beta
    # fixed coordinates move to the linear term: c_f − H_f,fixed·β_fixed
    cf = c[free] - H[np.ix_(free, np.flatnonzero(fixed))] @ beta[fixed]
    Hf = H[np.ix_(free, free)]
    df = d[free]
    R, z = _cholesky_system(Hf / np.outer(df, df), cf / df)
    lo, hi = lower[free] * df, upper[free] * df
    result = lsq_linear(R, z, bounds=(lo, hi), method="bvls", tol=1e-14, lsmr_tol=None,
                        max_iter=None)
    # in unit-scaled variables a distance < 1e-12 to a bound is rounding: at the bound
    x = np.where(result.x - lo < 1e-12, lo, result.x)
    x = np.where(hi - x < 1e-12, hi, x)
    beta[free] = np.clip(x / df, lower[free], upper[free])
    return beta


def _cholesky_system(Hn: np.ndarray, cn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, z) with ‖Rβ − z‖² = βᵀHnβ − 2cnᵀβ + const (R upper triangular, jittered when
    Hn is singular)."""
    jitter = 1e-10 * max(np.trace(Hn) / max(len(cn), 1), 1e-12)
    for _ in range(10):
        try:
            R = cholesky(Hn + jitter * np.eye(len(cn)), lower=False)
            return R, np.linalg.solve(R.T, cn)
        except np.linalg.LinAlgError:
            jitter *= 100
    raise np.linalg.LinAlgError("quadratic form is not positive semidefinite")  # pragma: no cover


def nonneg_quadratic(H: np.ndarray, c: np.ndarray, scale: np.ndarray | None = None
                     ) -> np.ndarray:
    """argmin_{β ≥ 0} ½βᵀHβ − cᵀβ for symmetric positive (semi)definite ``H``.

    Scaling the variables (by ``scale``, default √diag H) + Cholesky turn it into a
    well-conditioned non-negative least-squares problem.
    """
    d = np.sqrt(np.maximum(np.diag(H), 1e-300)) if scale is None else scale
    Hn = H / np.outer(d, d)
    cn = c / d
    jitter = 1e-10 * max(np.trace(Hn) / max(len(c), 1), 1e-12)
    R = None
    for _ in range(10):
        try:
            R = cholesky(Hn + jitter * np.eye(len(c)), lower=False)
            break
        except np.linalg.LinAlgError:
            jitter *= 100
    if R is None:  # pragma: no cover - only with non-finite input
        raise np.linalg.LinAlgError("quadratic form is not positive semidefinite")
    z = np.linalg.solve(R.T, cn)
    bn, _ = nnls(R, z, maxiter=50 * len(c) + 1000)
    return bn / d
