"""Our physics feature set: roofline time estimates (µs) per kernel family.

Correct where BLIS approximates: real ``head_dim``; prefill attention over the context
computed so far (not the full prompt); logits only for requests that sample; the
expected number of distinct experts a MoE layer touches; quantized weight bytes; and
explicit per-layer / per-request / per-step overheads (counts, coefficient µs per unit).

Every function takes step columns (float64 arrays, one value per step) and an
experiment's FeatureContext, and returns an array ≥ 0 of the same length (or a scalar).
"""

from __future__ import annotations

import numpy as np

from blis_model.features.context import KV_BYTES_PER_ELEMENT, Columns, FeatureContext, column
from blis_model.features.registry import feature

ACTIVATION_BYTES = 2.0  # bf16 activations


def step_tokens(steps: Columns) -> np.ndarray:
    """Tokens computed this step: prefill chunk tokens + one per decode request."""
    return column(steps, "pf_tokens") + column(steps, "dc_count")


def expected_active_experts(tokens: np.ndarray, experts: int, top_k: int) -> np.ndarray:
    """Expected distinct experts hit when each of ``tokens`` picks ``top_k`` of ``experts``
    uniformly: E·(1 − (1 − k/E)^N). 0 tokens → 0 experts; large N → E."""
    if experts <= 0:
        return np.zeros_like(tokens)
    return experts * (1.0 - np.power(1.0 - top_k / experts, tokens))


def _gemm_params_per_token(ctx: FeatureContext) -> float:
    """Parameters each token multiplies through (attention projections, dense FFN, its k
    experts and any shared expert), summed over layers and divided by TP."""
    a = ctx.arch
    per_token = (a.num_layers * a.attention_params_per_layer
                 + a.num_dense_layers * a.dense_ffn_params_per_layer
                 + a.num_moe_layers * (a.experts_per_token * a.expert_params
                                       + a.shared_expert_params))
    return per_token / ctx.tp


def _weight_bytes(tokens: np.ndarray, ctx: FeatureContext) -> np.ndarray:
    a = ctx.arch
    experts = expected_active_experts(tokens, a.num_experts, a.experts_per_token)
    params = (a.num_layers * a.attention_params_per_layer
              + a.num_dense_layers * a.dense_ffn_params_per_layer
              + a.num_moe_layers * (experts * a.expert_params + a.shared_expert_params))
    return params * a.weight_bytes_per_param / ctx.tp


def _peak(ctx: FeatureContext) -> float:
    return ctx.hardware.peak_flops_per_us(ctx.arch.weight_bytes_per_param)


@feature("gemm_compute_us", "µs", "correction")
def gemm_compute_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Linear-layer FLOPs (2·tokens·active params: QKV/O, dense FFN, top-k experts) over
    the tensor-core peak (FP8 peak for 1-byte weights), µs."""
    return 2.0 * step_tokens(steps) * _gemm_params_per_token(ctx) / _peak(ctx)


@feature("weight_read_us", "µs", "correction")
def weight_read_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Bytes of weights the step streams from HBM (attention, dense FFN, the expected
    distinct experts, quantized bytes/param), over HBM bandwidth, µs."""
    return _weight_bytes(step_tokens(steps), ctx) / ctx.hardware.hbm_bytes_per_us


@feature("prefill_attention_us", "µs", "correction")
def prefill_attention_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Prefill attention FLOPs 4·L·(H/TP)·head_dim·Σ t·(c + t/2) over the bf16 peak, µs:
    each chunk of t tokens attends to its c cached tokens plus, causally, half of itself."""
    a = ctx.arch
    tokens_ctx = column(steps, "pf_ctx_tokens") + 0.5 * column(steps, "pf_tokens_sq")
    flops = 4.0 * a.num_layers * (a.num_heads / ctx.tp) * a.head_dim * tokens_ctx
    return flops / (ctx.hardware.tflops_bf16 * 1e6)


@feature("decode_attention_us", "µs", "correction")
def decode_attention_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """KV-cache bytes decode attention reads (K and V of every context token, every
    layer: L·2·kv_dim/TP·2 bytes·Σ(ctx + 1)) over HBM bandwidth, µs."""
    a = ctx.arch
    kv_tokens = column(steps, "dc_ctx_sum") + column(steps, "dc_count")
    kv_bytes = a.num_layers * 2.0 * (a.kv_dim / ctx.tp) * KV_BYTES_PER_ELEMENT * kv_tokens
    return kv_bytes / ctx.hardware.hbm_bytes_per_us


@feature("lm_head_us", "µs", "correction")
def lm_head_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """LM-head FLOPs 2·d·V/TP for each request that samples a token this step (decodes
    and prefills completing their prompt), over the tensor-core peak, µs."""
    a = ctx.arch
    sampling = column(steps, "dc_count") + column(steps, "pf_sampling")
    return 2.0 * a.hidden_size * a.vocab_size / ctx.tp * sampling / _peak(ctx)


@feature("activation_io_us", "µs", "correction")
def activation_io_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """HBM traffic of the element-wise kernels per token and layer (2 norms, 2 residual
    adds, rotary, gated activation over the FFN width, KV write, MoE token permutation):
    ≈ (12·d + 4·q_dim + 2·kv_dim + 3·ffn) activations of 2 bytes, over HBM bandwidth, µs."""
    a = ctx.arch
    ffn = (a.num_dense_layers * a.intermediate_size
           + a.num_moe_layers * (a.experts_per_token * a.moe_intermediate_size
                                 + a.shared_expert_intermediate_size
                                 + 2 * a.experts_per_token * a.hidden_size))
    per_token = (a.num_layers * (12 * a.hidden_size + 4 * a.q_dim + 2 * a.kv_dim)
                 + 3 * ffn) / ctx.tp
    return step_tokens(steps) * per_token * ACTIVATION_BYTES / ctx.hardware.hbm_bytes_per_us


@feature("tp_allreduce_us", "µs", "correction")
def tp_allreduce_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Ring all-reduce traffic of tensor parallelism, 2 per layer: (TP−1)/TP·2·tokens·d·2
    bytes each, over the per-direction GPU interconnect bandwidth, µs (0 when TP = 1)."""
    if ctx.tp <= 1:
        return np.zeros_like(step_tokens(steps))
    a = ctx.arch
    bytes_ = (2 * a.num_layers * 2.0 * (ctx.tp - 1) / ctx.tp * step_tokens(steps)
              * a.hidden_size * ACTIVATION_BYTES)
    return bytes_ / ctx.hardware.interconnect_bytes_per_us


