"""Non-negative linear quantile regression that scales linearly in rows.

Minimises the smoothed pinball loss Σ ρ_{q,h}(t_i − a_i·β) + Σ_k pen_k·(β_k − prior_k)²
over β ≥ 0 with bounded L-BFGS-B, where ρ_{q,h}(r) = q·r + h·log(1 + e^{−r/h}) is the
check function smoothed over a width h (→ the exact pinball loss as h → 0; its gradient
is q − σ(−r/h)). Rows are scaled by a *pilot* prediction p_i (a function of the
features only, so conditional quantiles are not distorted): a = x/p, t = y/p — the
loss is in relative units, like the rest of the families.

Cost per iteration: two passes over the (rows × features) design; memory: the design
plus a few row vectors. Smoothing is annealed (0.05 → 0.01 → ``smoothing``) with warm
starts, the coarse stages on a row subsample.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from blis_model.models.solvers import RelativeGram, nonneg_ridge

ANNEAL: tuple[float, ...] = (0.05, 0.01)


def smoothed_pinball(r: np.ndarray, q: float, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Loss ρ_{q,h}(r) and its derivative, elementwise."""
    loss = q * r + h * np.logaddexp(0.0, -r / h)
    return loss, q - expit(-r / h)


def pilot_prediction(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least-squares (relative error) prediction, floored at 1% of mean y."""
    stats = RelativeGram.from_rows(X, y)
    beta = nonneg_ridge(stats, np.zeros(X.shape[1]), np.zeros(X.shape[1]))
    return np.maximum(X @ beta, 0.01 * float(np.mean(y)))


def fit_quantile(X: np.ndarray, y: np.ndarray, q: float, prior: np.ndarray | None = None,
                 penalty: np.ndarray | None = None, pilot: np.ndarray | None = None,
                 smoothing: float = 1e-3, max_iter: int = 300, x0: np.ndarray | None = None,
                 anneal_rows: int = 200_000, lower: np.ndarray | None = None,
                 upper: np.ndarray | None = None) -> np.ndarray:
    """β ≥ 0 of the q-quantile of y given the features X (rows × p), see module docstring.

    ``penalty`` is in pseudo-observations (0 = free); all-zero columns get their prior.
    ``lower`` / ``upper`` (default 0 / inf) bound β — box constraints of L-BFGS-B and
    of the Newton polish. The coarse annealing stages run on an evenly strided subsample
    of at most ``anneal_rows`` rows; the final stage always uses every row.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, p = X.shape
    prior = np.zeros(p) if prior is None else np.asarray(prior, dtype=np.float64)
    penalty = np.zeros(p) if penalty is None else np.asarray(penalty, dtype=np.float64)
    if pilot is None:
        pilot = pilot_prediction(X, y)
    A = X / pilot[:, None]
    t = y / pilot
    scale = np.sqrt(np.mean(A * A, axis=0))
    active = scale > 0
    beta = np.maximum(prior, 0.0).copy()
    if not active.any() or not n:
        return beta
    A = A[:, active]
    s = scale[active]
    A /= s
    b_prior = prior[active] * s
    pen = penalty[active]
    lo = np.zeros(p) if lower is None else np.asarray(lower, dtype=np.float64)
    hi = np.full(p, np.inf) if upper is None else np.asarray(upper, dtype=np.float64)
    lo, hi = lo[active] * s, hi[active] * s
    start = (x0[active] * s) if x0 is not None else np.linalg.lstsq(
        A[: min(n, 20000)], t[: min(n, 20000)], rcond=None)[0]
    b = np.clip(np.maximum(start, 0.0), lo, hi)
    box = [(float(a), None if not np.isfinite(c) else float(c)) for a, c in zip(lo, hi,
                                                                                strict=True)]

    def objective(b: np.ndarray, h: float, Ar: np.ndarray, tr: np.ndarray
                  ) -> tuple[float, np.ndarray]:
        weight = n / len(tr)  # a subsample stands for all rows
        r = tr - Ar @ b
        loss, dloss = smoothed_pinball(r, q, h)
        dev = b - b_prior
        value = (weight * loss.sum() + np.dot(pen, dev * dev)) / n
        grad = (-weight * (Ar.T @ dloss) + 2.0 * pen * dev) / n
        return float(value), grad

    stride = max(1, -(-n // max(anneal_rows, 1)))
    coarse = (A[::stride].copy(), t[::stride].copy()) if stride > 1 else (A, t)
    stages = [(h, coarse) for h in ANNEAL if h > smoothing] + [(smoothing, (A, t))]
    for h, (Ar, tr) in stages:
        res = minimize(objective, b, args=(h, Ar, tr), jac=True, method="L-BFGS-B",
                       bounds=box,
                       options={"maxiter": max_iter, "ftol": 1e-13, "gtol": 1e-9})
        b = res.x
    b = newton_polish(b, lambda x: objective(x, smoothing, A, t), A, t, q, smoothing, pen, n,
                      lower=lo, upper=hi)
    beta[active] = b / s
    return beta


def newton_polish(b: np.ndarray, objective: object, A: np.ndarray, t: np.ndarray, q: float,
                  h: float, pen: np.ndarray, n: int, iterations: int = 30,
                  lower: np.ndarray | None = None, upper: np.ndarray | None = None
                  ) -> np.ndarray:
    """Projected Newton steps from L-BFGS-B's stopping point to the optimum itself.

    L-BFGS-B stops where its gradient test passes, a point that depends on the path (and
    so on the machine's BLAS); the smoothed objective is strictly convex where rows sit
    near the quantile, and Newton's method converges quadratically there, so the
    polished β is the optimum to rounding, the same on every machine. Coordinates at
    their bound with a gradient pushing outward stay fixed; a step that does not lower
    the objective is halved. ``lower`` / ``upper`` (default 0 / inf) are the box."""
    lower = np.zeros(len(b)) if lower is None else lower
    upper = np.full(len(b), np.inf) if upper is None else upper
    value, grad = objective(b)  # type: ignore[operator]
    for _ in range(iterations):
        free = ((b > lower) | (grad < 0)) & ((b < upper) | (grad > 0))
        if not free.any():
            break
        r = t - A @ b
        z = np.exp(-np.logaddexp(0.0, r / h) - np.logaddexp(0.0, -r / h))  # s(1-s), stable
        Af = A[:, free]
        hess = (Af.T @ (Af * (z / h)[:, None]) + 2.0 * np.diag(pen[free])) / n
        try:
            step = np.linalg.solve(hess, -grad[free])
        except np.linalg.LinAlgError:
            break
        candidate = b.copy()
        for _ in range(40):
            candidate[free] = np.clip(b[free] + step, lower[free], upper[free])
            new_value, new_grad = objective(candidate)  # type: ignore[operator]
            if new_value <= value:
                break
            step *= 0.5
        else:
            break
        moved = float(np.max(np.abs(candidate - b))) / max(1.0, float(np.max(np.abs(b))))
        b, value, grad = candidate, new_value, new_grad
        if moved <= 1e-14:
            break
    return b
