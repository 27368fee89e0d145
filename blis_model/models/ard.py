"""Automatic relevance determination from sufficient statistics (used by BSR-ARD, Hybrid).

Relative-error Bayesian linear model: x·β / y = 1 + ε with ε ~ N(0, 1/λ) and a Gaussian
prior per coefficient β_k ~ N(m_k, 1/α_k). MacKay's fixed-point updates maximise the
evidence over (α, λ) using only AᵀA, Aᵀ1 of the relative design A = X/y — one pass over
the rows, nothing quadratic in rows. α_k → ∞ prunes a deviation from the prior mean.

Rows of one configuration share errors the independent-noise likelihood ignores, so the
evidence over-trusts them; :func:`pooled_posterior` can temper the likelihood by a weight
κ chosen by leave-one-configuration-out error, computed from per-configuration
statistics alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.models.base import priors
from blis_model.models.linear import (
    CHUNK_ROWS,
    columns_fn,
    config_groups,
    relative_stats,
    spd_inverse,
)
from blis_model.models.solvers import RelativeGram, nonneg_quadratic


@dataclass(frozen=True)
class ARDPosterior:
    """Result of evidence maximisation, in the original feature units."""

    keep: np.ndarray  # bool (p,): features the evidence keeps
    mean: np.ndarray  # (p,) posterior mean (0 where pruned), ≥ 0
    alpha: np.ndarray  # (p,) prior precisions, 1/(coefficient unit)² (inf where pruned)
    noise_precision: float  # λ, 1/(relative error)²
    cov: np.ndarray  # (k, k) posterior covariance over the kept features
    precision: np.ndarray  # (k, k) posterior precision λ·AᵀA + diag(α) over the kept


def _ard_iterations(G: np.ndarray, b: np.ndarray, n: float, tt: float,
                    alpha_threshold: float, max_iter: int, tol: float
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """MacKay updates for ‖AΔ − t‖² on unit-scaled columns (G = AᵀA, b = Aᵀt, tt = tᵀt);
    returns (keep, alpha, noise precision)."""
    p = len(b)
    mu0 = np.linalg.lstsq(G + 1e-8 * np.eye(p), b, rcond=None)[0]
    rss0 = max(tt - 2 * mu0 @ b + mu0 @ G @ mu0, 1e-12 * n)
    lam = n / rss0
    alpha = np.ones(p)
    keep = np.ones(p, bool)
    for _ in range(max_iter):
        k = np.flatnonzero(keep)
        Sigma = spd_inverse(lam * G[np.ix_(k, k)] + np.diag(alpha[k]))
        mu = lam * Sigma @ b[k]
        gamma = np.clip(1.0 - alpha[k] * np.diag(Sigma), 0.0, 1.0)
        new_alpha = alpha.copy()
        new_alpha[k] = gamma / np.maximum(mu * mu, 1e-300)
        rss = max(tt - 2 * mu @ b[k] + mu @ G[np.ix_(k, k)] @ mu, 1e-12 * n)
        lam = max(n - gamma.sum(), 1e-6) / rss
        change = np.max(np.abs(np.log(np.minimum(new_alpha[k], alpha_threshold))
                               - np.log(np.minimum(alpha[k], alpha_threshold))))
        alpha = new_alpha
        keep = keep & (alpha < alpha_threshold)
        if not keep.any():
            keep[np.argmin(alpha)] = True
        if change < tol:
            break
    return keep, alpha, lam


def prior_means(names: Sequence[str], mode: str) -> np.ndarray:
    """ARD prior means: ``"physics"`` = the physical prior (1) for the corrections of the
    physics set, 0 for everything else; ``"zero"`` = classic ARD (all 0)."""
    if mode == "zero":
        return np.zeros(len(names))
    if mode != "physics":
        raise ValueError(f"prior_mean must be 'physics' or 'zero', got {mode!r}")
    physics = set(PHYSICS_FEATURES)
    return np.array([priors([n])[0] if n in physics else 0.0 for n in names])


def ard_posterior(stats: RelativeGram, prior_mean: np.ndarray | None = None,
                  alpha_threshold: float = 1e5, max_iter: int = 300, tol: float = 1e-4,
                  nonneg: bool = True) -> ARDPosterior:
    """Evidence maximisation on relative-error statistics (target 1), see module docstring.

    Each coefficient is β_k = m_k + Δ_k with Δ_k ~ N(0, 1/α_k): a pruned feature keeps its
    prior mean m_k (0 by default). ``alpha_threshold`` is in unit-scaled coordinates: a
    deviation is pruned when its prior allows it to explain less than ~1/√threshold of the
    step time. All-zero columns keep their prior mean.
    """
    p = len(stats.moment)
    m = np.zeros(p) if prior_mean is None else np.asarray(prior_mean, dtype=np.float64)
    scale = stats.column_scale
    candidates = scale > 0
    n = stats.sum_w
    if not candidates.any():
        empty = np.zeros((0, 0))
        return ARDPosterior(np.zeros(p, bool), m.copy(), np.full(p, np.inf), 1.0, empty, empty)
    while True:
        idx = np.flatnonzero(candidates)
        s = scale[idx]
        G = stats.gram[np.ix_(idx, idx)] / np.outer(s, s)
        b = stats.moment[idx] / s
        mn = m[idx] * s
        # deviations Δ = β − m fit the target t = 1 − A·m
        b_dev = b - G @ mn
        tt_dev = n - 2 * mn @ b + mn @ G @ mn
        keep_local, alpha_n, lam = _ard_iterations(G, b_dev, n, tt_dev, alpha_threshold,
                                                   max_iter, tol)
        k = np.flatnonzero(keep_local)
        fixed = np.flatnonzero(~keep_local)
        H = lam * G[np.ix_(k, k)] + np.diag(alpha_n[k])
        c = lam * (b[k] - G[np.ix_(k, fixed)] @ mn[fixed]) + alpha_n[k] * mn[k]
        mu = spd_inverse(H) @ c
        negative = (mu < 0) & (mn[k] == 0)  # a zero-mean feature pushed negative: drop it
        if not nonneg or not negative.any() or len(k) == 1:
            break
        candidates[idx[k[negative]]] = False
    if nonneg:
        mu = nonneg_quadratic(H, c)
    keep = np.zeros(p, bool)
    keep[idx[k]] = True
    sk = s[k]
    mean = m.copy()
    mean[keep] = mu / sk
    alpha = np.full(p, np.inf)
    alpha[keep] = alpha_n[k] * sk * sk
    precision = H * np.outer(sk, sk)
    return ARDPosterior(keep, mean, alpha, float(lam), spd_inverse(precision), precision)


EVIDENCE_GRID: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03)


def tempered(stats: RelativeGram, weight: float) -> RelativeGram:
    """Statistics with every row's weight multiplied by ``weight`` (a power likelihood)."""
    return RelativeGram(stats.gram * weight, stats.moment * weight, stats.sum_w * weight,
                        stats.sq_norm * weight)


