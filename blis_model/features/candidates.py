"""Candidate features for automatic relevance determination (BSR-ARD, Hybrid).

Beyond the physics set (``PHYSICS_FEATURES``) these cover what the study's
comprehensive set adds: TP communication in the study's form, CPU-offload traffic over
PCIe, MoE dispatch, KV-cache pressure, preemption and recomputation, queue depth, and
alternative attention / overhead shapes. ARD keeps those the data speaks for.

Every function is pure and vectorized: step columns (float64 arrays) and the
experiment's FeatureContext in, an array ≥ 0 of the same length out.
"""

from __future__ import annotations

import numpy as np

from blis_model.features.context import KV_BYTES_PER_ELEMENT, Columns, FeatureContext, column
from blis_model.features.physics import ACTIVATION_BYTES, PHYSICS_FEATURES, step_tokens
from blis_model.features.registry import REGISTRY, feature

BLOCK_SIZE = 16  # vLLM default KV block size, tokens
KV_PRESSURE_THRESHOLD = 0.9  # KV-cache usage above which allocation starts to struggle


def _kv_bytes_per_token(ctx: FeatureContext) -> float:
    """K and V bytes of one token across all layers on one GPU."""
    a = ctx.arch
    return a.num_layers * 2.0 * (a.kv_dim / ctx.tp) * KV_BYTES_PER_ELEMENT


def _n(steps: Columns) -> int:
    return len(step_tokens(steps))


@feature("tp_comm_us", "µs", "correction")
def tp_comm_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """The study's TP communication form (TP−1)·tokens·d·2 bytes, two exchanges per layer,
    over the per-direction GPU interconnect bandwidth, µs (0 when TP = 1)."""
    a = ctx.arch
    bytes_ = 2 * a.num_layers * (ctx.tp - 1) * step_tokens(steps) * a.hidden_size * ACTIVATION_BYTES
    return bytes_ / ctx.hardware.interconnect_bytes_per_us


@feature("cpu_offload_us", "µs", "correction")
def cpu_offload_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """KV-offload traffic blocks·block_bytes over the host (PCIe) bandwidth, µs: the KV
    blocks this step writes (tokens / block size) plus the blocks of requests preempted
    this step (mean blocks per batch request each), as a CPU-offload tier would move them."""
    batch = np.maximum(column(steps, "pf_count") + column(steps, "dc_count"), 1.0)
    swapped = column(steps, "num_preempted") * column(steps, "blocks_allocated") / batch
    blocks = step_tokens(steps) / BLOCK_SIZE + swapped
    return blocks * BLOCK_SIZE * _kv_bytes_per_token(ctx) / ctx.hardware.pcie_bytes_per_us


@feature("moe_dispatch_us", "µs", "correction")
def moe_dispatch_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """MoE token dispatch + combine: 2·L_moe·tokens·top_k·d·2 bytes permuted through HBM,
    plus their (TP−1)/TP share over the interconnect when TP > 1, µs (0 for dense models)."""
    a = ctx.arch
    if not a.num_moe_layers:
        return np.zeros(_n(steps))
    bytes_ = (2.0 * a.num_moe_layers * step_tokens(steps) * a.experts_per_token
              * a.hidden_size * ACTIVATION_BYTES)
    hbm = bytes_ / ctx.hardware.hbm_bytes_per_us
    link = (ctx.tp - 1) / ctx.tp * bytes_ / ctx.hardware.interconnect_bytes_per_us
    return hbm + link


@feature("prefill_attention_full_prompt_us", "µs", "correction")
def prefill_attention_full_prompt_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Prefill attention with BLIS's full-prompt approximation 4·L·(H/TP)·head_dim·Σ t·(s +
    t/2) (s = whole prompt) over the bf16 peak, µs."""
    a = ctx.arch
    tokens_ctx = column(steps, "pf_prompt_tokens") + 0.5 * column(steps, "pf_tokens_sq")
    flops = 4.0 * a.num_layers * (a.num_heads / ctx.tp) * a.head_dim * tokens_ctx
    return flops / (ctx.hardware.tflops_bf16 * 1e6)


@feature("decode_attention_compute_us", "µs", "correction")
def decode_attention_compute_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Decode attention FLOPs 4·L·(H/TP)·head_dim·Σ(ctx + 1) over the bf16 peak, µs (the
    compute side of decode attention; matters for long contexts with wide GQA groups)."""
    a = ctx.arch
    kv_tokens = column(steps, "dc_ctx_sum") + column(steps, "dc_count")
    flops = 4.0 * a.num_layers * (a.num_heads / ctx.tp) * a.head_dim * kv_tokens
    return flops / (ctx.hardware.tflops_bf16 * 1e6)


