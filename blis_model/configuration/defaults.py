"""The project's shared defaults, in one place. Everything that validates, gates or
reports uses these, so a release's numbers and the benchmarks' numbers mean the same.
"""

from __future__ import annotations

#: Temporal holdout: fit on the first 70% of each experiment's steps (by step id), score
#: the last 30%. Never random rows: steps are autocorrelated.
TRAIN_FRACTION = 0.7

#: Share of an experiment's requests allowed to fail validation before calibration stops.
MAX_REQUEST_FAILURE_RATE = 0.05

#: Promotion gate: allowed MAPE regression of a candidate, percentage points.
GATE_TOLERANCE_PP = 1.0

#: vLLM's default KV-cache block size (tokens), used when exp-config.yaml has none.
DEFAULT_BLOCK_SIZE = 16

#: BLIS's shipped trained-physics coefficients ("iter29", found by black-box search with
#: the simulator in the loop): alphas (µs, µs, µs/output token) and betas in BLIS order.
BLIS_SHIPPED_ALPHAS: tuple[float, float, float] = (15563.2, 777.3, 45.9)
BLIS_SHIPPED_BETAS: tuple[float, ...] = (
    0.152128, 0.0, 1.36252915, 0.752037, 32.09546717, 4.41684444, 126.024825, 481.8613888,
    0.0, 1.94710771, 0.752037,
)

__all__ = ["BLIS_SHIPPED_ALPHAS", "BLIS_SHIPPED_BETAS", "DEFAULT_BLOCK_SIZE",
           "GATE_TOLERANCE_PP", "MAX_REQUEST_FAILURE_RATE", "TRAIN_FRACTION"]