def _minus(a: RelativeGram, b: RelativeGram) -> RelativeGram:
    return RelativeGram(a.gram - b.gram, a.moment - b.moment, a.sum_w - b.sum_w,
                        np.maximum(a.sq_norm - b.sq_norm, 0.0))


def relative_mse(stats: RelativeGram, beta: np.ndarray) -> float:
    """Mean squared relative error Σw(x·β/y − 1)²/Σw of rows summarised by ``stats``."""
    return float((beta @ stats.gram @ beta - 2 * beta @ stats.moment + stats.sum_w)
                 / max(stats.sum_w, 1e-300))


def select_evidence_weight(by_group: dict[str, RelativeGram], prior_mean: np.ndarray,
                           grid: Sequence[float] = EVIDENCE_GRID, **ard: Any
                           ) -> tuple[float, dict[float, float]]:
    """Likelihood weight κ chosen by leave-one-group-out (configuration) squared relative
    error, computed from per-group sufficient statistics only (no second pass over rows).

    Rows of one configuration share errors the independent-noise likelihood ignores, so
    the evidence over-trusts them; tempering by κ < 1 restores shrinkage toward the
    prior. The score is the MEDIAN over held-out configurations: one that no other
    resembles (the only MoE among dense models) would otherwise decide, alone, how little
    every configuration is trusted. With fewer than 3 groups κ = 1. Returns
    (κ, {κ: CV error}).
    """
    if len(by_group) < 3:
        return 1.0, {}
    total = sum(by_group.values(), start=RelativeGram(0.0, 0.0, 0.0, 0.0))
    scores = {}
    for weight in grid:
        errors = [relative_mse(st, ard_posterior(tempered(_minus(total, st), weight),
                                                 prior_mean, **ard).mean)
                  for st in by_group.values()]
        scores[float(weight)] = float(np.median(errors))
    best = min(scores, key=lambda w: (scores[w], -w))
    return best, scores


def pooled_posterior(X: pd.DataFrame, y: np.ndarray, names: Sequence[str],
                     prior_mean: np.ndarray, evidence_weight: float | str = "cv", **ard: Any
                     ) -> tuple[ARDPosterior, float, dict[float, float]]:
    """ARD posterior of the pooled frame with the likelihood weight κ fixed or chosen by
    leave-one-configuration-out (``"cv"``). One pass over the rows (per-configuration
    statistics). Returns (posterior, κ, CV errors)."""
    groups = config_groups(X) or {"": np.arange(len(X))}
    by_group = {k: relative_stats(columns_fn(X, names, idx), y[idx])
                for k, idx in groups.items()}
    if evidence_weight == "cv":
        weight, scores = select_evidence_weight(by_group, prior_mean, **ard)
    else:
        weight, scores = float(evidence_weight), {}
    total = sum(by_group.values(), start=RelativeGram(0.0, 0.0, 0.0, 0.0))
    return ard_posterior(tempered(total, weight), prior_mean, **ard), weight, scores


def stats_scale(X: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """Largest |value| of each named column (0 = the data never exercises the feature)."""
    return np.array([float(np.abs(X[n].to_numpy(dtype=np.float64)).max()) if len(X) else 0.0
                     for n in names])


def predictive_std(X: pd.DataFrame, kept: Sequence[str], cov: np.ndarray, pred: np.ndarray,
                   noise_precision: float, idx: np.ndarray | None = None) -> np.ndarray:
    """√(ŷ²/λ + xᵀΣx) µs per step: ``pred`` the predictions of the rows ``idx``, ``cov``
    the posterior covariance over the ``kept`` features."""
    rows = np.arange(len(X)) if idx is None else idx
    quad = np.zeros(len(rows))
    cols = columns_fn(X, kept)
    for start in range(0, len(rows), CHUNK_ROWS):
        block = rows[start:start + CHUNK_ROWS]
        if len(kept):
            A = cols(block)
            quad[start:start + len(block)] = np.einsum("ij,jk,ik->i", A, cov, A)
    return np.sqrt(pred * pred / noise_precision + np.maximum(quad, 0.0))
