"""Physics features: hand-computed values and the invariants their docstrings state."""

from __future__ import annotations

import numpy as np
import pytest

from blis_model.configuration.architecture import arch_from_hf_config
from blis_model.configuration.hardware import hardware_spec
from blis_model.features.context import FeatureContext
from blis_model.features.physics import PHYSICS_FEATURES, expected_active_experts
from blis_model.features.registry import REGISTRY, compute

LLAMA2 = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
          "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000}
LLAMA31 = {**LLAMA2, "intermediate_size": 14336, "num_key_value_heads": 8,
           "vocab_size": 128256}
MIXTRAL = {**LLAMA31, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2}


def ctx(cfg: dict, tp: int = 1, gpu: str = "H100") -> FeatureContext:
    return FeatureContext(arch_from_hf_config(cfg, "m"), hardware_spec(gpu), tp)


def step(**cols: float) -> dict[str, np.ndarray]:
    names = ("pf_count", "pf_tokens", "pf_tokens_sq", "pf_ctx_tokens", "pf_ctx_max",
             "pf_sampling", "dc_count", "dc_ctx_sum", "dc_ctx_max")
    return {n: np.array([float(cols.get(n, 0.0))]) for n in names}


def feature(name: str, steps: dict, context: FeatureContext) -> float:
    return float(REGISTRY[name].fn(steps, context)[0])


# one prefill chunk of 100 tokens after 400 cached tokens (finishing its prompt) + 2 decodes
MIXED = step(pf_count=1, pf_tokens=100, pf_tokens_sq=100**2, pf_ctx_tokens=100 * 400,
             pf_ctx_max=500, pf_sampling=1, dc_count=2, dc_ctx_sum=3000, dc_ctx_max=2000)


def test_gemm_compute_by_hand() -> None:
    params = 32 * (4096 * 4096 * 2 + 4096 * 4096 * 2) + 32 * 3 * 4096 * 11008
    expected = 2 * 102 * params / 989.5e6
    assert feature("gemm_compute_us", MIXED, ctx(LLAMA2)) == pytest.approx(expected, rel=1e-12)


def test_prefill_attention_uses_context_computed_so_far() -> None:
    # 4·L·H·head_dim·Σ t·(c + t/2) / peak
    expected = 4 * 32 * 32 * 128 * (100 * 400 + 100 * 100 / 2) / 989.5e6
    assert feature("prefill_attention_us", MIXED, ctx(LLAMA2)) == pytest.approx(expected)


def test_decode_attention_and_gqa_unpacking() -> None:
    kv_bytes = 32 * 2 * 1024 * 2 * (3000 + 2)  # L·2·kv_dim·2 bytes·Σ(ctx + 1)
    c = ctx(LLAMA31)
    assert feature("decode_attention_us", MIXED, c) == pytest.approx(kv_bytes / 3.35e6)
    # mixed step: each of the 4 query heads per KV head reads on its own → 3 extra reads
    assert feature("mixed_decode_attention_us", MIXED, c) == pytest.approx(3 * kv_bytes / 3.35e6)
    decode_only = step(dc_count=2, dc_ctx_sum=3000, dc_ctx_max=2000)
    assert feature("mixed_decode_attention_us", decode_only, c) == 0.0
    assert feature("mixed_decode_attention_us", MIXED, ctx(LLAMA2)) == 0.0  # MHA


def test_logits_only_for_sampling_requests() -> None:
    expected = 2 * 4096 * 32000 * 3 / 989.5e6  # 2 decodes + 1 finishing prefill
    assert feature("lm_head_us", MIXED, ctx(LLAMA2)) == pytest.approx(expected)


def test_moe_weight_read_counts_expected_active_experts() -> None:
    assert expected_active_experts(np.array([0.0]), 8, 2)[0] == 0.0
    assert expected_active_experts(np.array([1.0]), 8, 2)[0] == pytest.approx(2.0)
    assert expected_active_experts(np.array([1e6]), 8, 2)[0] == pytest.approx(8.0)
    one_token = feature("weight_read_us", step(dc_count=1, dc_ctx_sum=10), ctx(MIXTRAL))
    many = feature("weight_read_us", step(dc_count=256, dc_ctx_sum=10), ctx(MIXTRAL))
    attn = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)
    expert = 3 * 4096 * 14336
    assert one_token == pytest.approx((attn + 32 * 2 * expert) * 2 / 3.35e6)
    assert many == pytest.approx((attn + 32 * 8 * expert) * 2 / 3.35e6, rel=1e-6)


def test_tensor_parallelism_splits_work_and_adds_allreduce() -> None:
    one, two = ctx(LLAMA2, 1), ctx(LLAMA2, 2)
    assert feature("gemm_compute_us", MIXED, two) == pytest.approx(
        feature("gemm_compute_us", MIXED, one) / 2)
    assert feature("tp_allreduce_us", MIXED, one) == 0.0
    expected = 2 * 32 * 2 * (1 / 2) * 102 * 4096 * 2 / 450e3
    assert feature("tp_allreduce_us", MIXED, two) == pytest.approx(expected)


