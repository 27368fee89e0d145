"""Shared solvers: non-negative least squares on relative error, from sufficient statistics.

Fitting works from the Gram matrix ``AᵀA`` and ``Aᵀb`` of the relative design
``A = X / y`` (rows scaled by 1/y, target 1), so memory does not grow with rows and a
fit can be assembled from shards by summing their statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cholesky
from scipy.optimize import nnls


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
