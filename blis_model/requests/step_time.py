"""A release's step-time model, evaluated per replayed step in a few µs — exactly.

The replay engine asks for one step's duration at a time (the next step's batch depends
on when this one ends), so the vectorized feature pipeline (``features.frame``, ~1 ms a
call) cannot be called per step. But every physics feature is, for one configuration, a
table over the step's token count ``T = pf_tokens + dc_count`` plus terms linear in the
other aggregates (Σ context, max context, request counts, ...), with slopes that may
differ between steps with and without a prefill chunk. A linear combination of features
(a family's *part*) is then::

    part(step) = G_r[T] + Σ_k S_r,k · a_k(step),   r = (pf_tokens > 0)

:func:`compile_part` finds ``G`` and ``S`` by evaluating the real feature functions on
probe steps, then VERIFIES the decomposition on random probe steps (relative error
< 1e-9) — a feature that is not of this form raises :class:`NotDecomposable` instead of
being approximated. A family exposes its parts and how it combines them
(``StepTimeModel.linear_parts``: PICF one linear part, OVERLAP a GPU and a CPU part and
their smooth max); :func:`model_step_time` builds the replay's step-time function from
them, and falls back to the exact (slow) per-step frame evaluation for families without.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from blis_model.configuration.experiment import Experiment
from blis_model.features.blis_parity import blis_basis, blis_step_time
from blis_model.features.frame import feature_context, feature_frame
from blis_model.features.registry import compute
from blis_model.ingest.steps import STEP_SCHEMA
from blis_model.models.base import StepTimeModel
from blis_model.requests.scheduler import AGGREGATES, StepAggregates, StepTime

log = logging.getLogger(__name__)

#: Step columns a feature may read: the aggregates the replay records per step.
COLUMNS: tuple[str, ...] = tuple(AGGREGATES)
#: Aggregates entering linearly (everything but the token count's two halves).
LINEAR: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("pf_tokens", "dc_count",
                                                                 "prefill_tokens",
                                                                 "decode_tokens"))
VERIFY_PROBES = 400
TOLERANCE = 1e-9


class NotDecomposable(ValueError):
    """A part's features are not a token-count table plus linear terms."""


@dataclass(frozen=True)
class CompiledPart:
    """``G[r][T]`` (µs) and the non-zero slopes ``(aggregate, µs per unit)`` of regime r
    (0: no prefill chunk, 1: some) of one linear part. Calling it evaluates one step
    through a function generated once for these slopes (no loop, no ``getattr``)."""

    tables: tuple[tuple[float, ...], tuple[float, ...]]
    slopes: tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]
    decode_slope: float  # regime 1: µs per decode at fixed T (pf_tokens = T − dc_count)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_call", _generate(self))

    def __call__(self, agg: StepAggregates) -> float:
        return self._call(agg)  # type: ignore[attr-defined]


def _generate(part: CompiledPart) -> Callable[[StepAggregates], float]:
    """``part`` as straight-line Python: the slopes are constants of the code."""
    def terms(r: int) -> str:
        return "".join(f" + {slope!r} * a.{name}" for name, slope in part.slopes[r]
                       if name in COLUMNS and name.isidentifier())

    source = (
        "def step(a):\n"
        "    pf = a.pf_tokens\n"
        "    dc = a.dc_count\n"
        "    if pf > 0:\n"
        f"        return G1[int(pf + dc)] + {part.decode_slope!r} * dc{terms(1)}\n"
        f"    return G0[int(dc)]{terms(0)}\n")
    namespace: dict[str, object] = {"G0": part.tables[0], "G1": part.tables[1]}
    exec(compile(source, "<compiled step time>", "exec"), namespace)  # noqa: S102
    return namespace["step"]  # type: ignore[return-value]


