"""OVERLAP — host/device overlap roofline: the GPU and the CPU work at the same time.

vLLM's engine launches kernels from the CPU while the GPU executes earlier ones, so a
step takes about the LONGER of the two, not their sum. Small batches are launch-bound
(the CPU's per-layer / per-request / per-step cost decides), large ones GPU-bound. The
model keeps two linear experts with physical units and combines them with a smooth max:

    g = Σ_k θ_k · f_k(step)      GPU time, µs (f_k: roofline µs features, θ_k ≥ 0
                                 dimensionless corrections, prior 1)
    c = Σ_j φ_j · n_j(step)      CPU time, µs (n_j: counts — layers, requests, steps;
                                 φ_j ≥ 0 µs per unit)
    StepTime = (g^p + c^p)^(1/p)  (p = ``power``; p → ∞ is the hard max, p = 1 the sum)

Equivalently a two-regime mixture of linear experts whose gate is the experts' own
ratio: StepTime = w·c + (1−w)·g with w = c^p/(g^p + c^p) up to the p-norm's scale.

Fit: non-negative least squares on relative error (scipy ``least_squares``, analytic
Jacobian, cost linear in rows), ridge toward the prior on the GPU corrections; a global
set plus, per configuration, the choice of ``models.config_terms`` (the global set, one
factor h on the CPU expert — the host: the step is (g^p + (h·c)^p)^(1/p), h by a bounded
one-dimensional minimisation of the relative error —, one scale on it — the smooth max
is homogeneous of degree 1, so scaling both experts scales the step — or its own set
shrunk toward the global one), every coefficient inside its physical range as bounds of
the solver. A configuration never seen predicts with the global set whose CPU expert is
× its machine's host factor (``config_terms``, *Machine host factors*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from blis_model.features.physics import PHYSICS_FEATURES
from blis_model.features.registry import REGISTRY
from blis_model.models.base import ConfigCoefficientSets, design, target
from blis_model.models.config_terms import KAPPA
from blis_model.models.solvers import RelativeGram, nonneg_ridge

DEFAULT_GPU = tuple(n for n in PHYSICS_FEATURES if REGISTRY[n].kind == "correction")
DEFAULT_CPU = tuple(n for n in PHYSICS_FEATURES if REGISTRY[n].kind == "overhead")


def _scatter(free: np.ndarray, active: np.ndarray, base: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[active] = free
    return out


def overlap_time(g: np.ndarray, c: np.ndarray, power: float) -> np.ndarray:
    """Smooth max (g^p + c^p)^(1/p) of GPU and CPU time (µs), computed stably."""
    m = np.maximum(np.maximum(g, c), 1e-12)
    return m * ((g / m) ** power + (c / m) ** power) ** (1.0 / power)


class Overlap(ConfigCoefficientSets):
    """Smooth max of a GPU expert and a CPU expert, global + per configuration."""

    family = "overlap"

    def __init__(self, gpu_features: Sequence[str] = DEFAULT_GPU,
                 cpu_features: Sequence[str] = DEFAULT_CPU, power: float = 3.0,
                 ridge: float = 0.1, per_config: bool = True,
                 config_prior_steps: float = 20.0, max_iterations: int = 200,
                 config_bound: float = KAPPA, config_selection: str = "cv") -> None:
        self.gpu_features = gpu_features
        self.cpu_features = cpu_features
        self.power = power
        self.ridge = ridge
        self.per_config = per_config
        self.config_prior_steps = config_prior_steps
        self.max_iterations = max_iterations
        self.config_bound = config_bound
        self.config_selection = config_selection

    # -- helpers ------------------------------------------------------------------------
    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.gpu_features) + tuple(self.cpu_features)

    def _split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = len(self.gpu_features)
        return theta[:k], theta[k:]

    def _solve(self, G: np.ndarray, C: np.ndarray, y: np.ndarray, prior: np.ndarray,
               penalty: np.ndarray, start: np.ndarray,
               bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """argmin_{lower ≤ θ ≤ upper} Σ(ŷ/y − 1)² + Σ penalty_k·s_k²·(θ_k − prior_k)²
        (``bounds`` default: θ ≥ 0)."""
        A = np.column_stack([G, C]) / y[:, None]
        scale = np.sqrt((A * A).mean(axis=0))
        scale[scale == 0] = 1.0
        weight = np.sqrt(penalty) * scale
        k, p = len(self.gpu_features), self.power
        Gy, Cy = G / y[:, None], C / y[:, None]

        def residuals(theta: np.ndarray) -> np.ndarray:
            tg, tc = theta[:k], theta[k:]
            fit = overlap_time(Gy @ tg, Cy @ tc, p) - 1.0
            return np.concatenate([fit, weight * (theta - prior)])

        def jacobian(theta: np.ndarray) -> np.ndarray:
            tg, tc = theta[:k], theta[k:]
            g, c = Gy @ tg, Cy @ tc
            total = np.maximum(overlap_time(g, c, p), 1e-12)
            wg = (np.maximum(g, 0) / total) ** (p - 1)
            wc = (np.maximum(c, 0) / total) ** (p - 1)
            J = np.column_stack([Gy * wg[:, None], Cy * wc[:, None]])
            return np.vstack([J, np.diag(weight)])

        # a feature the data never exercises (an all-zero column) keeps its prior exactly
        exercised = (A != 0).any(axis=0)
        if bounds is None:
            lower, upper = np.zeros(len(prior)), np.full(len(prior), np.inf)
            active = exercised
            theta = np.where(active, np.clip(start, 1e-9, None), np.maximum(prior, 0.0))
        else:
            lower, upper = (np.asarray(b, dtype=np.float64) for b in bounds)
            # a range of a single value fixes the coefficient there
            active = exercised & (upper - lower > 1e-12 * np.maximum(np.abs(lower), 1.0))
            theta = np.where(active, np.clip(np.maximum(start, 1e-9), lower, upper),
                             np.where(exercised, lower, prior))
        if not active.any():
            return theta

        def free_residuals(free: np.ndarray) -> np.ndarray:
            return residuals(np.where(active, _scatter(free, active, theta), theta))

        def free_jacobian(free: np.ndarray) -> np.ndarray:
            return jacobian(_scatter(free, active, theta))[:, active]

        x0 = np.clip(theta[active], lower[active], upper[active])
        lo, hi = lower[active], upper[active]
        result = least_squares(free_residuals, x0, jac=free_jacobian, bounds=(lo, hi),
                               x_scale="jac", max_nfev=self.max_iterations, method="trf")
        # the interior-point solver stops a hair inside an active bound: a coefficient
        # whose distance to its bound is < 1e-10 of a step (RMS) IS at the bound
        s = scale[active]
        x = np.where((result.x - lo) * s < 1e-10, lo, result.x)
        x = np.where((hi - x) * s < 1e-10, hi, x)
        return _scatter(x, active, theta)

    def _start(self, G: np.ndarray, C: np.ndarray, y: np.ndarray, prior: np.ndarray
               ) -> np.ndarray:
        """Additive non-negative fit: a good, safe starting point."""
        stats = RelativeGram.from_rows(np.column_stack([G, C]), y)
        return nonneg_ridge(stats, prior, np.zeros(len(prior)))

    def _prior_and_penalty(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        k, m = len(self.gpu_features), len(self.cpu_features)
        prior = np.concatenate([np.ones(k), np.zeros(m)])
        penalty = np.concatenate([np.full(k, self.ridge * n), np.zeros(m)])
        return prior, penalty

    # -- fitting ------------------------------------------------------------------------
    def fit(self, X: pd.DataFrame, y: Any = None) -> Overlap:
        y = target(X, y)
        if not len(y):
            raise ValueError("Overlap.fit needs at least one step")
        G, C = design(X, self.gpu_features), design(X, self.cpu_features)
        prior, penalty = self._prior_and_penalty(len(y))
        start = self._start(G, C, y, prior)
        self.coef_ = self._solve(G, C, y, prior, penalty, start)
        self.n_features_in_ = len(self.features)
        self._fit_config_sets(X, y)
        return self

    def _fit_config(self, X: pd.DataFrame, y: np.ndarray, reference: np.ndarray,
                    prior_steps: float) -> np.ndarray:
        """One configuration's set: shrunk toward ``reference`` with a prior worth
        ``prior_steps`` steps, inside the physical ranges (bounds of the solver)."""
        G, C = design(X, self.gpu_features), design(X, self.cpu_features)
        penalty = np.full(len(self.coef_), float(prior_steps))
        return self._solve(G, C, y, reference, penalty, reference, self._bounds(X, y))

    # -- host cost: the CPU expert (config_terms) ---------------------------------------
    def _host_terms_mask(self) -> np.ndarray:
        """The CPU expert's coefficients are the host terms."""
        k, m = len(self.gpu_features), len(self.cpu_features)
        return np.concatenate([np.zeros(k, dtype=bool), np.ones(m, dtype=bool)])

    def _terms_host_split(self, X: pd.DataFrame, terms: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(GPU expert µs, CPU expert µs) per step."""
        tg, tc = self._split(terms)
        return design(X, self.gpu_features) @ tg, design(X, self.cpu_features) @ tc

    def _terms_host_combine(self, device: np.ndarray, host: np.ndarray) -> np.ndarray:
        return overlap_time(device, host, self.power)

    # -- prediction ---------------------------------------------------------------------
    def _predict_with(self, X: pd.DataFrame, coef: np.ndarray) -> np.ndarray:
        tg, tc = self._split(coef)
        g = design(X, self.gpu_features) @ tg
        return overlap_time(g, design(X, self.cpu_features) @ tc, self.power)

    def linear_parts(self, config_key: str | None
                     ) -> tuple[list[tuple[Sequence[str], np.ndarray]], Any]:
        """The GPU and the CPU expert (each Σ θ·features) of the configuration's set and
        their smooth max (for the replay's compiled step time, ``requests.step_time``)."""
        tg, tc = self._split(self.coefficients_for(config_key))
        power = float(self.power)

        def combine(values: Sequence[float]) -> float:  # overlap_time, one step
            g, c = values
            m = max(g, c, 1e-12)
            return m * ((g / m) ** power + (c / m) ** power) ** (1.0 / power)

        return [(tuple(self.gpu_features), tg), (tuple(self.cpu_features), tc)], combine

    def gpu_cpu_us(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The two experts' times (µs) per step, global coefficients."""
        tg, tc = self._split(self.coef_)
        return design(X, self.gpu_features) @ tg, design(X, self.cpu_features) @ tc

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        params = {**self.get_params(), "gpu_features": list(self.gpu_features),
                  "cpu_features": list(self.cpu_features)}
        return {
            "family": self.family,
            "params": params,
            "features": list(self.features),
            "combine": {"rule": "(gpu^power + cpu^power)^(1/power)", "power": self.power},
            **self._coefficient_sets(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Overlap:
        params = dict(data["params"])
        params["gpu_features"] = tuple(params["gpu_features"])
        params["cpu_features"] = tuple(params["cpu_features"])
        model = cls(**params)
        model._restore_sets(data)
        return model