@feature("decode_ctx_max_us", "µs", "correction")
def decode_ctx_max_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """KV bytes of the LONGEST decode context over HBM bandwidth, µs: the tail an
    unbalanced attention grid waits for."""
    return column(steps, "dc_ctx_max") * _kv_bytes_per_token(ctx) / ctx.hardware.hbm_bytes_per_us


@feature("prefill_kv_write_us", "µs", "correction")
def prefill_kv_write_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """KV-cache bytes written for the prefill chunk tokens (L·2·kv_dim/TP·2 bytes each) over
    HBM bandwidth, µs (BLIS's T_pf_kv with the real head_dim)."""
    return column(steps, "pf_tokens") * _kv_bytes_per_token(ctx) / ctx.hardware.hbm_bytes_per_us


@feature("kv_usage", "KV-cache fraction", "overhead")
def kv_usage(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """GPU KV-cache usage ratio (0..1) at the step: block-allocator and prefix-cache
    bookkeeping grow with occupancy."""
    return np.clip(column(steps, "kv_usage_ratio"), 0.0, None)


@feature("kv_pressure", "KV-cache fraction above 90%", "overhead")
def kv_pressure(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """KV pressure max(usage − 0.9, 0) / 0.1 (0 below 90% usage, 1 when full): eviction and
    allocation retries near a full cache."""
    usage = column(steps, "kv_usage_ratio")
    return np.clip(usage - KV_PRESSURE_THRESHOLD, 0.0, None) / (1.0 - KV_PRESSURE_THRESHOLD)


@feature("preemptions", "preempted request", "overhead")
def preemptions(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Requests preempted at this step (KV freed, request sent back to the queue)."""
    return np.clip(column(steps, "num_preempted"), 0.0, None)


@feature("recomputed_requests", "request", "overhead")
def recomputed_requests(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Batch requests that were preempted before (recomputing their lost KV)."""
    return np.clip(column(steps, "preempted_before"), 0.0, None)


@feature("queue_waiting", "waiting request", "overhead")
def queue_waiting(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Requests waiting in the scheduler queue: admission checks scanned every step."""
    return np.clip(column(steps, "waiting_depth"), 0.0, None)


@feature("prefill_requests", "prefill request", "overhead")
def prefill_requests(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Prefill requests in the batch: varlen attention metadata and chunk bookkeeping."""
    return column(steps, "pf_count")


@feature("decode_requests", "decode request", "overhead")
def decode_requests(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Decode requests in the batch: per-sequence metadata and CUDA-graph padding."""
    return column(steps, "dc_count")


@feature("sampled_sequences", "sampled sequence", "overhead")
def sampled_sequences(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Sequences that sample a token this step (decodes + prefills finishing their prompt):
    sampler, logits processors, detokenization hand-off."""
    return column(steps, "dc_count") + column(steps, "pf_sampling")


@feature("kv_blocks", "KV block", "overhead")
def kv_blocks(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """KV blocks held by the batch: block-table construction and copy to the GPU."""
    return np.clip(column(steps, "blocks_allocated"), 0.0, None)


@feature("token_overhead", "token", "overhead")
def token_overhead(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Tokens computed this step: CPU input preparation (positions, slot mapping) per token."""
    return step_tokens(steps)


@feature("prefill_step", "step with prefill", "overhead")
def prefill_step(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """1 when the step computes prefill tokens, else 0: mixed steps leave the full CUDA-graph
    path and pay extra launch cost."""
    return (column(steps, "pf_tokens") > 0).astype(np.float64)


EXTRA_FEATURES: tuple[str, ...] = (
    "tp_comm_us", "cpu_offload_us", "moe_dispatch_us", "prefill_attention_full_prompt_us",
    "decode_attention_compute_us", "decode_ctx_max_us", "prefill_kv_write_us", "kv_usage",
    "kv_pressure", "preemptions", "recomputed_requests", "queue_waiting", "prefill_requests",
    "decode_requests", "sampled_sequences", "kv_blocks", "token_overhead", "prefill_step",
)
# registered physics alternatives that are not in the default physics set
_PHYSICS_ALTERNATIVES = tuple(n for n in ("decode_attention_qhead_us",
                                          "mixed_decode_attention_us") if n in REGISTRY)

CANDIDATE_FEATURES: tuple[str, ...] = tuple(dict.fromkeys(
    PHYSICS_FEATURES + _PHYSICS_ALTERNATIVES + EXTRA_FEATURES))