def _probe_frame(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Complete probe columns: every step column, consistent token counts."""
    n = len(next(iter(rows.values())))
    cols = {c: np.asarray(rows.get(c, np.zeros(n)), np.float64) for c in COLUMNS}
    cols["prefill_tokens"] = cols["pf_tokens"]
    cols["decode_tokens"] = cols["dc_count"]
    return cols


def compile_part(names: Sequence[str], coef: np.ndarray, experiment: Experiment,
                 max_tokens: int, seed: int = 0) -> CompiledPart:
    """The decomposition of ``Σ coef_j · feature_j`` for ``experiment``'s configuration
    over steps of at most ``max_tokens`` tokens (verified; NotDecomposable otherwise)."""
    ctx = feature_context(experiment)
    coef = np.asarray(coef, np.float64)
    return compile_function(lambda cols: compute(list(names), cols, ctx) @ coef, max_tokens,
                            seed)


def compile_blis(experiment: Experiment, betas: Sequence[float], max_tokens: int
                 ) -> CompiledPart:
    """BLIS's own trained-physics step time (``features.blis_parity``, 11 betas) on the
    experiment's configuration: what BLIS computes, for replays next to ours."""
    ctx = feature_context(experiment)
    b = np.asarray(betas, np.float64)
    return compile_function(lambda cols: blis_step_time(blis_basis(cols, ctx), b), max_tokens)


def compile_function(function: Callable[[dict[str, np.ndarray]], np.ndarray],
                     max_tokens: int, seed: int = 0) -> CompiledPart:
    """The decomposition of any vectorized function of the step columns (one value per
    step) that is a token-count table plus linear terms (verified)."""

    def value(rows: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(function(_probe_frame(rows)), np.float64)

    tokens = np.arange(max_tokens + 1, dtype=np.float64)
    g0 = value({"dc_count": tokens})
    g1 = value({"pf_tokens": np.maximum(tokens, 1.0)})
    g1[0] = 0.0  # unused: a prefill step has at least one token
    slopes: list[list[tuple[str, float]]] = [[], []]
    base_t = (min(max_tokens, 64), min(max_tokens, 512))
    for r in (0, 1):
        t = float(base_t[r])
        base = {"dc_count": np.array([t])} if r == 0 else {"pf_tokens": np.array([t])}
        ref = value(base)[0]
        for name in LINEAR:
            probe = {**base, name: np.array([1000.0])}
            slope = (value(probe)[0] - ref) / 1000.0
            if slope != 0.0:
                slopes[r].append((name, float(slope)))
    d = min(max_tokens - 1, 32)
    t = float(min(max_tokens, 512))
    decode_slope = float((value({"pf_tokens": np.array([t - d]), "dc_count": np.array([d])})[0]
                          - value({"pf_tokens": np.array([t])})[0]) / d) if d > 0 else 0.0
    part = CompiledPart((tuple(g0.tolist()), tuple(g1.tolist())),
                        (tuple(slopes[0]), tuple(slopes[1])), decode_slope)
    _verify(part, value, max_tokens, seed)
    return part


def _verify(part: CompiledPart, value: Callable[[dict[str, np.ndarray]], np.ndarray],
            max_tokens: int, seed: int) -> None:
    """Random steps of both regimes: the compiled part equals the features' value."""
    rng = np.random.default_rng(seed)
    n = VERIFY_PROBES
    total = rng.integers(1, max_tokens + 1, n).astype(np.float64)
    prefill = rng.random(n) < 0.5
    dc = np.where(prefill, np.floor(rng.random(n) * total), total)
    pf = total - dc
    rows = {"pf_tokens": pf, "dc_count": dc}
    for name in LINEAR:
        rows[name] = np.round(rng.random(n) * rng.choice([1.0, 10.0, 1e3, 1e5], n))
    expected = value(rows)
    cols = _probe_frame(rows)
    agg = StepAggregates()
    got = np.empty(n)
    for i in range(n):
        for name in COLUMNS:
            setattr(agg, name, cols[name][i])
        got[i] = part(agg)
    scale = np.maximum(np.abs(expected), 1e-6 * (np.abs(expected).max() + 1.0))
    worst = float(np.max(np.abs(got - expected) / scale))
    if not worst <= TOLERANCE:
        raise NotDecomposable(f"the features are not a token-count table plus linear terms "
                              f"(relative error {worst:.2e} on a random step)")


def model_step_time(model: StepTimeModel, experiment: Experiment, max_tokens: int
                    ) -> StepTime:
    """The replay's step-time function of ``model`` on ``experiment``'s configuration
    (its calibrated terms when it has them): compiled parts when the family exposes
    ``linear_parts``, else the exact per-step frame evaluation (correct, ~1 ms a step)."""
    parts = getattr(model, "linear_parts", lambda _: None)(experiment.config_key)
    if parts is not None:
        linear, combine = parts
        try:
            compiled = [compile_part(names, coef, experiment, max_tokens)
                        for names, coef in linear]
        except NotDecomposable as exc:
            log.warning("%s: %s; replaying with per-step evaluation (slow)", model.family, exc)
        else:
            if len(compiled) == 1:
                return compiled[0]
            return lambda agg: combine([p(agg) for p in compiled])
    log.warning("%s has no compiled step time; replaying with per-step evaluation (slow)",
                model.family)
    return ExactStepTime(model, experiment)


class ExactStepTime:
    """The model evaluated on a one-step feature frame (the reference, and the fallback)."""

    def __init__(self, model: StepTimeModel, experiment: Experiment) -> None:
        self.model, self.experiment = model, experiment

    def __call__(self, agg: StepAggregates) -> float:
        row = {"experiment": [self.experiment.name], "step_id": [int(agg.step_id)],
               "duration_us": [1.0], "ts_start_ns": [0.0], "composition": ["replay"]}
        for name in COLUMNS:
            if name not in row:
                row[name] = [float(getattr(agg, name))]
        table = pa.table({f.name: row.get(f.name, [0.0]) for f in STEP_SCHEMA},
                         schema=STEP_SCHEMA)
        frame: pd.DataFrame = feature_frame(self.experiment, table)
        return float(self.model.predict(frame)[0])


__all__ = ["COLUMNS", "CompiledPart", "ExactStepTime", "NotDecomposable", "compile_blis",
           "compile_function", "compile_part", "model_step_time"]
