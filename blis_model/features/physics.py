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


def _gemm_groups(steps: Columns, ctx: FeatureContext) -> list[tuple[np.ndarray, np.ndarray]]:
    """(compute µs, weight-read µs) of each group of the decoder layers' GEMMs that share
    one arithmetic intensity: dense (attention projections, dense FFN, shared experts:
    every weight serves every token) and routed experts (each token uses k of them, the
    expected distinct ones are read). FLOPs over the tensor-core peak (FP8 for 1-byte
    weights), quantized weight bytes over HBM bandwidth."""
    a = ctx.arch
    tokens = step_tokens(steps)
    peak, bw = _peak(ctx), ctx.hardware.hbm_bytes_per_us
    dense = (a.num_layers * a.attention_params_per_layer
             + a.num_dense_layers * a.dense_ffn_params_per_layer
             + a.num_moe_layers * a.shared_expert_params) / ctx.tp
    groups = [(2.0 * tokens * dense / peak,
               np.where(tokens > 0, dense * a.weight_bytes_per_param / bw, 0.0))]
    if a.num_moe_layers:
        expert = a.num_moe_layers * a.expert_params / ctx.tp
        read = expected_active_experts(tokens, a.num_experts, a.experts_per_token)
        groups.append((2.0 * tokens * a.experts_per_token * expert / peak,
                       read * expert * a.weight_bytes_per_param / bw))
    return groups


@feature("gemm_roofline_us", "µs", "correction")
def gemm_roofline_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Roofline time of the step's GEMMs: for each group of equal arithmetic intensity
    (dense weights, routed experts), the LONGER of its FLOPs over the tensor-core peak
    and its weight bytes over HBM bandwidth, summed over the groups, µs. Replaces the
    sum of ``gemm_compute_us`` and ``weight_read_us``, which double-counts near the
    ridge (tokens ≈ peak/bandwidth) where a GEMM streams weights while it computes."""
    return sum(np.maximum(c, m) for c, m in _gemm_groups(steps, ctx))


@feature("gemm_ridge_us", "µs", "correction")
def gemm_ridge_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """The SHORTER of each GEMM group's compute and weight-read time, summed, µs: what a
    real GEMM fails to hide near the roofline's ridge (coefficient 0 = perfect overlap,
    1 = no overlap; largest when FLOPs and bytes take equally long)."""
    return sum(np.minimum(c, m) for c, m in _gemm_groups(steps, ctx))


@feature("layer_overhead", "layer", "overhead")
def layer_overhead(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Number of layers: per-layer fixed cost (kernel launches, small-kernel tails)."""
    return np.full(len(step_tokens(steps)), float(ctx.arch.num_layers))


# Kernels a decoder layer launches in vLLM (fused kernels), the unit of host launch cost.
DENSE_LAYER_KERNELS = 10  # add+RMSNorm ×2, QKV, rotary, KV-cache write, attention, O,
#                           gate_up, SiLU·mul, down
MOE_LAYER_KERNELS = 14  # the 7 non-FFN kernels + router GEMM, top-k softmax, expert
#                         alignment, grouped GEMM ×2, SiLU·mul, weighted sum of experts
SHARED_EXPERT_KERNELS = 3  # gate_up, SiLU·mul, down of a shared expert
TP_LAYER_KERNELS = 2  # all-reduce after attention and after the FFN when TP > 1
QUANT_LAYER_KERNELS = 4  # W8A8: the inputs of QKV, O, gate_up and down quantized apart
QUANT_BYTES_PER_ELEMENT = 3.0  # read bf16 (2) + write the 1-byte copy (1)


@feature("layer_kernels", "kernel launch", "overhead")
def layer_kernels(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """Kernel launches of the decoder layers per step: 10 per dense layer, 14 per MoE
    layer (+3 with a shared expert), +2 all-reduces per layer when TP > 1. Its
    coefficient — host µs per launch — learned on dense models carries to MoE ones."""
    a = ctx.arch
    moe = MOE_LAYER_KERNELS + (SHARED_EXPERT_KERNELS if a.shared_expert_params else 0)
    per_step = (a.num_dense_layers * DENSE_LAYER_KERNELS + a.num_moe_layers * moe
                + (a.num_layers * TP_LAYER_KERNELS if ctx.tp > 1 else 0)
                + (a.num_layers * QUANT_LAYER_KERNELS if a.quantizes_activations else 0))
    return np.full(len(step_tokens(steps)), float(per_step))


@feature("activation_quant_us", "µs", "correction")
def activation_quant_us(steps: Columns, ctx: FeatureContext) -> np.ndarray:
    """W8A8 (FP8) linear layers quantize their input activations in a kernel of their own
    before each GEMM (dynamic per-token scales): every GEMM input read in bf16 and written
    in 1 byte — the QKV and gate_up inputs (hidden width, replicated across TP), the O and
    down inputs (sharded), each routed expert's copy of a token — over HBM bandwidth, µs.
    0 for bf16 models and weight-only quantization, whose GEMMs dequantize inside."""
    a = ctx.arch
    if not a.quantizes_activations:
        return np.zeros_like(step_tokens(steps))
    d, tp = a.hidden_size, ctx.tp
    experts = a.experts_per_token * (d + a.moe_intermediate_size / tp)
    shared = (d + a.shared_expert_intermediate_size / tp) if a.shared_expert_params else 0.0
    per_token = (a.num_layers * (d + a.q_dim / tp)
                 + a.num_dense_layers * (d + a.intermediate_size / tp)
                 + a.num_moe_layers * (experts + shared))
    return (step_tokens(steps) * per_token * QUANT_BYTES_PER_ELEMENT
            / ctx.hardware.hbm_bytes_per_us)


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
    "gemm_roofline_us", "gemm_ridge_us", "prefill_attention_us", "decode_attention_us",
    "mixed_decode_attention_us", "decode_attention_tail_us", "lm_head_us", "activation_io_us",
    "tp_allreduce_us", "activation_quant_us", "layer_kernels", "moe_layer_overhead",
    "request_overhead", "step_overhead",
)
"""The default feature set of every family (order = coefficient order).
``gemm_compute_us`` / ``weight_read_us`` (the additive GEMM model), ``layer_overhead``
and ``prefill_attention_tail_us`` stay registered as ARD candidates."""
