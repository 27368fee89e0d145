"""BLIS's "trained-physics" basis, exactly as BLIS computes it (approximations included).

A coefficient vector fit on these 11 columns means the same thing inside BLIS. Column
order is BLIS's beta order. Approximations kept on purpose: prefill attention uses the
FULL prompt length ``s_i``; ``d_h = d / H``; weight bytes are 1 (FP8) or 2; MoE weights
are all ``E`` experts; no logits term.
"""

from __future__ import annotations

import numpy as np

from blis_model.features.context import Columns, FeatureContext, column

BETA_NAMES: tuple[str, ...] = (
    "T_pf_compute", "T_dc_compute", "T_weight", "T_tp", "L", "B", "step", "L_moe",
    "T_pf_kv", "T_dc_kv", "T_moe_dispatch",
)
BETA_UNITS: tuple[str, ...] = (
    "dimensionless", "dimensionless", "dimensionless", "dimensionless", "µs/layer",
    "µs/request", "µs/step", "µs/MoE layer", "dimensionless", "dimensionless", "dimensionless",
)
ALPHA_NAMES: tuple[str, ...] = ("queueing_us", "post_decode_us", "per_output_token_us")


def _shape(ctx: FeatureContext) -> dict[str, float]:
    a, hw = ctx.arch, ctx.hardware
    wbpp = a.blis_weight_bytes
    return {
        "L": a.num_layers, "L_dense": a.num_dense_layers, "L_moe": a.num_moe_layers,
        "d": a.hidden_size, "H": a.num_heads, "d_h": a.blis_head_dim, "d_kv": a.blis_kv_dim,
        "d_ff": a.intermediate_size, "d_ff_moe": a.moe_intermediate_size,
        "E": a.num_experts, "k_eff": max(1, a.experts_per_token), "wbpp": wbpp,
        "TP": ctx.tp, "peak": hw.peak_flops_per_us(wbpp), "bw": hw.hbm_bytes_per_us,
    }


def _linear_flops(tokens: np.ndarray, m: dict[str, float]) -> np.ndarray:
    d, tp = m["d"], m["TP"]
    return (m["L"] * 2 * tokens * d * (2 * d + 2 * m["d_kv"]) / tp
            + m["L_dense"] * tokens * 6 * d * m["d_ff"] / tp
            + m["L_moe"] * (tokens * m["k_eff"] / tp) * 6 * d * m["d_ff_moe"])


def blis_basis(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """The (n_steps, 11) basis matrix in BLIS beta order, µs (or counts for b4..b7)."""
    m = _shape(ctx)
    t_pf = column(steps, "pf_tokens")
    t_dc = column(steps, "dc_count")
    sum_ctx = column(steps, "dc_ctx_sum")
    batch = column(steps, "pf_count") + t_dc
    # Σ t_i·(s_i + t_i/2) with s_i the full prompt length
    pf_attn = column(steps, "pf_prompt_tokens") + 0.5 * column(steps, "pf_tokens_sq")
    L, tp, d_h, heads = m["L"], m["TP"], m["d_h"], m["H"]
    out = np.zeros((len(t_pf), len(BETA_NAMES)))
    out[:, 0] = (_linear_flops(t_pf, m) + L * 4 * (heads / tp) * pf_attn * d_h) / m["peak"]
    out[:, 1] = (_linear_flops(t_dc, m) + L * 4 * (heads / tp) * sum_ctx * d_h) / m["peak"]
    weight_params = (L * m["d"] * (2 * m["d"] + 2 * m["d_kv"]) / tp
                     + m["L_dense"] * 3 * m["d"] * m["d_ff"] / tp
                     + m["L_moe"] * (m["E"] / tp) * 3 * m["d"] * m["d_ff_moe"])
    out[:, 2] = weight_params * m["wbpp"] / m["bw"]
    if tp > 1:
        layers = L + m["L_dense"] + (m["L_moe"] if m["E"] > 0 else 0)
        out[:, 3] = layers * (t_pf + t_dc) * m["d"] * 2 * 2 * (tp - 1) / tp / m["bw"]
    out[:, 4] = L
    out[:, 5] = batch
    out[:, 6] = 1.0
    out[:, 7] = m["L_moe"] if ctx.arch.is_interleaved_moe else 0.0
    out[:, 8] = L * 2 * (m["d_kv"] / tp) * t_pf * 2 / m["bw"]
    out[:, 9] = L * 2 * (m["d_kv"] / tp) * 2 * (sum_ctx + t_dc) / m["bw"]
    out[:, 10] = 0.0  # MoE dispatch only with DP > 1 (not modelled in BLIS's DP = 1 path)
    return out


def blis_step_time(basis: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """StepTime as BLIS evaluates it for 7..11 betas (missing kv terms fold into max())."""
    beta = np.asarray(beta, dtype=np.float64)
    n = len(beta)
    if not 7 <= n <= 11:
        raise ValueError(f"BLIS accepts 7 to 11 betas, got {n}")
    pf = (beta[0] * basis[:, 0] + beta[8] * basis[:, 8] if n >= 9
          else beta[0] * np.maximum(basis[:, 0], basis[:, 8]))
    dc = (beta[1] * basis[:, 1] + beta[9] * basis[:, 9] if n >= 10
          else beta[1] * np.maximum(basis[:, 1], basis[:, 9]))
    rest = basis[:, 2:7] @ beta[2:7]
    if n >= 8:
        rest = rest + beta[7] * basis[:, 7]
    if n >= 11:
        rest = rest + beta[10] * basis[:, 10]
    return pf + dc + rest