@feature("layer_overhead", "layer", "overhead")
def layer_overhead(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Number of layers: per-layer fixed cost (kernel launches, small-kernel tails)."""
    return np.full(len(step_tokens(steps)), float(ctx.arch.num_layers))


@feature("moe_layer_overhead", "MoE layer", "overhead")
def moe_layer_overhead(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Number of MoE layers: routing, top-k, permutation and grouped-GEMM set-up per layer."""
    return np.full(len(step_tokens(steps)), float(ctx.arch.num_moe_layers))


@feature("request_overhead", "request", "overhead")
def request_overhead(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Requests in the batch: per-sequence scheduling, metadata and sampling cost."""
    return column(steps, "pf_count") + column(steps, "dc_count")


@feature("step_overhead", "step", "overhead")
def step_overhead(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """1 per step: fixed scheduler + launch cost of a step."""
    return np.ones(len(step_tokens(steps)))




@feature("mixed_decode_attention_us", "µs", "correction")
def mixed_decode_attention_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Extra KV traffic of decode attention in MIXED steps (a prefill chunk in the batch):
    varlen attention kernels pack the H/kv_heads query heads of a GQA group onto one KV
    read only when every sequence has a single query; in a mixed batch each query head
    streams its KV head's cache itself: ``decode_attention_us``·(H/kv_heads − 1), µs
    (0 for MHA models and for pure-decode steps)."""
    a = ctx.arch
    mixed = column(steps, "pf_tokens") > 0
    return decode_attention_us(steps, ctx) * (a.num_heads / a.num_kv_heads - 1.0) * mixed


@feature("decode_attention_tail_us", "µs", "correction")
def decode_attention_tail_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Critical path of the longest decode sequence when attention has no split-KV: one
    thread block per (sequence, head) streams that sequence's K and V alone, at one SM's
    share of HBM bandwidth: L·max ctx·2·head_dim·2 bytes / (bw / SMs), µs."""
    a, hw = ctx.arch, ctx.hardware
    per_sm = hw.hbm_bytes_per_us / hw.sm_count
    bytes_per_key = 2.0 * a.head_dim * KV_BYTES_PER_ELEMENT
    return a.num_layers * column(steps, "dc_ctx_max") * bytes_per_key / per_sm


ATTENTION_QUERY_TILE = 128  # query rows per FlashAttention thread block


@feature("prefill_attention_tail_us", "µs", "correction")
def prefill_attention_tail_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Critical path of the longest prefill sequence: one thread block computes a tile of
    128 query rows against all its c + t keys at one SM's share of the bf16 peak:
    L·128·max(c + t)·4·head_dim / (peak / SMs), µs."""
    a, hw = ctx.arch, ctx.hardware
    per_sm = hw.tflops_bf16 * 1e6 / hw.sm_count
    rows = np.minimum(column(steps, "pf_tokens"), ATTENTION_QUERY_TILE)
    return a.num_layers * rows * column(steps, "pf_ctx_max") * 4.0 * a.head_dim / per_sm


PHYSICS_FEATURES: tuple[str, ...] = (
    "gemm_compute_us", "weight_read_us", "prefill_attention_us", "decode_attention_us",
    "mixed_decode_attention_us", "decode_attention_tail_us", "lm_head_us", "activation_io_us",
    "tp_allreduce_us", "layer_overhead", "moe_layer_overhead", "request_overhead",
    "step_overhead",
)
"""The PICF feature set (order = coefficient order). ``prefill_attention_tail_us`` stays
registered as a candidate for ARD but is not in the default set."""