def test_fp8_weights_use_fp8_peak_and_one_byte() -> None:
    fp8 = {**LLAMA2, "quantization_config": {"quant_method": "fp8"}}
    assert feature("gemm_compute_us", MIXED, ctx(fp8)) == pytest.approx(
        feature("gemm_compute_us", MIXED, ctx(LLAMA2)) / 2)
    assert feature("weight_read_us", MIXED, ctx(fp8)) == pytest.approx(
        feature("weight_read_us", MIXED, ctx(LLAMA2)) / 2)


def test_every_feature_is_documented_and_non_negative() -> None:
    rng = np.random.default_rng(0)
    n = 200
    steps = {k: rng.uniform(0, 5000, n).round() for k in step()}
    for c in (ctx(LLAMA2), ctx(MIXTRAL, 2), ctx(LLAMA31, 4, "L40S")):
        values = compute(PHYSICS_FEATURES, steps, c)
        assert values.shape == (n, len(PHYSICS_FEATURES))
        assert np.isfinite(values).all() and (values >= 0).all()
    for name in PHYSICS_FEATURES:
        assert REGISTRY[name].description and REGISTRY[name].unit
    empty = compute(PHYSICS_FEATURES, step(), ctx(LLAMA2))
    assert empty[0, list(PHYSICS_FEATURES).index("prefill_attention_us")] == 0.0


def test_gemm_roofline_is_the_longer_side_and_the_ridge_the_shorter() -> None:
    """Dense model: one intensity group, so roofline + ridge == compute + weight read,
    and the side that wins flips at tokens ≈ peak / bandwidth (bf16: ~295 on an H100)."""
    context = ctx(LLAMA2)
    for tokens in (1.0, 100.0, 295.0, 300.0, 4096.0):
        s = step(dc_count=tokens, dc_ctx_sum=tokens * 100)
        compute_us = feature("gemm_compute_us", s, context)
        read_us = feature("weight_read_us", s, context)
        assert feature("gemm_roofline_us", s, context) == pytest.approx(max(compute_us, read_us))
        assert feature("gemm_ridge_us", s, context) == pytest.approx(min(compute_us, read_us))
    small, large = step(dc_count=10, dc_ctx_sum=10), step(pf_count=1, pf_tokens=4096)
    assert feature("gemm_roofline_us", small, context) == pytest.approx(
        feature("weight_read_us", small, context))
    assert feature("gemm_roofline_us", large, context) == pytest.approx(
        feature("gemm_compute_us", large, context))


def test_moe_roofline_splits_dense_weights_and_routed_experts() -> None:
    """Mixtral at 1 token: dense weights and the 2 active experts are both read-bound."""
    context = ctx(MIXTRAL)
    attn = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)
    expert = 32 * 3 * 4096 * 14336
    one = step(dc_count=1, dc_ctx_sum=10)
    read = (attn * 2 + 2 * expert * 2) / 3.35e6
    compute_us = (2 * attn + 2 * 2 * expert) / (989.5 * 1e6)
    assert feature("gemm_roofline_us", one, context) == pytest.approx(read)
    assert feature("gemm_ridge_us", one, context) == pytest.approx(compute_us)


def test_layer_kernels_count_launches_by_layer_type_and_tp() -> None:
    assert feature("layer_kernels", MIXED, ctx(LLAMA2)) == 32 * 10
    assert feature("layer_kernels", MIXED, ctx(MIXTRAL)) == 32 * 14
    assert feature("layer_kernels", MIXED, ctx(LLAMA2, tp=2)) == 32 * 12


def test_fp8_activation_quantization_reads_bf16_writes_one_byte_per_gemm_input() -> None:
    fp8 = {**LLAMA2, "quantization_config": {"quant_method": "fp8"}}
    tokens = 102  # 100 prefill + 2 decode tokens of MIXED
    # per layer: QKV and gate_up read the hidden state, O the attention output (q_dim),
    # down the SwiGLU output (intermediate), each 2 bytes read + 1 written
    per_token = 32 * (4096 + 4096 + 4096 + 11008)
    expected = tokens * per_token * 3 / 3.35e6
    assert feature("activation_quant_us", MIXED, ctx(fp8)) == pytest.approx(expected)
    halves = 32 * (4096 + 4096 / 2 + 4096 + 11008 / 2)  # TP 2 shards the O and down inputs
    assert feature("activation_quant_us", MIXED, ctx(fp8, tp=2)) == pytest.approx(
        tokens * halves * 3 / 3.35e6)
    assert feature("activation_quant_us", MIXED, ctx(LLAMA2)) == 0.0  # bf16
    awq = {**LLAMA2, "quantization_config": {"quant_method": "awq", "bits": 4}}
    assert feature("activation_quant_us", MIXED, ctx(awq)) == 0.0  # weight-only
    assert feature("layer_kernels", MIXED, ctx(fp8)) == 32 * (10 + 4)
